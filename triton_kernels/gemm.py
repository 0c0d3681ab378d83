"""The tensor-core path (batch >= 2): y = x @ W.T with W dequantized tile by tile in registers and fed to tl.dot.

Same work split and segment walk as gemv.py, plus BLOCK_M rows of x per program. Per tile of BLOCK_K storage
columns (NB = BLOCK_K / 32 packing blocks): the b word rows of each block are loaded once as [NB, BLOCK_N]
tiles; code j becomes s * (q - z) with one LOP3, one shift and one FFMA (codes.py, every code at the top of the
mantissa), is rounded to x's dtype like the reference's dequantize, and the 32 code tiles are interleaved into the
[BLOCK_K, BLOCK_N] operand of tl.dot. x rows are gathered through perm in the load. SPLIT_K > 1 (decode batches)
adds the partial products atomically into y (zeroed by the launcher) in y's dtype.
"""

import triton
import triton.language as tl

from .codes import code_float, ends_in, interleave, segment_row, segment_tiles, split_range, write_out


@triton.jit
def _weights(w_ptrs, w_mask, s_ptr, z_ptr, g_row, g0, blk, cols, offs_n, n_mask, N, one,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr,
             DTYPE: tl.constexpr):
    """The dequantized tile [NB * 32, BLOCK_N] in DTYPE. g_row: offsets of each block's scale row (used when groups
    hold whole blocks; otherwise scale and zero are looked up per code)."""
    HI: tl.constexpr = (1 << BITS) * 1.0
    if GROUP_SIZE % 32 == 0:
        s = tl.load(s_ptr + g_row, mask=w_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_row, mask=w_mask, other=0.0).to(tl.float32)
        a = s * HI
        c = -s * (HI + z)
    prev = tl.zeros((NB, BLOCK_N), tl.uint32)
    ws = ()
    for i in tl.static_range(BITS):
        w = tl.load(w_ptrs + i * N, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        for j in tl.static_range(32):
            if ends_in(j, i, BITS):
                f = code_float(prev, w, one, j, BITS, 1)  # 1 + q / 2^BITS
                if GROUP_SIZE % 32 != 0:
                    col = blk * 32 + j
                    g = (g0 + col // GROUP_SIZE)[:, None] * N + offs_n[None, :]
                    m = (col < cols)[:, None] & n_mask[None, :]
                    s = tl.load(s_ptr + g, mask=m, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + g, mask=m, other=0.0).to(tl.float32)
                    a = s * HI
                    c = -s * (HI + z)
                ws = ws + (tl.fma(f, a, c).to(DTYPE),)
        prev = w
    return interleave(ws, NB, BLOCK_N)


@triton.jit
def _segment(acc, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, t_lo, t_hi, offs_m, m_mask, offs_n, n_mask, N, stride_xm,
             start, cols, word_start, group_start, one,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
             UPCAST_DOT: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // 32
    offs_b = tl.arange(0, NB)
    offs_k = tl.arange(0, BLOCK_K)
    nblk = (cols + 31) // 32
    for t in range(t_lo, t_hi):
        col = t * BLOCK_K + offs_k
        k_mask = col < cols
        src = tl.load(perm_ptr + start + col, mask=k_mask, other=0)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        blk = t * NB + offs_b
        w_mask = (blk < nblk)[:, None] & n_mask[None, :]
        w_ptrs = qw_ptr + (word_start + blk * BITS)[:, None] * N + offs_n[None, :]
        g_row = (group_start + (blk * 32) // GROUP_SIZE)[:, None] * N + offs_n[None, :]
        w = _weights(w_ptrs, w_mask, s_ptr, z_ptr, g_row, group_start, blk, cols, offs_n, n_mask, N, one,
                     BITS, GROUP_SIZE, NB, BLOCK_N, xt.dtype)
        if xt.dtype == tl.float32:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        elif UPCAST_DOT:  # the interpreter's tl.dot mishandles bfloat16; products of bf16 are exact in fp32
            acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    return acc


@triton.jit(do_not_specialize=["SPLIT_K"])  # a run-time split: one compiled kernel serves every SPLIT_K
def xbit_gemm_kernel(x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, seg_ptr, bias_ptr, y_ptr,
                     M, N, K, stride_xm, stride_ym, m_key, one_bits,
                     GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DEPTHS: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_mask = offs_n < N
    m_mask = offs_m < M
    one = one_bits.to(tl.uint32)

    lo, hi = split_range(seg_ptr, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = 0
    for i in range(8):
        bits, start, cols, word_start, group_start = segment_row(seg_ptr, i)
        a, b, nt = segment_tiles(cols, t0, lo, hi, BLOCK_K)
        if a < b:
            for k in tl.static_range(1, 9):
                if (DEPTHS >> k) & 1:
                    if bits == k:
                        acc = _segment(acc, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, a, b, offs_m, m_mask, offs_n,
                                       n_mask, N, stride_xm, start, cols, word_start, group_start, one, k, GROUP_SIZE,
                                       BLOCK_K, BLOCK_N, UPCAST_DOT)
        t0 += nt

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    write_out(y_ptrs, acc, y_mask, ATOMIC)
