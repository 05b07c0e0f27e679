"""llamalab's AVX2 row micro-kernels inside inductor's GEMM template, where inductor emits AVX2 code.

On an AVX-512 CPU inductor emits AVX-512 code and the backend leaves the kernels out (``test_fast.py``), so this
module makes inductor emit AVX2 code with PyTorch's public switch, ``ATEN_CPU_CAPABILITY=avx2`` (read by inductor
at each compile; eager kernels keep the capability the process started with). On an AVX2-only CPU the switch
changes nothing: the same tests run on what that CPU does by default.
"""

from __future__ import annotations

import pytest
import torch
from decode_helpers import copy_model, decode_logits

from llamalab.hardware import cpu_flags
from llamalab.inference.backend import accelerate
from llamalab.inference.backend.row_kernels import inductor_emits_avx2, row_kernels
from llamalab.inference.quantize import Int8Linear

pytestmark = pytest.mark.skipif("avx2" not in cpu_flags(), reason="the row kernels are AVX2 code")


@pytest.fixture(scope="module", autouse=True)
def avx2_code():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ATEN_CPU_CAPABILITY", "avx2")
        assert inductor_emits_avx2()
        yield


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 1024, 288), (1, 96, 176), (3, 1024, 288),
                                                           (8, 160, 176), (8, 96, 176), (7, 96, 176), (32, 864, 288)])
def test_row_kernels_are_chosen_and_exact(weights, rows, out_features, in_features):
    """Inductor takes the one-row kernel for one row; for more rows of bf16 weights the 4x24 block where 24
    divides N and the two-row one (with a one-row tail) otherwise, the stock kernel for int8; the product
    equals fp32 math rounded to bf16 (relative 2^-7)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import fresh_cache, run_and_get_code

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin) if weights == "int8" else lin
    settings = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP")
    with fresh_cache(), row_kernels(), inductor_config.patch(settings), torch.no_grad():
        y, (code, *_) = run_and_get_code(torch.compile(layer, dynamic=False), x)
    assert ("_rows<1, " in code) == (rows == 1 or weights == "bf16")  # a block's last rows are its tail cases
    block = None if rows == 1 or weights == "int8" else "4, 24" if out_features % 24 == 0 else "2, 32"
    assert [b for b in ("4, 24", "2, 32") if f"_rows<{b}, accum>" in code] == ([block] if block else [])
    if weights == "int8":
        ref = (x.float() @ layer.weight.float().T) * layer.scales.float()
    else:
        ref = x.float() @ lin.weight.float().T
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)


def test_compiled_decode_with_the_row_kernels_matches_the_reference(one_layer):
    """The backend says the kernels are on, a compiled batched bf16 step uses them (the 4x24 block where 24
    divides the width, the 2x32 one elsewhere), and its logits stay within bf16 tolerance of the fp32 model's."""
    from torch._inductor.utils import run_and_get_code

    bf16 = accelerate(copy_model(one_layer, torch.bfloat16), compile=True)
    assert bf16.row_kernels and "row kernels on (inductor emits AVX2 code)" in bf16.describe()
    tokens = torch.randint(0, one_layer.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(one_layer, tokens, 4)
    logits, code = run_and_get_code(decode_logits, bf16, tokens, 4)
    assert all(f"_rows<{block}, accum>" in "".join(code) for block in ("4, 24", "2, 32"))
    assert (logits - ref).abs().max() <= 0.03 * ref.std()
