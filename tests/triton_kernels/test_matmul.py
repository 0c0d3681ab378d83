"""The Triton x-bit kernel against `xbit.format.reference_matmul`, on the CPU through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (triton reads it at import); this
module also sets XBIT_TRITON_CPU=1 while its tests run, so that only here CPU tensors go to the interpreter and
other test modules keep dispatching them to the CPU kernels.
"""

import os
import subprocess
import sys

import pytest
import torch

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    if "triton_kernels.matmul" in sys.modules and not sys.modules["triton_kernels.matmul"].INTERPRET:
        pytest.skip("triton_kernels.matmul was imported for the GPU before this module", allow_module_level=True)
    import triton_kernels
    from triton_kernels import matmul as tkm
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from xbit.format import reference_matmul, segments_of  # noqa: E402
from xbit.modules import XbitLinear  # noqa: E402
from xbit.rtn import quantize_weight_rtn  # noqa: E402

# max |kernel - reference| allowed, relative to max |reference|: the kernel accumulates in fp32 and rounds once,
# the reference (dequantize to x's dtype, then F.linear) rounds its own way; one or two output ulps apart.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("XBIT_TRITON_CPU", "1")


def make_layer(out: int, counts: list[int], group_size: int, bias: bool = False, seed: int = 0) -> XbitLinear:
    """A random RTN layer with counts[b] columns at b bits, columns shuffled, perm making one run per depth."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in enumerate(counts)])
    n = bits.numel()
    bits = bits[torch.randperm(n, generator=g)]
    perm = torch.argsort(-(bits.long() * 1000) + torch.randperm(n, generator=g), stable=True)
    weight = torch.randn(out, n, generator=g)
    t = quantize_weight_rtn(weight, bits, perm, group_size)
    b = torch.randn(out, generator=g).half() if bias else None
    return XbitLinear.from_tensors(t, b, group_size)


def reference(x, layer):
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size, bias)


def run_poisoned(x, layer, config=None):
    """The kernel writing into an output filled with NaN: any element it does not write fails the comparison."""
    perm, table, key = triton_kernels._layer_meta(layer)
    out = torch.full((*x.shape[:-1], layer.out_features), float("nan"), dtype=x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    y = tkm.launch(x, layer.qweight, layer.scales, layer.zeros, perm, table, layer.group_size, bias, key, out=out,
                   config=config)
    assert y is out
    return y


def check(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(ref).all(), "reference must be finite for the comparison to mean anything"
    assert torch.isfinite(y).all(), "unwritten (NaN) or overflowed output elements"
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


ODD = [59, 1, 0, 7, 0, 0, 64, 0, 0]  # in = 131: 0-bit columns and segments of 1, 7 and 64 columns


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("m", [1, 3, 17])
def test_each_depth_alone(bits, m):
    counts = [0] * 9
    counts[bits] = 131
    layer = make_layer(97, counts, group_size=32, seed=bits)
    x = torch.randn(m, 131, generator=torch.Generator().manual_seed(m)).half()
    check(run_poisoned(x, layer), reference(x, layer), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_odd_mixed_layer(dtype, m, bias):
    layer = make_layer(97, ODD, group_size=32, bias=bias, seed=1)
    x = torch.randn(m, 131, generator=torch.Generator().manual_seed(m)).to(dtype)
    check(run_poisoned(x, layer), reference(x, layer), dtype)


# every depth in one layer; group sizes that hold whole tiles, whole 32-column blocks, or neither (48: scale and
# zero per code); split-K runs that start inside segments, more splits than tiles; GEMV (M == 1, no BLOCK_M),
# decode tl.dot tiles and GEMM tiles
CONFIGS = [
    dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=3),
    dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=16),
    dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=5),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1),
]
ALL = [3, 33, 5, 40, 9, 64, 1, 31, 20]  # in = 206, every depth 1..8, odd column counts


def _cfg_id(c):
    return ("m{BLOCK_M}".format(**c) if "BLOCK_M" in c else "gemv") + "n{BLOCK_N}k{BLOCK_K}s{SPLIT_K}".format(**c)


@pytest.mark.parametrize("config", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("group_size", [48, 64, 128])
def test_all_depths_configs(config, group_size):
    layer = make_layer(70, ALL, group_size=group_size, bias=True, seed=group_size)
    m = 1 if "BLOCK_M" not in config else 3 if config["SPLIT_K"] > 1 else 20
    x = torch.randn(m, 206, generator=torch.Generator().manual_seed(7)).half()
    check(run_poisoned(x, layer, config=config), reference(x, layer), torch.float16)


@pytest.mark.parametrize("m", [1, 17])
def test_only_zero_bit_columns(m):
    # built directly: xbit.format.assemble cannot tell `out` when no segment has codes (scales [0, 0])
    layer = XbitLinear(40, 33, [40, 0, 0, 0, 0, 0, 0, 0, 0], group_size=32, bias=True)
    layer.perm.copy_(torch.randperm(40))
    layer.bias.data.normal_()
    x = torch.randn(m, 40).half()
    check(run_poisoned(x, layer), reference(x, layer), torch.float16)


def test_segment_table_matches_format():
    layer = make_layer(8, ALL, group_size=48)
    table = triton_kernels.segment_table(layer.bits, layer.perm, 48).tolist()
    segs = {s.bits: s for s in segments_of(layer.bits, layer.perm, 48)}
    for b, start, cols, word_start, group_start in table:
        s = segs[b]
        assert (start, cols, word_start, group_start) == (s.start, s.cols, s.word_start, s.group_start)


def test_dispatch_kernel_3d_and_noncontiguous():
    layer = make_layer(97, ODD, group_size=32, bias=True, seed=3)
    ok, why = triton_kernels.TritonKernel.can_run(layer, torch.zeros(1, 131, dtype=torch.float16))
    assert ok, why
    x = torch.randn(2, 262, 3).half().transpose(1, 2)[:, :, ::2]  # [2, 3, 131], not contiguous
    y = triton_kernels.TritonKernel.run(x, layer)
    check(y, reference(x, layer), torch.float16)
    x1 = torch.randn(1, 131).half()  # decode path through the op
    check(triton_kernels.TritonKernel.run(x1, layer), reference(x1, layer), torch.float16)


def test_can_run_reasons(monkeypatch):
    layer = make_layer(16, [0, 0, 0, 32, 0, 0, 0, 0, 0], group_size=32)
    ok, why = triton_kernels.TritonKernel.can_run(layer, torch.zeros(1, 32, dtype=torch.float64))
    assert not ok and "dtype" in why
    ok, why = triton_kernels.TritonKernel.can_run(layer, torch.zeros(1, 31, dtype=torch.float16))
    assert not ok and "features" in why
    monkeypatch.delenv("XBIT_TRITON_CPU")
    ok, why = triton_kernels.TritonKernel.can_run(layer, torch.zeros(1, 32, dtype=torch.float16))
    assert not ok and "CUDA" in why


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, triton_kernels\n"
            "class L: pass\n"
            "ok, why = triton_kernels.TritonKernel.can_run(L(), torch.zeros(1))\n"
            "assert not ok and 'triton' in why, why\n"
            "print(why)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_custom_op_fake_and_compile():
    layer = make_layer(40, [5, 0, 20, 17, 0, 0, 0, 0, 0], group_size=16, bias=True, seed=5)
    perm, table, key = triton_kernels._layer_meta(layer)
    x = torch.randn(3, 42).half()
    args = (x, layer.qweight, layer.scales, layer.zeros, perm, table, layer.bias, layer.group_size, key)
    torch.library.opcheck(torch.ops.xbit.triton_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def f(x, qweight, scales, zeros, perm, table, bias):
        return torch.ops.xbit.triton_matmul(x * 2, qweight, scales, zeros, perm, table, bias, layer.group_size, key)

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*args[:7])
    check(y, reference(2 * x, layer), torch.float16)


def test_torch_compile_dispatch_kernel():
    layer = make_layer(97, ODD, group_size=32, bias=True, seed=4)
    x = torch.randn(3, 131).half()
    for warm in (False, True):  # table computed inside the graph, or taken from the eager cache
        layer.__dict__.pop("_xbit_triton_meta", None)
        if warm:
            triton_kernels.TritonKernel.run(x, layer)
        torch._dynamo.reset()
        f = torch.compile(lambda x: triton_kernels.TritonKernel.run(x, layer), backend="aot_eager", fullgraph=True)
        check(f(x), reference(x, layer), torch.float16)
