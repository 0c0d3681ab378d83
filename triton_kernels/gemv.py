"""The batch-1 GEMV: y[n] = sum_k x[k] * W[n, k] for a whole x-bit layer (all segments) in one launch.

Work split: the segments' tiles of BLOCK_K storage columns are concatenated (table order) and program
(pid_n, pid_k) owns output columns [pid_n * BLOCK_N, + BLOCK_N) and run pid_k of SPLIT_K equal runs of tiles. A
program walks the 8 table rows and runs the depth-specialised loop (`_segment`, BITS a constexpr) on its part of
each segment; DEPTHS (the depths the layer has) limits which specialisations are compiled.

Per tile (NB = BLOCK_K / 32 packing blocks):
- x: the NB * 32 storage columns gathered through perm (x[perm[start + col]]: no permuted copy of x), in fp32,
  scaled by 2^(23 - pp_j) for the magic conversion (codes.py), summed per block (the offset sum C and the plain sum
  X, for the zero point), then split into its 32 columns, held in registers.
- weights: the b word rows of each block, each a coalesced [NB, BLOCK_N] int32 load, loaded once; code j costs one
  LOP3 (plus a shift shared by the codes of one window) and one FFMA into a per-block partial sum.
- scale and zero, once per block and output column: partial starts at -(C + z * X), so that after the 32 FFMAs it
  holds sum_j x_j * (q_j - z); acc += s * partial.
acc is [NB, BLOCK_N] and is reduced over the blocks once, after the loop. The result is stored in y's dtype, or
added atomically into y (zeroed by the launcher) when SPLIT_K > 1: there is no fp32 staging buffer.
Group sizes that are not a multiple of 32 fall back to a per-code scale and zero (correct, not fast).
"""

import triton
import triton.language as tl

from .codes import (bitrev5, code_float, columns, ends_in, segment_row, segment_tiles, split_range, write_out,
                    x_factor)


@triton.jit
def _words(part, xcols, w_ptrs, w_mask, N, one, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """part += sum_j xcols[j] * (float of code j) over the 32 codes of each block; the b words loaded once."""
    prev = tl.zeros_like(part).to(tl.uint32, bitcast=True)
    for i in tl.static_range(BITS):
        w = tl.load(w_ptrs + i * N, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        for j in tl.static_range(32):
            if ends_in(j, i, BITS):
                part = tl.fma(xcols[bitrev5(j)][:, None], code_float(prev, w, one, j, BITS, WINDOW), part)
        prev = w
    return part


@triton.jit
def _words_grouped(acc, xcols, w_ptrs, w_mask, s_ptr, z_ptr, g0, offs_n, n_mask, N, cols, blk, one,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, WINDOW: tl.constexpr):
    """The fallback for groups that do not hold whole blocks: scale and zero looked up per code."""
    prev = tl.zeros_like(acc).to(tl.uint32, bitcast=True)
    for i in tl.static_range(BITS):
        w = tl.load(w_ptrs + i * N, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        for j in tl.static_range(32):
            if ends_in(j, i, BITS):
                f = code_float(prev, w, one, j, BITS, WINDOW)  # 1 + q * 2^-e: q = (f - 1) * 2^e
                col = blk * 32 + j
                g = (g0 + col // GROUP_SIZE)[:, None] * N + offs_n[None, :]
                m = (col < cols)[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + g, mask=m, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=m, other=0.0).to(tl.float32)
                xe = xcols[bitrev5(j)][:, None]  # x_j * 2^e: xe * (f - 1) = x_j * q
                acc = tl.fma(s, xe * f - xe - _unscaled(xe, j, BITS, WINDOW) * z, acc)
        prev = w
    return acc


@triton.jit
def _unscaled(xe, j: tl.constexpr, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """x_j from x_j * 2^(23 - pp_j) (exact: a power of two)."""
    offs = tl.full((1,), j, tl.int32)
    return xe / x_factor(offs, BITS, WINDOW)[None, :]


@triton.jit
def _segment(acc, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, t_lo, t_hi, offs_n, n_mask, N,
             start, cols, word_start, group_start, one,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, WINDOW: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // 32
    offs_b = tl.arange(0, NB)
    offs_j = tl.arange(0, 32)
    fac = x_factor(offs_j, BITS, WINDOW)
    nblk = (cols + 31) // 32
    for t in range(t_lo, t_hi):
        blk = t * NB + offs_b  # segment-local packing blocks of this tile
        col = blk[:, None] * 32 + offs_j[None, :]
        c_mask = col < cols
        src = tl.load(perm_ptr + start + col, mask=c_mask, other=0)
        x = tl.load(x_ptr + src, mask=c_mask, other=0.0).to(tl.float32)
        xe = x * fac[None, :]
        xcols = columns(xe, NB)
        w_mask = (blk < nblk)[:, None] & n_mask[None, :]
        w_ptrs = qw_ptr + (word_start + blk * BITS)[:, None] * N + offs_n[None, :]
        if GROUP_SIZE % 32 == 0:
            if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale row
                g = group_start + (t * BLOCK_K) // GROUP_SIZE
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            else:  # one scale row per block
                g = (group_start + (blk * 32) // GROUP_SIZE)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + g, mask=w_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=w_mask, other=0.0).to(tl.float32)
            xsum = tl.sum(x, axis=1)[:, None]
            esum = tl.sum(xe, axis=1)[:, None]
            part = tl.fma(-z, xsum, -esum)  # -(C + z X): after the codes, sum_j x_j (q_j - z)
            part = _words(part, xcols, w_ptrs, w_mask, N, one, BITS, WINDOW)
            acc = tl.fma(s, part, acc)
        else:
            acc = _words_grouped(acc, xcols, w_ptrs, w_mask, s_ptr, z_ptr, group_start, offs_n, n_mask, N, cols,
                                 blk, one, BITS, GROUP_SIZE, WINDOW)
    return acc


@triton.jit(do_not_specialize=["SPLIT_K"])  # a run-time split: one compiled kernel serves every SPLIT_K
def xbit_gemv_kernel(x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, seg_ptr, bias_ptr, y_ptr, N, K, one_bits,
                     GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DEPTHS: tl.constexpr,
                     WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                     ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    one = one_bits.to(tl.uint32)

    lo, hi = split_range(seg_ptr, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_K // 32, BLOCK_N), dtype=tl.float32)
    t0 = 0
    for i in range(8):
        bits, start, cols, word_start, group_start = segment_row(seg_ptr, i)
        a, b, nt = segment_tiles(cols, t0, lo, hi, BLOCK_K)
        if a < b:
            for k in tl.static_range(1, 9):  # one constexpr-specialised loop per depth present
                if (DEPTHS >> k) & 1:
                    if bits == k:
                        acc = _segment(acc, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, a, b, offs_n, n_mask, N, start,
                                       cols, word_start, group_start, one, k, GROUP_SIZE, BLOCK_K, WINDOW)
        t0 += nt

    y = tl.sum(acc, axis=0)  # the one cross-block reduction
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    write_out(y_ptr + offs_n, y, n_mask, ATOMIC)
