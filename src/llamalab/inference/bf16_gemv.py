"""A one-row bf16 micro-kernel for inductor's CPU GEMM template on AVX2 (decoding: one token per row).

Inductor's AVX2 micro-kernel for bf16 weights is built for several rows: at one row it keeps two fp32
accumulators (one FMA chain per 8 columns, each waiting on the last) and loads every 8 bf16 weights through
``Vectorized<BFloat16>::loadu(ptr, count)``, a copy through the stack. Decoding ``stories15m`` in bf16 it read
the output layer at 10-13 GB/s, slower than the same layer in fp32.

This kernel takes a block of ``BLOCK_N`` (16-64) columns for one row: each 16 bf16 weights are one 32-byte
load, split into the even and odd columns as fp32 by a shift and a mask (a bf16 is the high half of an fp32),
and every 8 columns have their own accumulator, so ``BLOCK_N / 8`` independent FMA chains run. The even/odd
halves are put back in column order once per block, at the store. Products are summed in fp32 in k order,
as the stock kernel does.

It is offered to inductor only while a decode step compiles (``one_row_bf16_kernel``), only for one row of
bf16 times bf16 on an AVX2 (not AVX-512) build, and it wins inductor's ranking by dividing ``m = 1`` exactly.
The registry it joins (``cpp_micro_gemm.micro_gemm_configs``) is inductor's own, not a public API: when it
is missing, compiling falls back to the stock kernel.
"""

from __future__ import annotations

import contextlib

KERNEL = r"""
template <int64_t BLOCK_N, bool accum>
inline void {{kernel_name}}_row(
    const uint16_t* __restrict__ a, const uint16_t* __restrict__ B, float* __restrict__ C, int64_t K, int64_t ldb
) {
    constexpr int G = BLOCK_N / 16;  // groups of 16 columns: one load, an even and an odd accumulator each
    __m256 even[G], odd[G];
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int g = 0; g < G; ++g) {
        even[g] = _mm256_setzero_ps();
        odd[g] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; ++k) {
        const __m256 x = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(a[k]) << 16)));
        const uint16_t* b = B + k * ldb;
        for (int g = 0; g < G; ++g) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * g));
            even[g] = _mm256_fmadd_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), even[g]);
            odd[g] = _mm256_fmadd_ps(x, _mm256_castsi256_ps(_mm256_and_si256(w, high)), odd[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        // even = columns 0 2 4 6 | 8 10 12 14, odd = 1 3 5 7 | 9 11 13 15 (per 128-bit lane)
        const __m256 lo = _mm256_unpacklo_ps(even[g], odd[g]);  // 0 1 2 3 | 8 9 10 11
        const __m256 hi = _mm256_unpackhi_ps(even[g], odd[g]);  // 4 5 6 7 | 12 13 14 15
        __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20);
        __m256 second = _mm256_permute2f128_ps(lo, hi, 0x31);
        if constexpr (accum) {
            first = _mm256_add_ps(first, _mm256_loadu_ps(C + 16 * g));
            second = _mm256_add_ps(second, _mm256_loadu_ps(C + 16 * g + 8));
        }
        _mm256_storeu_ps(C + 16 * g, first);
        _mm256_storeu_ps(C + 16 * g + 8, second);
    }
}

{{declare_kernel}} {
    // row k of B holds the block's {{block_n}} columns at B + k * ldb; N is a multiple of {{block_n}}
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; n += {{block_n}}) {
            {{kernel_name}}_row<{{block_n}}, accum>(
                reinterpret_cast<const uint16_t*>(A + m * lda), reinterpret_cast<const uint16_t*>(B + n),
                C + m * ldc + n, K, ldb);
        }
    }
}
"""


def _micro_gemm_class():
    from torch._inductor.codegen.common import KernelTemplate
    from torch._inductor.codegen.cpp_micro_gemm import CppMicroGemm

    class OneRowBF16AVX2(CppMicroGemm):
        def codegen_define(self, kernel) -> str:
            options = {"declare_kernel": self.get_kernel_declaration(), "block_n": self.register_blocking.block_n,
                       **self.get_common_options()}
            return KernelTemplate._template_from_string(KERNEL).render(options)

    return OneRowBF16AVX2


def _cache_key_pass():
    """A pass that changes nothing but puts this kernel's source into inductor's FX graph cache key.

    The cache does not see the micro-kernel registry: without this, a graph compiled earlier with the stock
    kernel (or with an older version of this one) would be served from the cache, and this kernel's graphs
    to compiles made without it.
    """
    import hashlib

    from torch._inductor.custom_graph_pass import CustomGraphPass

    class KernelCacheKey(CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return "llamalab-one-row-bf16-avx2-" + hashlib.sha256(KERNEL.encode()).hexdigest()[:16]

    return KernelCacheKey()


def _one_row_on_avx2(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
    from torch._inductor.cpu_vec_isa import VecAVX2

    # whole blocks only: a weight the template did not pad (a batched product's) is never read past its end
    return (m == 1 and n % config.register_blocking.block_n == 0 and alpha == 1 and not kwargs.get("dynamic_M")
            and type(kwargs.get("vec_isa")) is VecAVX2)


@contextlib.contextmanager
def one_row_bf16_kernel():
    """Offer the one-row bf16 micro-kernel to inductor's CPU GEMM template inside this block."""
    try:
        import torch
        import torch._inductor.compile_fx  # noqa: F401  (inductor's own import order; its codegen alone is circular)
        import torch._inductor.config as inductor_config
        from torch._inductor.codegen import cpp_micro_gemm as registry
        from torch._inductor.cpu_vec_isa import VecAVX2

        cls = _micro_gemm_class()
        configs = registry.generate_gemm_config(VecAVX2, [(1, 64, 1), (1, 32, 1), (1, 16, 1)],
                                                input_dtype=torch.bfloat16, output_dtype=torch.float,
                                                extra_check=_one_row_on_avx2)
        cache_key = inductor_config.patch(post_grad_custom_post_pass=_cache_key_pass())
    except (ImportError, AttributeError, TypeError):  # inductor's internals moved: keep the stock kernel
        yield False
        return
    registry.micro_gemm_configs[cls] = configs
    try:
        with cache_key:
            yield True
    finally:
        registry.micro_gemm_configs.pop(cls, None)
