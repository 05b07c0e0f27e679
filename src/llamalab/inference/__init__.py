"""Inference speed-ups that keep the model's interface: int8 weight-only quantization (``quantize``)."""
