"""Inference speed-ups that keep the model's interface: int8 weight-only quantization (``quantize``), GEMM
micro-kernels for one row or a block of rows, for compiled CPU decoding (``row_gemm``), huge pages under
the weights a compiled CPU step streams and under the key/value cache (``huge_pages``), and the keys that
make inductor's compile cache safe for frozen weights (``cache_key``)."""
