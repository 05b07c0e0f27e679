"""Scale-out: device mesh and the parallelize step (TP/SP, activation checkpointing, compile, FSDP2)."""
