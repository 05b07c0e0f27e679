"""Pretraining: config, the loop, optimizer and schedule, checkpoints, metrics."""
