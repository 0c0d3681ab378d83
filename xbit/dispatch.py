"""The one dispatch point between XbitLinear and the kernels.

Each kernel has `can_run(layer, x) -> (bool, reason)` and `run(x, layer) -> y`. The first kernel in
`KERNELS` that can run is used; the reference (dequantize, then matmul) can always run and is last.
A layer stored in a rotated basis (layer.rotation_block > 0) needs R^T x: `xbit.rotation.rotate` here, unless the
kernel applies it itself (`fuses_rotation = True`).
"""

import torch

from cpu_fallback import CpuKernel
from triton_kernels import TritonKernel

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


def matmul(x: torch.Tensor, layer) -> torch.Tensor:
    kernel, _ = choose(layer, x)
    if getattr(layer, "rotation_block", 0) and not getattr(kernel, "fuses_rotation", False):
        x = rotate(x, layer.signs(), layer.rotation_block)
    return kernel.run(x, layer)
