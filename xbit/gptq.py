"""GPTQ with per-column bit depths: quantize columns in storage order, pushing each column's error onto the
columns not yet quantized through the inverse Hessian (Frantar et al., 2022).

With uniform bits and perm = act order this is the GPTQ baseline (g128, act-order, damp as AutoGPTQ); with mixed
bits it is xbit's error compensation inside a mixed-precision layer. Groups are consecutive columns of a segment
in storage order, exactly as the format stores them, and each group's grid is fitted when quantization reaches it.
"""

import torch

from .format import assemble, segments_of
from .grid import fit_grid, rounded


def act_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing E[x_j^2] (GPTQ's act-order)."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def inverse_hessian_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, as GPTQ uses it."""
    h = h.clone() if h.dtype == torch.float64 else h.double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())  # (no n x n identity: 1.6 GB at n = 14336)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:  # not positive definite: damp harder
            h.diagonal().add_(10.0 ** (attempt - 3) * torch.diagonal(h).mean())
    else:
        raise ValueError("calibration Hessian is not positive definite even after damping")
    del h
    hinv = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(hinv, upper=True).float()


@torch.no_grad()
def gptq_columns(w: torch.Tensor, hinv: torch.Tensor, col_bits: list[int], group_ends: dict, grid: str,
                 block: int = 128) -> tuple[list, list]:
    """The GPTQ sweep, in place: w [out, in] float32 in storage order becomes its quantized values, column by column,
    each column's error pushed onto the later ones (within a block at once, onto the later blocks lazily in one
    matmul, as the reference). `hinv`: upper Cholesky factor of H^-1 in the same order. `group_ends`: first
    column of each group -> its end; the group's grid is fitted on the weights as they are when the sweep reaches
    it. Returns the groups' (scales, zeros) in order. A 0-bit column becomes 0 and its error is compensated too."""
    n_out, n_in = w.shape
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, h1 = w[:, i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.empty(n_out, i2 - i1, device=w.device)
        for i in range(i2 - i1):
            b, col = col_bits[i1 + i], w1[:, i]
            if b == 0:
                q = torch.zeros_like(col)
            else:
                if i1 + i in group_ends:  # w[:, i2:] has not had this block's updates yet, as in the reference
                    scale, zero = fit_grid(w[:, i1 + i : group_ends[i1 + i]], b, grid)
                    scales.append(scale)
                    zeros.append(zero)
                q = rounded(col, scale, zero, b)
            e = torch.sub(col, q, out=err1[:, i]).div_(h1[i, i])
            w1[:, i + 1 :].addr_(e, h1[i, i + 1 :], alpha=-1)
            col.copy_(q)
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    return scales, zeros


def _group_ends(segs, group_size) -> dict:
    return {g: min(g + group_size, s.start + s.cols) for s in segs if s.bits for g in range(s.start, s.start + s.cols,
                                                                                          group_size)}


GPTQ_ROWS = 16384  # output rows per sweep: rows are quantized independently (one H^-1 for all), so a big table
# (a 128k-vocabulary head: 2 GB in float32) goes through in slices, each with its own working copy and codes


def _quantize_rows(w: torch.Tensor, hinv: torch.Tensor, col_bits: list[int], segs, group_ends: dict,
                   group_size: int, grid: str, block: int) -> tuple[list, list, list]:
    """GPTQ of some rows w [rows, in] (storage order, a working copy: swept in place) -> per-segment codes, scales
    and zeros, as xbit.format.assemble takes them."""
    scales, zeros = gptq_columns(w, hinv, col_bits, group_ends, grid, block)
    seg_codes, seg_scales, seg_zeros, g = [], [], [], 0
    for seg in segs:
        if seg.bits == 0:
            continue
        n_groups = seg.groups(group_size)
        s, z = torch.stack(scales[g : g + n_groups]), torch.stack(zeros[g : g + n_groups])
        codes = w[:, seg.start : seg.start + seg.cols]
        for k, c0 in enumerate(range(0, seg.cols, group_size)):  # in place, a group at a time
            # exact: every value is scale * (code - zero) with an integer code of at most 8 bits
            codes[:, c0 : c0 + group_size].div_(s[k][:, None]).add_(z[k][:, None]).round_()
        seg_codes.append(codes)
        seg_scales.append(s)
        seg_zeros.append(z)
        g += n_groups
    return seg_codes, seg_scales, seg_zeros


@torch.no_grad()
def quantize_weight_gptq(weight: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, perm: torch.Tensor,
                         group_size: int, damp: float = 0.01, block: int = 128, grid: str = "minmax",
                         rows: int = GPTQ_ROWS) -> dict:
    """weight [out, in], h = E[x x^T] [in, in] -> stored tensors of an x-bit layer (see xbit.format)."""
    perm = perm.long()
    hinv = inverse_hessian_chol(h[perm][:, perm], damp)
    dead = torch.diagonal(h)[perm] == 0
    col_bits = bits.long()[perm].tolist()
    segs = segments_of(bits, perm, group_size)
    ends = _group_ends(segs, group_size)
    parts = []
    for r in range(0, weight.shape[0], rows):
        w = weight[r : r + rows].float()[:, perm]  # (a copy: the sweep works in place)
        w[:, dead] = 0
        parts.append(assemble(w.shape[0], bits, perm, group_size,
                              *_quantize_rows(w, hinv, col_bits, segs, ends, group_size, grid, block)))
        del w
    if len(parts) == 1:
        return parts[0]
    return {**parts[0], **{k: torch.cat([p[k] for p in parts], dim=1) for k in ("qweight", "scales", "zeros")}}
