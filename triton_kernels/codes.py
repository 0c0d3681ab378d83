"""Code extraction shared by the GEMV and the GEMM kernels: one packed word loaded once, every code it holds
expanded in registers.

Storage (xbit.format): a segment of b-bit columns is cut into blocks of 32 columns; a block is a little-endian bit
stream of 32*b bits in b consecutive qweight rows, code j at stream bits [j*b, j*b + b). For a tile of output
columns a program loads, per block, the b word rows as b coalesced [NB, BLOCK_N] int32 loads (NB blocks at once)
and extracts code j with constant shifts, unrolled over j (all shifts and masks are compile-time constants).

Magic-number conversion, no integer-to-float instruction: code q placed in the mantissa of 1.0 at bit position
pp (pp + b <= 23) by one AND-OR (one LOP3) is the float 1 + q * 2^(pp - 23). The word is shifted so that the code
lands at pp. With a window of W bits, codes whose natural positions fall in one window share a shift (one SHF
serves up to W / b codes); W = 1 puts every code at the top, pp = 23 - b. Codes that straddle two words are joined
by one funnel shift.

- The GEMV multiplies that float by x * 2^(23 - pp) (`x_factor`, applied once per x element) and gets
  x * q + x * 2^(23 - pp): one FFMA per weight; the offset sum_j x_j * 2^(23 - pp_j) is x-only and is removed
  once per block (see gemv.py). The offset is up to 2^(W - 1) times the largest code, which costs about W - 1
  bits of the fp32 accumulator: W = 8 for 16-bit activations (an fp16 result needs 11 bits; the error stays far
  below the reference's own rounding of W to fp16), W = 1 for fp32 activations (fp32-accurate, one more SHF per
  code).
- The GEMM uses W = 1 and gets s * (q - z) with one FFMA: s * 2^b * (1 + q / 2^b) - s * (2^b + z).
"""

import triton
import triton.language as tl

ONE_BITS = 0x3F800000  # float bits of 1.0: passed to the kernels as an argument (`one`), not a constant, so that
# ptxas keeps it in one register and every code costs one LOP3 (u & mask-immediate | one); with both operands
# constants it rematerialises a constant before almost every LOP3


@triton.constexpr_function
def code_position(j: int, bits: int, window: int) -> int:
    """Mantissa bit where code j of a block is placed: its natural bit position in its word moved into the window
    [23 - bits - window + 1, 23 - bits]."""
    return (23 - bits) - (23 - bits + 32 - (j * bits) % 32) % window


@triton.jit
def x_factor(offs_j, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """2^(23 - code_position(j)) as float32 for an int tensor offs_j of code indices 0..31 (the GEMV scales x by
    it). The same formula as `code_position` on tensors; every operand is non-negative, so C's remainder agrees."""
    e = BITS + (23 - BITS + 32 - (offs_j * BITS) % 32) % WINDOW
    return ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def code_float(prev, w, one, j: tl.constexpr, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """Code j of a block as the float 1 + q * 2^(pp - 23), from w, the word holding its last bit, and prev, the
    word before it (used only when the code straddles the two). prev, w: uint32 tensors; one: ONE_BITS (uint32)."""
    p: tl.constexpr = (j * BITS) % 32
    pp: tl.constexpr = code_position(j, BITS, WINDOW)
    s: tl.constexpr = p - pp
    if p + BITS > 32:  # starts in prev, ends in w: one funnel shift (s > 0 here)
        u = (prev >> s) | (w << (32 - s))
    elif s > 0:
        u = w >> s
    elif s < 0:
        u = w << (-s)
    else:
        u = w
    mask: tl.constexpr = ((1 << BITS) - 1) << pp
    return ((u & mask) | one).to(tl.float32, bitcast=True)


@triton.constexpr_function
def ends_in(j: int, i: int, bits: int) -> bool:
    """Whether code j of a block ends in word i of the block."""
    return (j * bits + bits - 1) // 32 == i


@triton.constexpr_function
def bitrev5(j: int) -> int:
    return int(f"{j:05b}"[::-1], 2)


@triton.jit
def columns(t, NB: tl.constexpr):
    """[NB, 32] -> a tuple of its 32 columns ([NB] each) in bit-reversed order (column j at bitrev5(j)), by five
    rounds of reshape + split: no data moves once the 32 columns are held by one thread."""
    level = (t,)
    for lvl in tl.static_range(5):
        nxt = ()
        for i in tl.static_range(1 << lvl):
            a, b = tl.split(tl.reshape(level[i], (NB, 16 >> lvl, 2)))
            nxt = nxt + (a, b)
        level = nxt
    out = ()
    for i in tl.static_range(32):
        out = out + (tl.reshape(level[i], (NB,)),)
    return out


@triton.jit
def interleave(ws, NB: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tuple of 32 [NB, BLOCK_N] tensors (code j of each block at index j) -> [NB * 32, BLOCK_N] with row
    blk * 32 + j = ws[j][blk]: five rounds of join pairing j with j + 16, j + 8, ..., then a reshape."""
    level = ws
    for lvl in tl.static_range(5):
        nxt = ()
        for i in tl.static_range(16 >> lvl):  # pairs (i, i + 16 >> lvl)
            nxt = nxt + (tl.join(level[i], level[i + (16 >> lvl)]),)
        level = nxt
    t = level[0]  # [NB, BLOCK_N, 2 (j & 16), 2 (j & 8), 2, 2, 2 (j & 1)]
    t = tl.permute(t, (0, 2, 3, 4, 5, 6, 1))
    return tl.reshape(t, (NB * 32, BLOCK_N))


@triton.jit
def split_range(seg_ptr, pid_k, SPLIT_K, BLOCK_K: tl.constexpr):
    """The tiles [lo, hi) of split pid_k: tiles of BLOCK_K storage columns, counted over the 8 rows of the segment
    table in table order, cut into SPLIT_K equal runs."""
    total = 0
    for i in range(8):
        total += (tl.load(seg_ptr + i * 5 + 2) + BLOCK_K - 1) // BLOCK_K
    per = (total + SPLIT_K - 1) // SPLIT_K
    lo = pid_k * per
    return lo, tl.minimum(lo + per, total)


@triton.jit
def segment_tiles(cols, t0, lo, hi, BLOCK_K: tl.constexpr):
    """For a segment of `cols` columns whose tiles are numbered from t0: its tiles [a, b) (segment-local) that lie in
    the split's [lo, hi), and its tile count (the next segment's t0 - t0)."""
    nt = (cols + BLOCK_K - 1) // BLOCK_K
    return tl.maximum(lo, t0) - t0, tl.minimum(hi, t0 + nt) - t0, nt


@triton.jit
def write_out(ptrs, val, mask, ATOMIC: tl.constexpr):
    """Store y in its dtype, or add it atomically where the K range is split over programs (SPLIT_K > 1)."""
    if ATOMIC:
        tl.atomic_add(ptrs, val.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def segment_row(seg_ptr, i):
    """Row i of the segment table (triton_kernels.segment_table): bits, start, cols, word_start, group_start."""
    row = seg_ptr + i * 5
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
