"""Inference speed-ups that keep the model's interface: int8 weight-only quantization (``quantize``), and the
backend that runs a model fast on this machine (``backend``: ``accelerate``), applied from outside the model."""
