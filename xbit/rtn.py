"""Round-to-nearest: every column on its group's grid (min-max unless asked), no error compensation."""

import torch

from .format import assemble, segments_of
from .grid import fit_grid, quantize_codes


def quantize_weight_rtn(weight: torch.Tensor, bits: torch.Tensor, perm: torch.Tensor, group_size: int,
                        grid: str = "minmax") -> dict:
    """weight [out, in] float -> stored tensors of an x-bit layer with the given per-column bits and order."""
    w = weight.float()
    perm = perm.long()
    codes, scales, zeros = [], [], []
    for seg in segments_of(bits, perm, group_size):
        if seg.bits == 0:
            continue
        cols = w[:, perm[seg.start : seg.start + seg.cols]]
        seg_codes, seg_scales, seg_zeros = [], [], []
        for g0 in range(0, seg.cols, group_size):
            block = cols[:, g0 : g0 + group_size]
            scale, zero = fit_grid(block, seg.bits, grid)
            seg_codes.append(quantize_codes(block, scale[:, None], zero[:, None], seg.bits))
            seg_scales.append(scale)
            seg_zeros.append(zero)
        codes.append(torch.cat(seg_codes, dim=1))
        scales.append(torch.stack(seg_scales))
        zeros.append(torch.stack(seg_zeros))
    return assemble(weight.shape[0], bits, perm, group_size, codes, scales, zeros)
