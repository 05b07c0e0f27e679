"""One module per `llamalab <command>`, each with `main(argv) -> int`."""
