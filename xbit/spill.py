"""Tensors kept on disk until used: the measured E[x x^T] of every layer (16 GB in bfloat16 for an 8B model) is
written when measured and read back, one layer at a time, when a learning round or the final quantization needs it.
"""

import itertools
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_names = itertools.count()


class OnDisk:
    """One tensor in a safetensors file (`key` in `path`), read back whole by load()."""

    def __init__(self, path, key: str):
        self.path, self.key = str(path), key

    @classmethod
    def write(cls, tensor: torch.Tensor, folder) -> "OnDisk":
        path = Path(folder) / f"{next(_names)}.safetensors"
        save_file({"t": tensor.detach().cpu().contiguous()}, str(path))
        return cls(path, "t")

    def load(self) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(self.key)


def loaded(x):
    """x itself, or the tensor an OnDisk holds."""
    return x.load() if isinstance(x, OnDisk) else x
