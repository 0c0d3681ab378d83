"""The x-bit Triton kernel: one template, bit depth a constexpr, all segments of a layer in one launch.

Imported lazily by `triton_kernels` (it imports triton, and `triton.jit` decides at import time whether the
kernels run compiled or in the interpreter, from TRITON_INTERPRET).

Design
------
Segment table: an int32 [8, 5] tensor, one row per bit depth 1..8: (bits, start, cols, word_start, group_start),
see `triton_kernels.segment_table`. Absent depths have cols = 0. 0-bit columns are not in it: they contribute 0.

Work split: every segment is cut into K-tiles of BLOCK_K storage columns (BLOCK_K a multiple of the 32-column
packing block); the tiles of all segments are concatenated (depth 1 first, then 2, ...) and program
(pid_n, pid_k, pid_m) owns output columns [pid_n*BLOCK_N, +BLOCK_N), rows [pid_m*BLOCK_M, +BLOCK_M) and the
contiguous run pid_k of the concatenated tiles (SPLIT_K runs of equal tile count). A program walks the 8 table
rows at run time, intersects its run with the segment's tiles and, because the bit depth must be a constexpr
for the unpacking, branches `if bits == 1: ... elif bits == 2: ...` into `_segment`, which is specialised per
depth (8 copies of the inner loop in one compiled kernel, one launch per layer).

Inner loop (`_tile`): codes are gathered straight from qweight (word row `word_start + blk*B + (j*B)//32`,
shift `(j*B) % 32`, plus the next word for codes that straddle a word when 32 % B != 0); every load of a word
row is contiguous over the output dimension, so it is coalesced. Dequantization s * (q - z) is done in fp32
exactly like the reference, cast to the activation dtype and fed to `tl.dot` (BLOCK_M >= 16) or to a
broadcast multiply-and-sum (BLOCK_M == 1, the batch-1 GEMV). Scales/zeros: one row load per tile when the
tile lies in one group (GROUP_SIZE % BLOCK_K == 0), else a gathered [BLOCK_K, BLOCK_N] load.

Paths: decode (M <= DECODE_MAX_M): split-K, fp32 partial sums atomically added into a zeroed fp32 buffer
(bias added by the pid_k == 0 program), then cast. Prefill: tiled GEMM, SPLIT_K = 1, bias and cast fused,
stored directly. Both autotuned on (M bucket, N, K, bit mix, dtype).
"""

import os

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16
NSEG = 8  # table rows: bit depths 1..8
# Read when this module is imported, like triton.jit does. The kernels call no triton.language function that is
# itself @triton.jit (tl.cdiv...), since those are decorated when triton is imported and would not follow a
# TRITON_INTERPRET set after that.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _tile(acc, x_ptr, qw_ptr, s_ptr, z_ptr, t, offs_m, offs_n, m_mask, n_mask, M, N, stride_xm,
          start, cols, word_start, group_start,
          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          UPCAST_DOT: tl.constexpr):
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)  # segment-local storage columns
    k_mask = offs_k < cols
    # activations (already in storage order)
    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (start + offs_k)[None, :],
                 mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    # codes: column k is code j = k % 32 of packing block k // 32 (a little-endian stream of 32*BITS bits)
    bitpos = (offs_k % 32) * BITS
    row = word_start + (offs_k // 32) * BITS + bitpos // 32
    shift = bitpos % 32
    wmask = k_mask[:, None] & n_mask[None, :]
    lo = tl.load(qw_ptr + row[:, None] * N + offs_n[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)
    code = lo >> shift[:, None].to(tl.uint32)
    if 32 % BITS != 0:  # 3, 5, 6, 7 bits: some codes continue in the next word
        spill = (shift + BITS) > 32
        hi = tl.load(qw_ptr + (row + 1)[:, None] * N + offs_n[None, :], mask=wmask & spill[:, None],
                     other=0).to(tl.uint32, bitcast=True)
        code = code | (hi << tl.where(spill, 32 - shift, 0)[:, None].to(tl.uint32))
    q = (code & ((1 << BITS) - 1)).to(tl.float32)
    # scales / zeros: one row per group of GROUP_SIZE segment columns
    if GROUP_SIZE % BLOCK_K == 0:
        g = group_start + (t * BLOCK_K) // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        g = group_start + offs_k // GROUP_SIZE
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
    w = (s * (q - z)).to(xt.dtype)  # [BLOCK_K, BLOCK_N], rounded like the reference's dequantize(dtype=x.dtype)
    if BLOCK_M >= 16:
        if xt.dtype == tl.float32:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        elif UPCAST_DOT:  # the interpreter's tl.dot mishandles bfloat16; products of bf16 are exact in fp32
            acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    else:
        acc += tl.sum(xt.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _segment(acc, x_ptr, qw_ptr, s_ptr, z_ptr, t_lo, t_hi, offs_m, offs_n, m_mask, n_mask, M, N, stride_xm,
             start, cols, word_start, group_start,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          UPCAST_DOT: tl.constexpr):
    for t in range(t_lo, t_hi):
        acc = _tile(acc, x_ptr, qw_ptr, s_ptr, z_ptr, t, offs_m, offs_n, m_mask, n_mask, M, N, stride_xm,
                    start, cols, word_start, group_start, BITS, GROUP_SIZE, BLOCK_M, BLOCK_K, UPCAST_DOT)
    return acc


@triton.jit
def xbit_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, seg_ptr, bias_ptr, y_ptr,
                       M, N, K, stride_xm, stride_ym, m_key, bit_key,
                       GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST_DOT: tl.constexpr,
                       DEPTHS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_mask = offs_n < N
    m_mask = offs_m < M

    total = 0
    for i in range(8):
        total += (tl.load(seg_ptr + i * 5 + 2) + BLOCK_K - 1) // BLOCK_K  # no tl.cdiv: see INTERPRET
    per = (total + SPLIT_K - 1) // SPLIT_K
    lo = pid_k * per
    hi = tl.minimum(lo + per, total)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = 0
    for i in range(8):
        bits = tl.load(seg_ptr + i * 5)
        start = tl.load(seg_ptr + i * 5 + 1)
        cols = tl.load(seg_ptr + i * 5 + 2)
        word_start = tl.load(seg_ptr + i * 5 + 3)
        group_start = tl.load(seg_ptr + i * 5 + 4)
        nt = (cols + BLOCK_K - 1) // BLOCK_K
        a = tl.maximum(lo, t0) - t0
        b = tl.minimum(hi, t0 + nt) - t0
        if a < b:
            for k in tl.static_range(1, 9):  # unrolled: one constexpr-specialised body per depth present
                if (DEPTHS >> k) & 1:
                    if bits == k:
                        acc = _segment(acc, x_ptr, qw_ptr, s_ptr, z_ptr, a, b, offs_m, offs_n, m_mask, n_mask, M, N,
                                       stride_xm, start, cols, word_start, group_start, k, GROUP_SIZE, BLOCK_M,
                                       BLOCK_K, UPCAST_DOT)
        t0 += nt

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------- autotuning

def _cfg(bm, bn, bk, sk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps,
                         num_stages=stages)


# Few configs on purpose: each compiles the inner loop once per bit depth present (tens of seconds per config
# for a layer with many depths), and the first config is the one used under the interpreter.
# decode, batch 1: broadcast multiply-and-sum (no tensor cores needed), split-K over the concatenated tiles
GEMV_CONFIGS = [_cfg(1, 64, 64, 4, 4, 2), _cfg(1, 128, 64, 8, 4, 2), _cfg(1, 64, 128, 8, 4, 2),
                _cfg(1, 128, 128, 4, 4, 2), _cfg(1, 256, 64, 16, 8, 2), _cfg(1, 32, 128, 16, 4, 2)]
# decode, batch 2..16: one 16-row tl.dot tile, split-K
SPLITK_CONFIGS = [_cfg(16, 64, 64, 4, 4, 2), _cfg(16, 128, 64, 8, 4, 3), _cfg(16, 64, 128, 8, 4, 3),
                  _cfg(16, 128, 128, 4, 4, 3), _cfg(16, 256, 64, 16, 8, 3), _cfg(16, 64, 64, 1, 4, 3)]
# prefill: tiled GEMM
GEMM_CONFIGS = [_cfg(32, 64, 64, 1, 4, 2), _cfg(64, 64, 64, 1, 4, 3), _cfg(64, 128, 64, 1, 4, 3),
                _cfg(128, 128, 64, 1, 8, 3), _cfg(128, 64, 64, 1, 4, 3), _cfg(128, 256, 64, 1, 8, 3)]

KEY = ["m_key", "N", "K", "bit_key", "GROUP_SIZE", "HAS_BIAS"]  # + dtypes, added by triton


def _tuned(configs, reset=()):
    # under the interpreter, timing is meaningless and slow: the first config only
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=KEY,
                           reset_to_zero=list(reset) or None)(xbit_matmul_kernel)


_gemv = _tuned(GEMV_CONFIGS, reset=["y_ptr"])
_splitk = _tuned(SPLITK_CONFIGS, reset=["y_ptr"])
_gemm = _tuned(GEMM_CONFIGS)


def _m_key(m: int) -> int:
    return 1 if m == 1 else min(triton.next_power_of_2(m), 4096)


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor,
           table: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, bit_key: int = 0,
           out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for a stored x-bit layer; x [..., in] fp16/bf16/fp32, y in x's dtype.

    perm: int32/int64 storage order; table: `segment_table(...)`; out: optional preallocated y (every element is
    written); config: fixed launch parameters (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) instead
    of autotuning, for tests. BLOCK_M is 1 (GEMV) or >= 16 (tl.dot); SPLIT_K > 1 only for M <= DECODE_MAX_M.
    """
    n, k = scales.shape[1], x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)}")
    if m == 0 or n == 0:
        return out
    xp = x2.index_select(1, perm)  # storage order, contiguous
    y2 = out.view(m, n)
    decode = m <= DECODE_MAX_M
    y_buf = torch.zeros(m, n, dtype=torch.float32, device=x.device) if decode else y2
    bias_arg = bias if bias is not None else y_buf
    args = (xp, qweight, scales, zeros, table, bias_arg, y_buf, m, n, k, xp.stride(0), y_buf.stride(0), _m_key(m),
            bit_key)
    depths = (bit_key >> 8) & 0x1FE or 0x1FE  # depths present (bit b set for depth b); 0 means all
    common = dict(GROUP_SIZE=group_size, HAS_BIAS=bias is not None, ATOMIC=decode, DEPTHS=depths,
                  UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"]))

    if config is not None:
        meta = dict(config)
        if not decode and meta.get("SPLIT_K", 1) != 1:
            raise ValueError("SPLIT_K > 1 is only used on the decode path")
        xbit_matmul_kernel[grid(meta)](*args, **common, **meta)
    elif decode:
        tuner = _gemv if m == 1 else _splitk
        known = len(tuner.cache)
        tuner[grid](*args, **common)
        if len(tuner.cache) > known:  # this call benchmarked the configs, each adding into y_buf: run it once more
            y_buf.zero_()              # (newer triton resets after benchmarking too; older may not)
            tuner[grid](*args, **common)
    else:
        _gemm[grid](*args, **common)
    if decode:
        y2.copy_(y_buf)
    return out
