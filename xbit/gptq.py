"""GPTQ with per-column bit depths: quantize columns in storage order, pushing each column's error onto the
columns not yet quantized through the inverse Hessian (Frantar et al., 2022).

With uniform bits and perm = act order this is the GPTQ baseline (g128, act-order, damp as AutoGPTQ); with mixed
bits it is xbit's error compensation inside a mixed-precision layer. Groups are consecutive columns of a segment
in storage order, exactly as the format stores them, and each group's grid is fitted when quantization reaches it.
"""

import torch

from .format import assemble, segments_of
from .grid import fit_grid, quantize_codes


def act_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing E[x_j^2] (GPTQ's act-order)."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def inverse_hessian_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, as GPTQ uses it."""
    h = h.clone().double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:  # not positive definite: damp harder
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            h += 10.0 ** (attempt - 3) * torch.diagonal(h).mean() * eye
    else:
        raise ValueError("calibration Hessian is not positive definite even after damping")
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True).float()


@torch.no_grad()
def quantize_weight_gptq(weight: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, perm: torch.Tensor,
                         group_size: int, damp: float = 0.01, block: int = 128, grid: str = "minmax") -> dict:
    """weight [out, in], h = E[x x^T] [in, in] -> stored tensors of an x-bit layer (see xbit.format)."""
    perm = perm.long()
    w = weight.float()[:, perm].clone()
    dead = torch.diagonal(h)[perm] == 0
    w[:, dead] = 0
    hinv = inverse_hessian_chol(h[perm][:, perm], damp)
    col_bits = bits.long()[perm].tolist()
    segs = segments_of(bits, perm, group_size)
    seg_of_col = [s for s in segs for _ in range(s.cols)]
    n_out, n_in = w.shape
    codes = torch.zeros(n_out, n_in, dtype=torch.int64, device=w.device)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n_out, i2 - i1, device=w.device)
        for i in range(i2 - i1):
            col, b, seg = i1 + i, col_bits[i1 + i], seg_of_col[i1 + i]
            d = hinv[col, col]
            if b == 0:
                q = torch.zeros_like(w1[:, i])
            else:
                if (col - seg.start) % group_size == 0:  # a new group: fit its grid on the current weights
                    end = min(col + group_size, seg.start + seg.cols)
                    cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : end - col]
                    scale, zero = fit_grid(cur, b, grid)
                    scales.append(scale)
                    zeros.append(zero)
                c = quantize_codes(w1[:, i : i + 1], scale[:, None], zero[:, None], b)[:, 0]
                codes[:, col] = c
                q = scale * (c.float() - zero)
            e = (w1[:, i] - q) / d
            w1[:, i:] -= e[:, None] * hinv[col, i1 + i : i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    seg_codes, seg_scales, seg_zeros, g = [], [], [], 0
    for seg in segs:
        if seg.bits == 0:
            continue
        n_groups = seg.groups(group_size)
        seg_codes.append(codes[:, seg.start : seg.start + seg.cols])
        seg_scales.append(torch.stack(scales[g : g + n_groups]))
        seg_zeros.append(torch.stack(zeros[g : g + n_groups]))
        g += n_groups
    return assemble(weight.shape[0], bits, perm, group_size, seg_codes, seg_scales, seg_zeros)
