"""The asymmetric uniform grid of one group: weight = scale * (code - zero), scale and zero in float16.

Shared by every quantizer (rtn, gptq, xbit) so that they all produce the same kind of numbers. Two fits:
- "minmax": the published asymmetric grid of the GPTQ and RTN baselines (GPTQ's Quantizer, AutoGPTQ, GPTQModel):
  the group's range widened to include 0, scale = range / (2^b - 1), an integer zero point, so 0 is a level.
- "mse" (xbit's default): the row's own range [f * min, f * max] spanned exactly (a float zero point), with the
  factor f in CLIP_FACTORS that minimises each row's squared error; clipping a few extreme values buys a finer
  step for all the others, which pays most at 2-3 bits.
Measured on SmolLM2-135M (docs/BENCHMARKS.md): GPTQ 3-bit with a float zero spanning the exact range had slightly
lower per-layer errors than the published grid but 28% / 26% higher perplexity; the baselines use the published
grid.
"""

import torch

GRIDS = ("mse", "minmax")
CLIP_FACTORS = torch.linspace(1.0, 0.5, 21).tolist()
MSE_ROWS_ELEMENTS = 1 << 17  # weights per mse fit (x 21 candidates): 2x faster on the CPU box than 4M at once


def fit_grid(w: torch.Tensor, bits: int, grid: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 [out] for each row of w [out, cols], already rounded to float16: `grid` "minmax" or
    "mse" (the best of the ranges [f * min, f * max] for f in CLIP_FACTORS)."""
    if grid == "minmax":
        return fit_minmax(w, bits)
    if grid != "mse":
        raise ValueError(f"unknown grid {grid!r}; available: {', '.join(GRIDS)}")
    if w.numel() > MSE_ROWS_ELEMENTS and w.shape[0] > 1:  # rows are independent: fit cache-sized slices
        parts = [fit_grid(rows, bits, grid) for rows in w.split(max(1, MSE_ROWS_ELEMENTS // w.shape[1]))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    f = torch.tensor(CLIP_FACTORS, dtype=w.dtype, device=w.device)[:, None]  # [F, 1]
    lo, hi = w.min(dim=1).values * f, w.max(dim=1).values * f  # [F, out]: every candidate range at once
    scale, zero = fit_span(torch.stack([lo.flatten(), hi.flatten()], dim=1), bits)
    scale, zero = scale.view_as(lo)[..., None], zero.view_as(lo)[..., None]
    err = rounded(w, scale, zero, bits).sub_(w).pow_(2).sum(dim=2)
    best = err.argmin(dim=0, keepdim=True)  # first minimum: the widest range among equals
    return scale[..., 0].gather(0, best)[0], zero[..., 0].gather(0, best)[0]


def fit_minmax(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published baseline grid per row of w [out, cols] -> (scale, zero) float32 [out]: the range
    [min(w, 0), max(w, 0)], its scale rounded to float16, an integer zero point in [0, 2^b - 1]."""
    maxq = (1 << bits) - 1
    lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span)).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def fit_span(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid spanning each row's exact range -> (scale, zero) float32 [out], already rounded to float16.

    The zero point is a float, so the grid spans exactly [min, max] (two free levels at 1 bit). A constant row, or
    one whose zero point float16 cannot hold to half a step (values far from 0 relative to their spread), widens
    the range to include 0, as GPTQ always does.
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


def rounded(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantize_codes(quantize_codes(w, ...)) in one buffer (the same numbers, without the int64 codes)."""
    return (w / scale).add_(zero).round_().clamp_(0, (1 << bits) - 1).sub_(zero).mul_(scale)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q.float() - zero)


def round_to_grid(w: torch.Tensor, bits: int, grid: str = "minmax") -> torch.Tensor:
    """w [out, cols] rounded to its own grid (one group per row), as float: fit, quantize, dequantize."""
    scale, zero = fit_grid(w, bits, grid)
    return rounded(w, scale[:, None], zero[:, None], bits)
