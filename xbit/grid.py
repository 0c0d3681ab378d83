"""The asymmetric uniform grid of one group: weight = scale * (code - zero), scale and zero in float16.

Shared by every quantizer (rtn, gptq, xbit) so that they all produce the same kind of numbers.
"""

import torch


def fit_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row of w [out, cols] -> (scale, zero) float32 [out], already rounded to float16."""
    maxq = (1 << bits) - 1
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    span = (hi - lo).clamp(min=1e-8)
    scale = (span / maxq).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # underflow guard
    zero = (-lo / scale).half().float()
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code on the grid; w [out, cols], scale/zero broadcastable to it. Returns int64 codes."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale + zero), 0, maxq).to(torch.int64)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q.float() - zero)
