"""Inference speed-ups that keep the model's interface: int8 weight-only quantization (``quantize``) and one-row
GEMM micro-kernels for compiled CPU decoding (``one_row_gemm``)."""
