"""The C++ CPU kernels against xbit.format.reference_matmul: every SIMD path (forced in turn through
XBIT_CPU_ISA, skipped with the reason where this CPU lacks it), every bit depth alone and all mixed in one
layer, odd shapes, partial groups.

Tolerances, on ||y - y_ref|| / ||y_ref||: float32 1e-5 (observed ~4e-7: only the summation order differs);
bfloat16 2e-2 against the bf16 reference (which itself rounds the weights to bf16) and 5e-3 against the float32
reference on the same inputs (the kernel computes in float32 and rounds only the output).
The integer GEMVs (batch <= 4: avx512vnni at every depth, avx2int at 1, 2, 4 and 8 bits) quantize x to ~15 bits per
(row, group) (int16 split into two int8 halves for vpdpbusd / vpmaddubsw): float32 1e-4 there (observed 1.8e-5 to
3.2e-5 on these Gaussian inputs); batch > 4 runs the float GEMMs and keeps 1e-5.
"""

import functools

import pytest
import torch

import cpu_fallback as cf
from cpu_fallback._lib import ISAS as ALL_ISAS
from xbit.format import dequantize, reference_matmul
from xbit.modules import XbitLinear
from xbit.rtn import quantize_weight_rtn

OUT, IN = 97, 131
# columns per depth 0..8 of the mixed layer: segments of 1, 7 and 64 columns, 5 columns at 0 bits
MIXED = [5, 1, 7, 64, 20, 9, 10, 8, 7]
LAYOUTS = {f"u{b}": [IN if d == b else 0 for d in range(9)] for b in range(1, 9)} | {"mixed": MIXED}
ISAS = cf.supported_isas()
# every path, each skipped with its reason where this CPU (or the build) lacks it
ISA_PARAMS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in ISAS, reason=f"this CPU has no {isa} path "
                                                         f"(supported: {ISAS})")) for isa in ALL_ISAS]

needs_lib = pytest.mark.skipif(not cf.available()[0], reason=f"CPU kernels not built: {cf.available()[1]}")


@functools.lru_cache(maxsize=None)
def make_layer(layout: str, group_size: int, out: int = OUT, seed: int = 0) -> XbitLinear:
    g = torch.Generator().manual_seed(seed)
    bits = torch.cat([torch.full((c,), d, dtype=torch.uint8) for d, c in enumerate(LAYOUTS[layout])])
    bits = bits[torch.randperm(IN, generator=g)]  # depths scattered over the original columns
    perm = torch.argsort(-(bits.long() * 1000) + torch.randperm(IN, generator=g), stable=True)  # one run per depth
    weight = torch.randn(out, IN, generator=g)
    bias = torch.randn(out, generator=g)
    tensors = quantize_weight_rtn(weight, bits, perm, group_size)
    return XbitLinear.from_tensors(tensors, bias, group_size)


def reference(x, layer):
    return reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size,
                            layer.bias.to(x.dtype))


def rotated_layer_and_reference(batch: int):
    """A mixed-depth layer stored in a rotated basis (Hadamard blocks of 64), x [batch, 192], and the reference
    product (R^T x through xbit.rotation, then reference_matmul)."""
    from xbit.rotation import pack_signs, random_signs, rotate

    k, block, g = 192, 64, torch.Generator().manual_seed(5)
    bits = torch.tensor([2, 3, 4, 8], dtype=torch.uint8).repeat(k // 4)
    perm = torch.argsort(bits.long() * 1000 + torch.randperm(k, generator=g), stable=True)
    signs = random_signs(k, "layer", 0)
    tensors = quantize_weight_rtn(torch.randn(50, k, generator=g), bits, perm, 32)
    layer = XbitLinear.from_tensors({**tensors, "rot_signs": pack_signs(signs)}, None, 32, rotation_block=block)
    x = torch.randn(batch, k, generator=g)
    want = reference_matmul(rotate(x, signs, block), layer.qweight, layer.scales, layer.zeros, layer.perm,
                            layer.bits, 32)
    return layer, x, want


def rel_err(y, y_ref):
    return ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()


def f32_tol(isa: str, batch: int) -> float:
    return 1e-4 if isa in ("avx512vnni", "avx2int") and batch <= 4 else 1e-5


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group_size", [128, 32])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_matches_reference(monkeypatch, isa, layout, group_size, batch, threads):
    monkeypatch.setenv("XBIT_CPU_ISA", isa)
    monkeypatch.setenv("XBIT_CPU_THREADS", str(threads))
    layer = make_layer(layout, group_size)
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
    y = cf.CpuKernel.run(x, layer)
    assert y.dtype == torch.float32 and y.shape == (batch, OUT)
    assert rel_err(y, reference(x, layer)) < f32_tol(isa, batch)


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("layout", ["u1", "u3", "u8", "mixed"])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_bfloat16_matches_reference(isa, layout, batch):
    layer = make_layer(layout, 32)
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch)).bfloat16()
    y = cf.matmul(x, layer, threads=2, isa=isa)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference(x, layer)) < 2e-2
    assert rel_err(y, reference(x.float(), layer)) < 5e-3


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_large_batch_wide_layer_and_3d_input(isa):
    # 70 rows: more than one 64-row pass of the GEMM; 300 outputs: several column ranges plus a tail
    layer = make_layer("mixed", 32, out=300)
    x = torch.randn(2, 35, IN, generator=torch.Generator().manual_seed(7))
    y = cf.matmul(x, layer, threads=2, isa=isa)
    assert y.shape == (2, 35, 300)
    assert rel_err(y, reference(x, layer)) < 1e-5


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_gemv_wide_layer(isa, batch, group_size):
    # 300 outputs on 2 threads: two column ranges of full 16-column tiles plus a 12-column scalar tail; group
    # sizes 32 and 64 against the 1..64-column segments of the mixed layout (whole and partial groups)
    layer = make_layer("mixed", group_size, out=300)
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(11))
    y = cf.matmul(x, layer, threads=2, isa=isa)
    assert rel_err(y, reference(x, layer)) < f32_tol(isa, batch)


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_layer_rotates_x_in_the_kernel(isa, batch, dtype):
    """A layer stored in a rotated basis: the kernel computes R^T x (signs, blockwise fast Hadamard) itself."""
    layer, x, want = rotated_layer_and_reference(batch)
    y = cf.matmul(x.to(dtype), layer, threads=2, isa=isa)
    assert cf.CpuKernel.fuses_rotation and y.dtype == dtype
    assert rel_err(y, want) < (f32_tol(isa, batch) if dtype == torch.float32 else 5e-3)


@needs_lib
@pytest.mark.skipif("avx512vnni" not in ISAS, reason=f"this CPU has no avx512vnni path (supported: {ISAS})")
def test_vnni_is_the_default_where_supported_and_close_to_avx512():
    assert cf.best_isa() == "avx512vnni"
    layer = make_layer("mixed", 32, out=300)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(5))
    # the float path and the quantized-x path agree as closely as the quantization of x allows
    assert rel_err(cf.matmul(x, layer, isa="avx512vnni"), cf.matmul(x, layer, isa="avx512")) < 1e-4
    x[0, 3] = 0.0
    x[0, 7] = float("inf")  # non-finite x stays non-finite, as in the float paths
    assert not cf.matmul(x, layer, isa="avx512vnni").isfinite().all()


@needs_lib
@pytest.mark.skipif("avx2int" not in ISAS, reason=f"this CPU has no avx2int path (supported: {ISAS})")
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_avx2_integer_gemv_is_the_vnni_arithmetic_and_keeps_non_finite_x(batch):
    """At 1, 2, 4 and 8 bits the AVX2 GEMV multiplies the same ~15-bit quantized x by the codes in integers
    (vpmaddubsw) as the VNNI kernel does (vpdpbusd): where both run, bit-identical outputs; everywhere, within the
    quantization of x of the float kernel (and of the reference, test_float32_matches_reference)."""
    for layout in ("u1", "u2", "u4", "u8"):
        layer = make_layer(layout, 64, out=192)  # whole tiles of both kernels (tails take the float path)
        x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
        y = cf.matmul(x, layer, threads=2, isa="avx2int")
        assert 1e-7 < rel_err(y, reference(x, layer)) < 1e-4, layout  # not the float path: x was quantized
        if "avx512vnni" in ISAS:
            assert torch.equal(y, cf.matmul(x, layer, threads=2, isa="avx512vnni")), layout
        x[0, 7] = float("inf")
        assert not cf.matmul(x, layer, isa="avx2int")[0].isfinite().all()


@needs_lib
@pytest.mark.skipif("avx512vnni" not in ISAS, reason=f"this CPU has no avx512vnni path (supported: {ISAS})")
def test_vnni_groups_beyond_its_int32_bound_take_the_float_kernel():
    # group_size > 65536 could overflow the int32 accumulators: api.cpp gives such layers the float GEMV, which
    # shows as float32 accuracy
    layer = make_layer("mixed", 65536 + 32)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(3))
    assert rel_err(cf.matmul(x, layer, isa="avx512vnni"), reference(x, layer)) < 1e-5


@needs_lib
def test_scalar_path_forced(monkeypatch):
    monkeypatch.setenv("XBIT_CPU_ISA", "scalar")
    layer = make_layer("mixed", 128)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    assert rel_err(cf.CpuKernel.run(x, layer), reference(x, layer)) < 1e-5


@needs_lib
def test_bad_isa_names_the_choices(monkeypatch):
    monkeypatch.setenv("XBIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="XBIT_CPU_ISA"):
        cf.CpuKernel.run(torch.randn(1, IN), make_layer("u4", 32))
    missing = [isa for isa in ("avx2", "avx512", "avx512vnni") if isa not in ISAS]
    if missing:
        with pytest.raises(RuntimeError, match="does not support"):
            cf.matmul(torch.randn(1, IN), make_layer("u4", 32), isa=missing[0])


@needs_lib
def test_can_run_reasons():
    layer = make_layer("u4", 32)
    assert cf.CpuKernel.can_run(layer, torch.randn(2, IN)) == (True, "")
    assert cf.CpuKernel.can_run(layer, torch.randn(2, IN, dtype=torch.bfloat16))[0]
    ok, why = cf.CpuKernel.can_run(layer, torch.randn(2, IN).half())
    assert not ok and "dtype" in why


@needs_lib
def test_plan_follows_new_buffers():
    """The cached segment table is rebuilt when bits/perm are overwritten (load_state_dict)."""
    layer = XbitLinear.from_tensors(dict(make_layer("u4", 32).state_dict()), make_layer("u4", 32).bias.data, 32)
    x = torch.randn(3, IN)
    cf.CpuKernel.run(x, layer)
    other = make_layer("u4", 32, seed=1)
    layer.load_state_dict(other.state_dict())
    assert rel_err(cf.CpuKernel.run(x, layer), reference(x, other)) < f32_tol(cf.best_isa(), 3)


def test_missing_library_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cf, "_LIB", None)
    monkeypatch.setattr(cf, "_WHY", "no compiler (test)")
    monkeypatch.setattr(cf, "_warned", False)
    layer = make_layer("u2", 32)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert cf.CpuKernel.can_run(layer, torch.randn(1, IN)) == (False, "no compiler (test)")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cf.CpuKernel.can_run(layer, torch.randn(1, IN))[0]


def _layer_with(layout: str, tensor: str, index: int, value: int) -> XbitLinear:
    """A copy of a layer with one perm or bits entry overwritten in place, as a damaged checkpoint would leave it
    (bypassing the checks at load)."""
    src = make_layer(layout, 32)
    layer = XbitLinear.from_tensors({k: v.clone() for k, v in src.state_dict().items() if k != "bias"},
                                    src.bias.data, 32)
    getattr(layer, tensor)[index] = int(src.perm[3]) if value == "perm[3]" else value
    return layer


@needs_lib
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("layout, tensor, index, value, message", [
    ("u4", "perm", 0, -1, r"perm\[0\] is -1, outside 0\.\.130"),  # one segment: used to read x[-1]
    ("u4", "perm", 7, IN, r"perm\[7\] is 131, outside 0\.\.130"),
    ("mixed", "perm", 9, -30_000, r"perm\[9\] is -30000, outside"),
    ("u4", "perm", 4, "perm[3]", r"perm\[4\] repeats column"),  # used to run, silently wrong
    ("mixed", "bits", 5, 9, r"bits\[5\] is 9, outside 0\.\.8"),
])
def test_kernel_refuses_indices_outside_the_layer(isa, layout, tensor, index, value, message):
    """The C++ plan checks every perm entry and bit depth once per layer: an entry outside the layer raises
    instead of reading outside x (a negative perm entry gave different results from call to call)."""
    layer = _layer_with(layout, tensor, index, value)
    with pytest.raises(ValueError, match=message):
        cf.matmul(torch.randn(2, IN), layer, threads=1, isa=isa)


@needs_lib
def test_buffers_replaced_after_the_plan_are_checked_again():
    layer = _layer_with("mixed", "bits", 0, int(make_layer("mixed", 32).bits[0]))  # an intact copy
    x = torch.randn(2, IN)
    cf.matmul(x, layer)
    layer.qweight = layer.qweight[:-3].clone()  # fewer words than the segment table indexes
    with pytest.raises(ValueError, match="layer buffers do not match"):
        cf.matmul(x, layer)


@needs_lib
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group_size", [128, 32])
def test_dequantize_is_the_reference_to_the_bit(layout, group_size):
    layer = make_layer(layout, group_size)
    want = dequantize(layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size)
    assert torch.equal(cf.dequantize(layer, threads=2), want)
    assert torch.equal(cf.dequantize(layer, slice(10, 60), threads=1), want[10:60])
    rows = torch.tensor([96, 3, 3, 0, 50])  # any order, repeats (an embedding's lookups)
    assert torch.equal(cf.dequantize(layer, rows), want[rows])
    with pytest.raises(IndexError, match="rows outside 0..96"):
        cf.dequantize(layer, torch.tensor([97]))


@needs_lib
@pytest.mark.parametrize("layout", ["mixed", "u3", "u8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_dequantize_and_blas(monkeypatch, layout, dtype):
    # from GEMM_ROWS rows up (no ISA forced): the weight dequantized DEQUANT_CHUNK weights of rows at a time
    monkeypatch.delenv("XBIT_CPU_ISA", raising=False)
    monkeypatch.setattr(cf, "DEQUANT_CHUNK", 40 * IN)  # 3 chunks of 40, 40 and 17 rows
    layer = make_layer(layout, 32)
    calls = []
    monkeypatch.setattr(cf._LIB, "xbit_cpu_matmul", lambda *a: calls.append(a))  # the packed kernel must not run
    x = torch.randn(2, cf.GEMM_ROWS // 2 + 1, IN, generator=torch.Generator().manual_seed(1))
    y = cf.matmul(x.to(dtype), layer)
    assert not calls and y.dtype == dtype and y.shape == (2, cf.GEMM_ROWS // 2 + 1, OUT)
    assert rel_err(y, reference(x, layer)) < (1e-6 if dtype == torch.float32 else 5e-3)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_of_a_rotated_layer_rotate_x_first(monkeypatch, dtype):
    monkeypatch.delenv("XBIT_CPU_ISA", raising=False)
    layer, x, want = rotated_layer_and_reference(cf.GEMM_ROWS)
    assert rel_err(cf.matmul(x.to(dtype), layer), want) < (1e-6 if dtype == torch.float32 else 5e-3)


@needs_lib
def test_blas_path_forced_for_a_small_batch(monkeypatch):
    layer = make_layer("mixed", 32)
    monkeypatch.setattr(cf._LIB, "xbit_cpu_matmul", lambda *a: pytest.fail("the packed kernel ran"))
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(3))
    assert rel_err(cf.matmul(x, layer, isa=cf.BLAS), reference(x, layer)) < 1e-6
    monkeypatch.setenv("XBIT_CPU_ISA", cf.BLAS)
    assert rel_err(cf.CpuKernel.run(x, layer), reference(x, layer)) < 1e-6
