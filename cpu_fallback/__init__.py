"""CPU kernel for x-bit linears: C++/OpenMP SIMD (AVX-512 VNNI, AVX-512, AVX2+FMA, scalar) through ctypes.

`CpuKernel` follows the xbit.dispatch interface. Environment:
  XBIT_CPU_ISA=scalar|avx2|avx2int|avx512|avx512vnni   force a code path (default: the best the CPU supports;
                                    avx512vnni and avx2int quantize x to ~15 bits per group for batches of 1..4 rows
                                    and multiply in integers, see csrc/kernel_avx512vnni.cpp, csrc/kernel_avx2.cpp;
                                    avx512 and avx2 are their float paths)
  XBIT_CPU_THREADS=N                OpenMP threads (default: torch.get_num_threads(), 1 for tiny products)
From GEMM_ROWS activation rows up (prefill, perplexity), unless an ISA is forced, a product dequantizes the weight
(`dequantize`, a chunk of output rows at a time) and multiplies with torch's BLAS instead (XBIT_CPU_ISA=blas
forces that path for any batch).
Imports nothing of xbit: a layer is anything with the XbitLinear buffers (qweight, scales, zeros, perm, bits,
group_size, bias; a layer stored in a rotated basis also has rotation_block and signs()).
"""

import os
import warnings

import torch
import torch.nn.functional as F

from ._lib import ISAS, load

BLOCK = 32
# activation rows from which dequantizing the weight once and calling torch's BLAS beats the packed kernel (whose
# GEMM decodes every code again per tile of rows): ~700 on Qwen2.5-1.5B's layers, ~200-400 on SmolLM2's, 2 AVX-512
# cores (docs/BENCHMARKS.md); at 1024 BLAS was 1.2-1.45x faster on every shape measured
GEMM_ROWS = 1024
BLAS = "blas"  # the name (XBIT_CPU_ISA, isa=) that forces dequantize + torch's BLAS whatever the rows
DEQUANT_CHUNK = 1 << 24  # weights dequantized at a time for one product (64 MB of float32)
_LIB, _WHY = load()
_warned = False
# the CPU's features do not change: ask once (a per-call ctypes round trip costs ~2 us of a batch-1 call)
_SUPPORTED = {name: code for name, code in ISAS.items() if _LIB is not None and _LIB.xbit_cpu_isa_supported(code)}
_BEST = {v: k for k, v in ISAS.items()}[_LIB.xbit_cpu_best_isa()] if _LIB is not None else None


def available() -> tuple[bool, str]:
    return _LIB is not None, _WHY


def best_isa() -> str:
    if _LIB is None:
        raise RuntimeError(_WHY)
    return _BEST


def supported_isas() -> list[str]:
    return list(_SUPPORTED)  # empty without the library


def _isa(isa: str | None) -> int:
    name = isa or os.environ.get("XBIT_CPU_ISA") or best_isa()
    if name in _SUPPORTED:
        return _SUPPORTED[name]
    if name not in ISAS:
        raise ValueError(f"XBIT_CPU_ISA must be one of {sorted(ISAS)}, got {name!r}")
    raise RuntimeError(f"this CPU does not support the {name} path (supported: {supported_isas()})")


def _threads(threads: int | None, work: int) -> int:
    """Explicit argument, then XBIT_CPU_THREADS, then torch's count; tiny products stay on one thread by default
    because an OpenMP fork/join costs more than they do."""
    if threads or os.environ.get("XBIT_CPU_THREADS"):
        return int(threads or os.environ["XBIT_CPU_THREADS"])
    return 1 if work < (1 << 18) else torch.get_num_threads()


class _Plan:
    """What the kernel needs besides the buffers, computed once per layer: the segment table. Built in C++
    (xbit_cpu_plan), which checks every perm entry and bit depth the kernel will index with, so that a damaged
    layer raises here instead of reading outside x."""

    def __init__(self, layer):
        k, g = layer.bits.numel(), layer.group_size
        bits = layer.bits.to(torch.uint8).contiguous()  # the buffer is uint8 already
        self.perm = layer.perm.to(torch.int32).contiguous()
        segs = torch.zeros(9, 6, dtype=torch.int32)
        info = torch.zeros(5, dtype=torch.int64)  # nseg, words, groups, Kp; the position at fault on error
        rc = _LIB.xbit_cpu_plan(bits.data_ptr(), self.perm.data_ptr(), k, g, segs.data_ptr(), info.data_ptr())
        if rc != 0:
            raise ValueError(f"xbit CPU kernel: invalid layer: {_plan_error(rc, int(info[4]), bits, self.perm, g)}")
        nseg, word, group, self.kp, _ = info.tolist()
        self.key = _key(layer)
        self.segs = segs[:nseg].contiguous()
        if word != layer.qweight.shape[0] or group != layer.scales.shape[0]:
            raise ValueError(f"layer buffers do not match its bits/perm: {word} words and {group} groups expected, "
                             f"got qweight {tuple(layer.qweight.shape)} and scales {tuple(layer.scales.shape)}")


def _plan_error(rc: int, i: int, bits: torch.Tensor, perm: torch.Tensor, group_size: int) -> str:
    k = bits.numel()
    if rc == -10:
        return f"perm[{i}] is {int(perm[i])}, outside 0..{k - 1}"
    if rc == -11:
        return f"perm[{i}] repeats column {int(perm[i])} (perm must be a permutation of 0..{k - 1})"
    if rc == -12:
        return f"bits[{i}] is {int(bits[i])}, outside 0..8"
    if rc == -13:
        return f"bit depth {int(bits[perm[i]])} forms a second segment at storage position {i}"
    return f"group_size {group_size} (xbit_cpu_plan returned {rc})"


def _key(layer):  # a new plan whenever bits or perm are replaced or written in place (load_state_dict), or the
    # buffers it was checked against change shape
    return (layer.bits.data_ptr(), layer.bits._version, layer.perm.data_ptr(), layer.perm._version, layer.group_size,
            layer.qweight.shape, layer.scales.shape)


def _plan(layer) -> _Plan:
    plan = getattr(layer, "_xbit_cpu_plan", None)
    if plan is None or plan.key != _key(layer):
        plan = _Plan(layer)
        layer._xbit_cpu_plan = plan
    return plan


def dequantize(layer, rows: slice | torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """The layer's weight as float32 [out, in] in the original column order (0-bit columns 0), or the output rows
    `rows` (a slice, or an index tensor) of it: the numbers of xbit.format.dequantize, to the bit."""
    if _LIB is None:
        raise RuntimeError(_WHY)
    plan = _plan(layer)
    k, n = layer.bits.numel(), layer.scales.shape[1]
    if rows is None or isinstance(rows, slice):
        rows = torch.arange(n)[rows or slice(None)]
    rows = rows.to(torch.int64).contiguous()
    out = torch.empty(rows.numel(), k, dtype=torch.float32)
    qweight, scales, zeros = (t.contiguous() for t in (layer.qweight, layer.scales, layer.zeros))
    rc = _LIB.xbit_cpu_dequantize(
        _threads(threads, out.numel() * 64), k, plan.perm.data_ptr(), qweight.data_ptr(), qweight.shape[0],
        scales.data_ptr(), zeros.data_ptr(), n, plan.segs.data_ptr(), plan.segs.shape[0], layer.group_size,
        scales.shape[0], plan.kp, rows.data_ptr(), rows.numel(), out.data_ptr())
    if rc == -6:
        raise IndexError(f"dequantize: rows outside 0..{n - 1}")
    if rc != 0:
        raise RuntimeError(f"xbit_cpu_dequantize failed with code {rc}")
    return out


def _gemm(x2: torch.Tensor, layer, threads: int | None) -> torch.Tensor:
    """x2 [M, K] @ W.T in float32 through torch's BLAS, W dequantized DEQUANT_CHUNK weights of rows at a time."""
    k, n = layer.bits.numel(), layer.scales.shape[1]
    rot_block = getattr(layer, "rotation_block", 0)
    if rot_block:  # R^T x, as the kernel computes it
        xf = torch.empty(x2.shape, dtype=torch.float32)
        rc = _LIB.xbit_cpu_rotate(_threads(threads, x2.numel() * 64), x2.data_ptr(), int(x2.dtype == torch.bfloat16),
                                  x2.shape[0], k, layer.signs().data_ptr(), rot_block, xf.data_ptr())
        if rc != 0:
            raise RuntimeError(f"xbit_cpu_rotate failed with code {rc}")
    else:
        xf = x2.float()
    step = max(16, DEQUANT_CHUNK // max(1, k))
    parts = [F.linear(xf, dequantize(layer, slice(r, r + step), threads)) for r in range(0, n, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def matmul(x: torch.Tensor, layer, threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for an x-bit layer; x float32 or bfloat16 on the CPU, y in x's dtype. From GEMM_ROWS
    rows of x up, unless an ISA is asked for (argument or XBIT_CPU_ISA), or with isa "blas", through `dequantize`
    and torch's BLAS."""
    if _LIB is None:
        raise RuntimeError(_WHY)
    plan = _plan(layer)
    k, n = layer.bits.numel(), layer.scales.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    forced = isa or os.environ.get("XBIT_CPU_ISA")
    if n > 0 and (forced == BLAS or (not forced and x2.shape[0] >= GEMM_ROWS)):
        return _finish(_gemm(x2, layer, threads), x, layer, n)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    qweight, scales, zeros = (t.contiguous() for t in (layer.qweight, layer.scales, layer.zeros))
    rot_block = getattr(layer, "rotation_block", 0)  # a rotated layer: R^T x is computed in the kernel
    signs = layer.signs() if rot_block else None  # float32 [K], contiguous
    if x2.shape[0] > 0 and n > 0:
        rc = _LIB.xbit_cpu_matmul(
            _isa(isa), _threads(threads, x2.shape[0] * n * plan.kp), x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.shape[0], k,
            plan.perm.data_ptr(), qweight.data_ptr(), qweight.shape[0], scales.data_ptr(), zeros.data_ptr(), n,
            plan.segs.data_ptr(), plan.segs.shape[0], layer.group_size, scales.shape[0], plan.kp,
            signs.data_ptr() if rot_block else None, rot_block, y.data_ptr())
        if rc != 0:
            raise RuntimeError(f"xbit_cpu_matmul failed with code {rc}")
    return _finish(y, x, layer, n)


def _finish(y: torch.Tensor, x: torch.Tensor, layer, n: int) -> torch.Tensor:
    """y float32 [M, N] -> x's dtype and shape, plus the bias."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    bias = layer.bias
    if bias is not None:
        y += bias.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


class CpuKernel:
    name = "cpu"
    fuses_rotation = True  # matmul applies a rotated layer's R^T to x itself

    @staticmethod
    def can_run(layer, x: torch.Tensor):
        global _warned
        if _LIB is None:
            if not _warned:  # once per process: the reference is much slower, say why it runs
                warnings.warn(f"xbit CPU kernels unavailable, using the PyTorch reference: {_WHY}", RuntimeWarning,
                              stacklevel=3)
                _warned = True
            return False, _WHY
        if x.device.type != "cpu" or layer.qweight.device.type != "cpu":
            return False, "tensors are not on the CPU"
        if x.dtype not in (torch.float32, torch.bfloat16):
            return False, f"activation dtype {x.dtype} (float32 and bfloat16 only)"
        if layer.group_size % BLOCK != 0:
            return False, f"group_size {layer.group_size} is not a multiple of {BLOCK}"
        if x.shape[-1] != layer.bits.numel():
            return False, f"x has {x.shape[-1]} features, the layer {layer.bits.numel()}"
        if x.requires_grad and torch.is_grad_enabled():
            return False, "autograd needs the reference (no backward here)"
        return True, ""

    @staticmethod
    def run(x: torch.Tensor, layer) -> torch.Tensor:
        return matmul(x, layer)
