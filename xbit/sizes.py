"""Byte sizes: parsing user targets and counting a checkpoint's bytes before anything is quantized."""

import re

import torch

from .format import layer_bytes

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'60MB', '1.2GB', '512MiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r} (examples: 60MB, 1.2GB, 512MiB, 123456)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def float_component_bytes(model, quantized: set[str], float_dtype: torch.dtype) -> int:
    """Bytes of everything that is not a quantized weight, tied weights once (as checkpoint.save stores it)."""
    seen, total = set(), 0
    elem = torch.empty((), dtype=float_dtype).element_size()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        if name.removesuffix(".weight") in quantized and name.endswith(".weight"):
            continue
        total += t.numel() * (elem if t.is_floating_point() else t.element_size())
    return total


def float_linear_bytes(linears: dict, float_dtype: torch.dtype) -> int:
    """Bytes the layers' weights would take unquantized (the ceiling every target must stay under)."""
    return sum(m.weight.numel() for m in linears.values()) * torch.empty((), dtype=float_dtype).element_size()


def uniform_counts(in_features: int, bits: int) -> list[int]:
    counts = [0] * 9
    counts[bits] = in_features
    return counts


def plan_bytes(linears: dict, counts: dict, group_size: int) -> int:
    """Bytes of the quantized layers (bias excluded: it is counted with the float components). A layer is anything
    with a [out, in] weight: nn.Linear, or an nn.Embedding table [vocabulary, dim]."""
    return sum(layer_bytes(*m.weight.shape, counts[n], group_size) for n, m in linears.items())
