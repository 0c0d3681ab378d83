"""Triton kernels for x-bit layers: `TritonKernel` for `xbit.dispatch`, and the `xbit::triton_matmul` op.

Importing this package never imports triton and never touches a GPU: the kernel module
(`triton_kernels.matmul`) is imported on first use, and `TritonKernel.can_run` says why it cannot run when
triton is missing, the tensor is not on a CUDA device (or TRITON_INTERPRET=1 is not set for CPU tensors), or the
dtype is not supported.
"""

import importlib.util
import os
import sys

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 32  # columns per packing block (xbit.format.BLOCK); kernels import nothing of xbit


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "on", "yes")


def _interpret_env() -> bool:
    """CPU tensors go through Triton's interpreter only on request: TRITON_INTERPRET=1 and XBIT_TRITON_CPU=1
    (the tests set TRITON_INTERPRET for the whole session, since triton reads it when it is first imported)."""
    return _truthy("TRITON_INTERPRET") and _truthy("XBIT_TRITON_CPU")


def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'xbit[gpu]')"
    return True, ""


def _kernels():
    from . import matmul  # imports triton; jit decides compiled vs interpreted here

    return matmul


def segment_table(bits: torch.Tensor, perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 [8, 5] on bits' device: per depth 1..8 (bits, start, cols, word_start, group_start).

    Computed with tensor ops only (no host sync), so it can be traced by torch.compile and captured in a CUDA
    graph. Assumes the format's invariant that each depth forms one run in storage order (xbit.format checks it).
    """
    ordered = bits.long()[perm.long()]
    n = ordered.numel()
    depth = torch.arange(1, 9, device=bits.device)
    is_b = ordered[None, :] == depth[:, None]  # [8, in]
    cols = is_b.sum(1)
    pos = torch.arange(n, device=bits.device)
    start = torch.where(is_b, pos[None, :], n).amin(1) if n else torch.zeros(8, dtype=torch.long, device=bits.device)
    words = (cols + BLOCK - 1) // BLOCK * depth
    groups = (cols + group_size - 1) // group_size
    before = start[None, :] < start[:, None]  # [b, d]: segment d is stored before segment b
    word_start = (before * words[None, :]).sum(1)
    group_start = (before * groups[None, :]).sum(1)
    return torch.stack([depth, start, cols, word_start, group_start], 1).to(torch.int32).contiguous()


def bit_key(counts) -> int:
    """Autotune key for a layer's bit mix: the set of depths present (bit b set for depth b). Not the mean bits:
    layers with the same shape and depths share one tuning result."""
    return sum(1 << b for b, c in enumerate(counts) if c > 0 and b > 0)


# ---------------------------------------------------------------- the op (torch.compile / CUDA graphs)


@torch.library.custom_op("xbit::triton_matmul", mutates_args=())
def triton_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  perm: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                  bit_key: int) -> torch.Tensor:
    return _kernels().launch(x, qweight, scales, zeros, perm, table, group_size, bias, bit_key)


@triton_matmul.register_fake
def _(x, qweight, scales, zeros, perm, table, bias, group_size, bit_key):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


# ---------------------------------------------------------------- the dispatch kernel


def _layer_meta(layer):
    """(perm as int32, segment table, bit key) cached on the layer; recomputed if perm or bits change.

    Under torch.compile the cache is trusted as is (run the layer once eagerly first, as for autotuning) or,
    if empty, the table is computed inside the graph (no host sync, so CUDA graphs capture it too).
    """
    if torch.compiler.is_compiling():
        cached = layer.__dict__.get("_xbit_triton_meta")
        if cached is not None:
            return cached[1]
        return (layer.perm.to(torch.int32), segment_table(layer.bits, layer.perm, layer.group_size),
                bit_key(layer.counts))
    key = (layer.perm.data_ptr(), layer.perm._version, layer.bits.data_ptr(), layer.bits._version, layer.group_size)
    cached = layer.__dict__.get("_xbit_triton_meta")
    if cached is None or cached[0] != key:
        meta = (layer.perm.to(torch.int32), segment_table(layer.bits, layer.perm, layer.group_size),
                bit_key(layer.counts))
        cached = (key, meta)
        layer.__dict__["_xbit_triton_meta"] = cached
    return cached[1]


class TritonKernel:
    name = "triton"

    @staticmethod
    def can_run(layer, x: torch.Tensor | None = None):
        """(True, "") if the kernels can run this layer (and this input, when given), else (False, why)."""
        ok, why = triton_available()
        if not ok:
            return False, why
        device = layer.qweight.device if x is None else x.device
        if device.type != "cuda":
            if not (device.type == "cpu" and _interpret_env()):
                what = "layer" if x is None else "input"
                return False, (f"{what} is on {device.type}, not CUDA "
                               "(TRITON_INTERPRET=1 XBIT_TRITON_CPU=1 for the interpreter)")
            if "triton_kernels.matmul" in sys.modules and not _kernels().INTERPRET:
                return False, "kernels were built for the GPU before TRITON_INTERPRET=1 was set"
        if x is None:
            return True, ""
        if x.dtype not in DTYPES:
            return False, f"dtype {x.dtype} not supported (float16, bfloat16, float32)"
        if layer.qweight.device != x.device:
            return False, f"layer is on {layer.qweight.device}, input on {x.device}"
        if x.shape[-1] != layer.in_features:
            return False, f"input has {x.shape[-1]} features, layer expects {layer.in_features}"
        return True, ""

    @staticmethod
    def run(x: torch.Tensor, layer) -> torch.Tensor:
        perm, table, key = _layer_meta(layer)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return triton_matmul(x, layer.qweight, layer.scales, layer.zeros, perm, table, bias, layer.group_size, key)


__all__ = ["TritonKernel", "triton_matmul", "segment_table", "bit_key", "triton_available"]
