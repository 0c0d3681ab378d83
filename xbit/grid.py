"""The asymmetric uniform grid of one group: weight = scale * (code - zero), scale and zero in float16.

Shared by every quantizer (rtn, gptq, xbit) so that they all produce the same kind of numbers.
"""

import torch


def fit_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row of w [out, cols] -> (scale, zero) float32 [out], already rounded to float16.

    The zero point is a float, so the grid spans exactly [min, max] (two free levels at 1 bit). A constant row, or
    one whose zero point float16 cannot hold to half a step (values far from 0 relative to their spread), widens the range
    to include 0, as GPTQ always does.
    """
    maxq = (1 << bits) - 1
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    far = (hi - lo) * 1024 <= maxq * torch.maximum(lo.abs(), hi.abs())  # |zero| >= 1024: float16 steps >= 0.5
    lo = torch.where(far, lo.clamp(max=0), lo)
    hi = torch.where(far, hi.clamp(min=0), hi)
    span = hi - lo
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span)).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    zero = (-lo / scale).half().float()
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code on the grid; w [out, cols], scale/zero broadcastable to it. Returns int64 codes."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale + zero), 0, maxq).to(torch.int64)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q.float() - zero)


def round_to_grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w [out, cols] rounded to its own min-max grid (one group per row), as float: fit, quantize, dequantize."""
    scale, zero = fit_grid(w, bits)
    return dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
