"""Row micro-kernels for inductor's CPU GEMM template on AVX2: bf16 and int8 weights, bf16 activations.

Decoding multiplies one row (a token) by every weight matrix, so its speed is how fast the weights stream.
Inductor's AVX2 micro-kernels are built for several rows. At one row its bf16 kernel keeps two fp32
accumulators (one FMA chain per 8 columns, each waiting on the last) and loads every 8 bf16 weights through
``Vectorized<BFloat16>::loadu(ptr, count)``, a copy through a zeroed stack buffer: decoding ``stories15m`` in
bf16 read the output layer at 10-13 GB/s, slower than the same layer in fp32.

These kernels take a block of ``ROWS`` rows and ``BLOCK_N`` columns and give every 8 columns of every row their
own accumulator, so ``ROWS * BLOCK_N / 8`` independent FMA chains run; each load of weights serves every row:
- bf16, blocks of 16, 32 or 64 columns: each 16 weights are one 32-byte load, split into the even and odd columns as fp32
  by a shift and a mask (a bf16 is the high half of an fp32); the halves are put back in column order once per
  block, at the store.
- bf16, blocks of 24 columns (4 rows, 12 accumulators): each 8 weights are widened by one load-and-extend and a
  shift.
- int8: each 8 weights are widened to int32 by one load-and-extend and converted to fp32; the per-channel
  scales stay the template's epilogue.
Products are summed in fp32 in k order, as the stock kernels do.

They are offered to inductor only while a decode step compiles (``row_kernels``), where inductor emits AVX2 code
(not AVX-512: there the backend leaves inductor's own micro-kernels, AMX ones among them, in place), for bf16
activations and whole blocks: one-row blocks (``ONE_ROW_BLOCKS``) for one row, and blocks of
bf16 weights for several rows (``MULTI_ROW_BLOCKS``) for batched decoding. They are listed ahead of inductor's
stock blocks, whose ranking keeps the first of equals: one-row blocks win by dividing ``m = 1``, the 4×24 block
ties the stock 4×24 one, and the 2×32 block wins where 24 does not divide the width (the 32000-wide output
layer). The registry they join (``cpp_micro_gemm.micro_gemm_configs``) is inductor's own, not a public API
(``torch_internals`` checks it is there).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from .cache_key import cache_key_pass
from .torch_internals import internals

KERNEL = r"""
inline __m256 {{kernel_name}}_broadcast(uint16_t bf16) {  // one bf16 as fp32 in all 8 lanes
    return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(bf16) << 16)));
}

template <int ROWS, int64_t BLOCK_N, bool accum>
inline void {{kernel_name}}_rows(
    const uint16_t* __restrict__ A, int64_t lda, const {{weight_t}}* __restrict__ B, int64_t ldb,
    float* __restrict__ C, int64_t ldc, int64_t K
) {
{%- if int8_weights or block_n % 16 %}
    constexpr int G = BLOCK_N / 8;  // groups of 8 columns: 8 weights widened to fp32, one accumulator per row
    __m256 acc[ROWS][G];
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m256 x[ROWS];
        for (int r = 0; r < ROWS; ++r) x[r] = {{kernel_name}}_broadcast(A[r * lda + k]);
        const {{weight_t}}* b = B + k * ldb;
        for (int g = 0; g < G; ++g) {
{%- if int8_weights %}
            const __m256 w = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * g))));
{%- else %}
            const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 * g))), 16));
{%- endif %}
            for (int r = 0; r < ROWS; ++r) acc[r][g] = _mm256_fmadd_ps(x[r], w, acc[r][g]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) {
            __m256 out = acc[r][g];
            if constexpr (accum) out = _mm256_add_ps(out, _mm256_loadu_ps(C + r * ldc + 8 * g));
            _mm256_storeu_ps(C + r * ldc + 8 * g, out);
        }
{%- else %}
    constexpr int G = BLOCK_N / 16;  // groups of 16 columns: one load, an even and an odd accumulator per row
    __m256 even[ROWS][G], odd[ROWS][G];
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) {
            even[r][g] = _mm256_setzero_ps();
            odd[r][g] = _mm256_setzero_ps();
        }
    for (int64_t k = 0; k < K; ++k) {
        __m256 x[ROWS];
        for (int r = 0; r < ROWS; ++r) x[r] = {{kernel_name}}_broadcast(A[r * lda + k]);
        const uint16_t* b = B + k * ldb;
        for (int g = 0; g < G; ++g) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * g));
            const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
            for (int r = 0; r < ROWS; ++r) {
                even[r][g] = _mm256_fmadd_ps(x[r], w_even, even[r][g]);
                odd[r][g] = _mm256_fmadd_ps(x[r], w_odd, odd[r][g]);
            }
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) {
            // even = columns 0 2 4 6 | 8 10 12 14, odd = 1 3 5 7 | 9 11 13 15 (per 128-bit lane)
            const __m256 lo = _mm256_unpacklo_ps(even[r][g], odd[r][g]);  // 0 1 2 3 | 8 9 10 11
            const __m256 hi = _mm256_unpackhi_ps(even[r][g], odd[r][g]);  // 4 5 6 7 | 12 13 14 15
            __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20);
            __m256 second = _mm256_permute2f128_ps(lo, hi, 0x31);
            float* c = C + r * ldc + 16 * g;
            if constexpr (accum) {
                first = _mm256_add_ps(first, _mm256_loadu_ps(c));
                second = _mm256_add_ps(second, _mm256_loadu_ps(c + 8));
            }
            _mm256_storeu_ps(c, first);
            _mm256_storeu_ps(c + 8, second);
        }
{%- endif %}
}

{{declare_kernel}} {
    // row m of A at A + m * lda; row k of B holds the block's columns at B + k * ldb; N is a multiple of {{block_n}}
    const uint16_t* a = reinterpret_cast<const uint16_t*>(A);
    const {{weight_t}}* b = reinterpret_cast<const {{weight_t}}*>(B);
    for (int64_t m = 0; m < M; m += {{block_m}}) {
        for (int64_t n = 0; n < N; n += {{block_n}}) {
            switch (std::min<int64_t>({{block_m}}, M - m)) {
{%- for rows in range(block_m, 0, -1) %}
            case {{rows}}:
                {{kernel_name}}_rows<{{rows}}, {{block_n}}, accum>(a + m * lda, lda, b + n, ldb, C + m * ldc + n, ldc, K);
                break;
{%- endfor %}
            }
        }
    }
}
"""


def inductor_emits_avx2() -> bool:
    """Whether inductor generates AVX2 code here, the ISA the kernels are written for (``ATEN_CPU_CAPABILITY=avx2``
    makes it do so on an AVX-512 CPU)."""
    private = internals()
    return type(private.pick_vec_isa()) is private.VecAVX2


def inductor_isa() -> str:
    """The instruction sets inductor generates CPU code for here, e.g. ``avx2`` or ``avx512 avx512_vnni amx_tile``."""
    return str(internals().pick_vec_isa())


def _micro_gemm_class():
    private = internals()

    class RowBlocksAVX2(private.CppMicroGemm):
        def codegen_define(self, kernel) -> str:
            int8_weights = self.input2_dtype == torch.int8
            options = {"declare_kernel": self.get_kernel_declaration(), "block_m": self.register_blocking.block_m,
                       "block_n": self.register_blocking.block_n,
                       "int8_weights": int8_weights, "weight_t": "int8_t" if int8_weights else "uint16_t",
                       **self.get_common_options()}
            return private.render_template(KERNEL).render(options)

    return RowBlocksAVX2


ONE_ROW_BLOCKS = [(1, 64, 1), (1, 32, 1), (1, 16, 1)]  # (rows, columns, k) register blocks, for m = 1
MULTI_ROW_BLOCKS = {torch.bfloat16: [(4, 24, 1), (2, 32, 1)]}  # for m > 1 (batched decode), by weight dtype


def _cache_key_pass():
    """Put the kernels' source and blocks into inductor's FX graph cache key (``cache_key``): without it, a graph
    compiled earlier with the stock kernels (or an older version of these) would be served from the cache, and
    these kernels' graphs to compiles made without them."""
    source = KERNEL + repr((ONE_ROW_BLOCKS, sorted((str(k), v) for k, v in MULTI_ROW_BLOCKS.items())))
    return cache_key_pass("llamalab-row-avx2-" + hashlib.sha256(source.encode()).hexdigest()[:16])


def _whole_blocks_on_avx2(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
    # whole blocks only: a weight the template did not pad (a batched product's) is never read past its end
    one_row = config.register_blocking.block_m == 1
    return ((m == 1) == one_row and n % config.register_blocking.block_n == 0 and alpha == 1
            and not kwargs.get("dynamic_M") and type(kwargs.get("vec_isa")) is internals().VecAVX2)


@contextlib.contextmanager
def row_kernels():
    """Offer the bf16 and int8 micro-kernels (one row; several rows for bf16 weights) to inductor's CPU GEMM
    template inside this block."""
    private = internals()
    cls = _micro_gemm_class()
    configs = [config for weights in (torch.bfloat16, torch.int8)
               for config in private.generate_gemm_config(
                   private.VecAVX2, ONE_ROW_BLOCKS + MULTI_ROW_BLOCKS.get(weights, []), input_dtype=torch.bfloat16,
                   input2_dtype=weights, output_dtype=torch.float, compute_dtype=torch.float,
                   extra_check=_whole_blocks_on_avx2)]
    registry = private.micro_gemm_configs
    stock = dict(registry)
    registry.clear()  # ours first: inductor keeps the first of equally ranked blocks
    registry.update({cls: configs, **stock})
    try:
        with private.inductor_config.patch(post_grad_custom_post_pass=_cache_key_pass()):
            yield
    finally:
        registry.clear()
        registry.update(stock)
