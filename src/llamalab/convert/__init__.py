"""Readers and writers for other checkpoint formats (Hugging Face, Meta, llama2.c, GGUF)."""
