"""The one dispatch point between XbitLinear and the kernels.

Each kernel has `can_run(layer, x) -> (bool, reason)` and `run(x, layer) -> y`. The first kernel in
`KERNELS` that can run is used; the reference (dequantize, then matmul) can always run and is last. The choice is
made once per layer and kind of input (device, dtype, features, autograd) and kept on the layer, not re-made on
every forward; `reset(layer)` forgets it (after changing the environment a kernel reads, e.g. XBIT_CPU_ISA).
A layer stored in a rotated basis (layer.rotation_block > 0) needs R^T x: `xbit.rotation.rotate` here, unless the
kernel applies it itself (`fuses_rotation = True`).
"""

import torch

import cpu_fallback
from cpu_fallback import CpuKernel
from triton_kernels import TritonKernel

from .format import dequantize as reference_dequantize
from .format import reference_matmul
from .rotation import rotate


class ReferenceKernel:
    name = "reference"

    @staticmethod
    def can_run(layer, x: torch.Tensor):
        return True, ""

    @staticmethod
    def run(x: torch.Tensor, layer) -> torch.Tensor:
        return reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size,
                                layer.bias.to(x.dtype) if layer.bias is not None else None)


KERNELS = [TritonKernel, CpuKernel, ReferenceKernel]


def choose(layer, x: torch.Tensor):
    """The kernel that will run this layer on this input, and why the faster ones will not."""
    reasons = []
    for kernel in KERNELS:
        ok, why = kernel.can_run(layer, x)
        if ok:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    raise RuntimeError("no xbit kernel can run this layer: " + "; ".join(reasons))


def _key(layer, x: torch.Tensor):
    # everything a can_run may look at that can change between calls (KERNELS: tests replace the list)
    return (x.device, x.dtype, x.shape[-1], x.requires_grad and torch.is_grad_enabled(), layer.qweight.device,
            layer.group_size, tuple(KERNELS))


def chosen(layer, x: torch.Tensor):
    """The kernel for this layer and this kind of input, chosen on first use and cached on the layer."""
    key = _key(layer, x)
    cached = layer.__dict__.get("_xbit_kernel")
    if torch.compiler.is_compiling() and (cached is None or cached[0] != key):
        return choose(layer, x)[0]  # no side effects while tracing
    if cached is None or cached[0] != key:
        cached = (key, choose(layer, x)[0])
        layer.__dict__["_xbit_kernel"] = cached
    return cached[1]


def reset(layer) -> None:
    layer.__dict__.pop("_xbit_kernel", None)


def matmul(x: torch.Tensor, layer) -> torch.Tensor:
    kernel = chosen(layer, x)
    if getattr(layer, "rotation_block", 0) and not getattr(kernel, "fuses_rotation", False):
        x = rotate(x, layer.signs(), layer.rotation_block)
    return kernel.run(x, layer)


def dequantize(layer, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight [out, in] (or its output rows `rows`: a slice or an index tensor) of anything with the
    XbitLinear buffers (qweight, scales, zeros, perm, bits, group_size): the C++ kernel on the CPU (~2 ns a weight
    on 2 cores, 13-16x the reference's int64 unpacking), the reference elsewhere; the same numbers."""
    if layer.qweight.device.type == "cpu" and cpu_fallback.available()[0]:
        return cpu_fallback.dequantize(layer, rows)
    r = slice(None) if rows is None else rows
    return reference_dequantize(layer.qweight[:, r], layer.scales[:, r], layer.zeros[:, r], layer.perm, layer.bits,
                                layer.group_size)
