"""The quantize settings: one frozen, validated object from the CLI (or the Python API) down to every method.

One meaning per name, for every method:
- `bits`: the average stored bits per weight of the quantized layers, all overhead counted (codes, scales, zeros,
  permutation, per-column depths, rotation signs); a target, like `size`.
- `size`: the bytes of the checkpoint's .safetensors files on disk, headers included.
- `code_bits`: the integer code width of a uniform method (rtn, gptq) instead of a target.
- `match`: "gptq:B[:G]", the file size of a standard GPTQ checkpoint of the model (xbit.sizes); for rtn and gptq,
  that quantization itself (B-bit codes, groups of G).
"""

import math
import re
from dataclasses import dataclass, field, fields

import torch

from .format import MAX_BITS
from .grid import GRIDS
from .rotation import MAX_BLOCK
from .sizes import GPTQ_BITS
from .tune import DEFAULT_TUNE_EPOCHS, DEFAULT_TUNE_SAMPLES, TUNE_LR

METHODS = ("xbit", "gptq", "rtn")
ALLOCATIONS = ("learned", "proxy", "uniform")
FINAL_PASSES = ("sequential", "reuse")


class UsageError(ValueError):
    """A bad argument or target: the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class XbitOptions:
    """What only the xbit method reads (xbit.method_xbit)."""

    cost: object = "kl"  # "kl", "ce", "module:function" or a callable (logits, ref_logits, ids) -> scalar
    allocation: str = "learned"
    rounds: int = 4
    compensate: bool = True
    importance: float = 0.5
    min_bits: int | None = None
    quantize_embeddings: bool = True
    rotation_block: int = MAX_BLOCK
    grid: str = "mse"
    tune_epochs: int = DEFAULT_TUNE_EPOCHS
    tune_lr: float = TUNE_LR
    tune_samples: int | None = DEFAULT_TUNE_SAMPLES  # None: every calibration sequence
    final_pass: str = "reuse"
    save_measurement: str | None = None
    load_measurement: str | None = None

    def __post_init__(self):
        _check(self.allocation in ALLOCATIONS, f"unknown allocation {self.allocation!r}; available: "
                                               f"{', '.join(ALLOCATIONS)}")
        _check(self.rounds >= 1, "--rounds must be >= 1")
        _check(self.final_pass in FINAL_PASSES, f"unknown final pass {self.final_pass!r}; available: "
                                                f"{', '.join(FINAL_PASSES)}")
        _check(self.tune_epochs >= 0 and self.tune_lr > 0, "--tune-epochs must be >= 0 and --tune-lr positive")
        _check(self.tune_samples is None or self.tune_samples >= 1, "--tune-samples must be >= 1")
        _check(self.min_bits is None or 0 <= self.min_bits <= MAX_BITS, f"--min-bits must be 0..{MAX_BITS}")
        _check(self.rotation_block >= 0 and not self.rotation_block & (self.rotation_block - 1),
               f"--rotation-block must be 0 or a power of two, got {self.rotation_block}")
        _check(self.grid in GRIDS, f"unknown grid {self.grid!r}; available: {', '.join(GRIDS)}")
        _check(math.isfinite(self.importance), "--importance must be a finite number")


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "rtn"
    bits: float | None = None
    size: int | None = None
    code_bits: int | None = None
    match: str | None = None
    group_size: int = 128
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    damp: float = 0.01
    float_dtype: torch.dtype = torch.float16
    xbit: XbitOptions = field(default_factory=XbitOptions)

    def __post_init__(self):
        _check(self.method in METHODS, f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        targets = [n for n in ("bits", "size", "code_bits", "match") if getattr(self, n) is not None]
        _check(len(targets) == 1, "give exactly one target: bits, size, match, or (rtn/gptq) code_bits")
        if self.match is not None:
            parse_match(self.match)
        _check(self.bits is None or (math.isfinite(self.bits) and 0 < self.bits < 16),
               f"--bits is the average stored bits per weight, a number in (0, 16); got {self.bits}")
        _check(self.size is None or self.size > 0, f"--size must be positive, got {self.size}")
        _check(self.code_bits is None or self.method != "xbit",
               "--code-bits is for the uniform methods (rtn, gptq); xbit takes --bits, --size or --match")
        _check(self.code_bits is None or (self.code_bits == int(self.code_bits) and 1 <= self.code_bits <= MAX_BITS),
               f"--code-bits is an integer code width 1..{MAX_BITS}, got {self.code_bits}")
        _check(self.group_size >= 1, f"--group-size must be positive, got {self.group_size}")
        _check(self.calib_samples >= 1 and self.seq_len >= 2, "--calib-samples must be >= 1 and --seq-len >= 2")
        _check(0 <= self.damp < 1, f"--damp must be in [0, 1), got {self.damp}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "QuantizeSettings":
        """Flat keyword arguments (the Python API) -> settings; the xbit-only ones go to XbitOptions."""
        own = {f.name for f in fields(cls)}
        xbit_names = {f.name for f in fields(XbitOptions)}
        unknown = set(kwargs) - own - xbit_names
        _check(not unknown, f"unknown quantize option(s): {', '.join(sorted(unknown))}")
        xbit = XbitOptions(**{k: v for k, v in kwargs.items() if k in xbit_names})
        return cls(**{k: v for k, v in kwargs.items() if k in own}, xbit=xbit)


def parse_match(spec: str) -> tuple[int, int]:
    """'gptq:3' -> (3, 128); 'gptq:3:64' -> (3, 64); anything else is a UsageError."""
    m = re.fullmatch(r"gptq:([0-9]+)(?::([0-9]+))?", str(spec))
    if not m or int(m.group(1)) not in GPTQ_BITS or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UsageError(f"--match {spec!r}: expected gptq:BITS or gptq:BITS:GROUP (BITS one of "
                         f"{', '.join(map(str, GPTQ_BITS))}; GROUP a positive integer, default 128)")
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else 128


def _check(ok: bool, message: str):
    if not ok:
        raise UsageError(message)
