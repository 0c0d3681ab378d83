"""The compiled Triton kernels on a CUDA GPU against `xbit.format.reference_matmul` (skipped without one).

Every depth alone, mixed segments with odd column counts, a 576-wide layer (partial groups), real model shapes,
batches 1, 7, 16 and 64 (GEMV, split-K tl.dot, GEMM), float16 and bfloat16. Run in a fresh process without
TRITON_INTERPRET (tests/conftest.py sets it for the interpreter tests): TRITON_INTERPRET=0 pytest this file.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    pytest.skip("compiled kernels: run with TRITON_INTERPRET=0", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

import triton_kernels  # noqa: E402
from xbit.format import reference_matmul  # noqa: E402
from xbit.modules import XbitLinear  # noqa: E402
from xbit.rtn import quantize_weight_rtn  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_layer(out: int, counts: list[int], group_size: int = 128, seed: int = 0) -> XbitLinear:
    g = torch.Generator().manual_seed(seed)
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in enumerate(counts)])
    n = bits.numel()
    bits = bits[torch.randperm(n, generator=g)]
    shuffle = torch.randperm(n, generator=g)
    perm = shuffle[torch.argsort(-bits[shuffle].long(), stable=True)]
    t = quantize_weight_rtn(torch.randn(out, n, generator=g), bits, perm, group_size)
    return XbitLinear.from_tensors({k: v.cuda() for k, v in t.items()}, torch.randn(out, generator=g).half().cuda(),
                                   group_size)


def check(layer, m: int, dtype):
    x = torch.randn(m, layer.in_features, device="cuda", dtype=dtype)
    ok, why = triton_kernels.TritonKernel.can_run(layer, x)
    assert ok, why
    y = triton_kernels.TritonKernel.run(x, layer)
    bias = layer.bias.to(dtype)
    ref = reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size, bias)
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * ref.float().abs().max().item(), f"max err {err:.3g}"


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("m", [1, 7, 16, 64])
def test_each_depth(bits, m):
    counts = [0] * 9
    counts[bits] = 1000
    check(make_layer(333, counts, seed=bits), m, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 64])
def test_mixed_odd(dtype, m):
    check(make_layer(97, [3, 33, 5, 40, 9, 64, 1, 31, 390], group_size=64), m, dtype)
    check(make_layer(576, [0, 0, 100, 300, 176, 0, 0, 0, 0], group_size=128), m, dtype)  # partial groups


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (1536, 8960)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_real_shapes(shape, m):
    out, k = shape
    counts = [0, k // 8, 3 * k // 8, 3 * k // 8, 0, 0, 0, 0, 0]
    counts[4] = k - sum(counts)
    check(make_layer(out, counts), m, torch.float16)
