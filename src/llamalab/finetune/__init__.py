"""Supervised instruction tuning: full or LoRA, on the training loop of ``llamalab.train`` (docs/finetune.md)."""
