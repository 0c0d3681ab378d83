"""The x-bit layer format and its pure PyTorch reference: pack, unpack, dequantize, matmul.

This file is the single source of truth; every fast kernel is tested against `reference_matmul`.

A quantized linear y = x @ W.T (W: out x in) is stored as five tensors:

- ``bits``   uint8 [in]         bit depth 0..8 of each input column, in the original column order.
- ``perm``   int16/int32 [in]   storage order: storage position i holds original column ``perm[i]``.
                                ``bits[perm]`` is a sequence of runs, one run (a *segment*) per bit depth
                                present, in any order. 0-bit columns store nothing and dequantize to 0.
- ``qweight`` int32 [words, out]  codes of all segments, segment after segment. Inside a segment the columns
                                are taken in blocks of 32 (the last block padded with zero codes); a block is a
                                little-endian bit stream of 32*b bits held in b consecutive int32 rows, code j
                                at bits [j*b, j*b + b). Out is the contiguous dimension (GPTQ-style), so one
                                word row is a coalesced load for all output rows.
- ``scales``, ``zeros`` float16 [groups, out]  one pair per output row for each group of ``group_size``
                                consecutive columns inside a segment (the last group may be partial);
                                weight = scale * (code - zero). ``zeros`` are floats, so 1-bit columns get two
                                free levels.
- ``rot_signs`` uint8 [ceil(in/8)]  only in a layer stored in a rotated basis (xbit.rotation): W above is then
                                W_original @ R, and the module feeds R^T x to the matmul. The kernels and
                                `reference_matmul` never see R: they compute x @ W.T for whatever x they get.

A uniform GPTQ g128 layer with act-order is exactly a one-segment layer whose ``perm`` is the act order.
"""

from dataclasses import dataclass

import torch

from .rotation import signs_bytes

FORMAT_VERSION = 2  # 2: optional rot_signs (rotated layers); version 1 checkpoints read the same way
READABLE_VERSIONS = (1, 2)
MAX_BITS = 8
BLOCK = 32  # columns per packed block: 32 codes of b bits fill exactly b int32 words


@dataclass(frozen=True)
class Segment:
    bits: int
    start: int  # first storage position (index into perm)
    cols: int
    word_start: int  # first qweight row
    group_start: int  # first scales/zeros row

    def words(self) -> int:
        return segment_words(self.cols, self.bits)

    def groups(self, group_size: int) -> int:
        return segment_groups(self.cols, self.bits, group_size)


def segment_words(cols: int, bits: int) -> int:
    return -(-cols // BLOCK) * bits


def segment_groups(cols: int, bits: int, group_size: int) -> int:
    return -(-cols // group_size) if bits > 0 else 0


def perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 32767 else torch.int32


def segments_of(bits: torch.Tensor, perm: torch.Tensor, group_size: int) -> list[Segment]:
    """Split storage order into runs of equal bit depth; each depth may form one run only."""
    ordered = bits.long()[perm.long()].tolist()
    segs, seen, i, word, group = [], set(), 0, 0, 0
    while i < len(ordered):
        b, j = ordered[i], i
        while j < len(ordered) and ordered[j] == b:
            j += 1
        if b in seen:
            raise ValueError(f"bit depth {b} forms more than one segment in storage order")
        seen.add(b)
        seg = Segment(bits=b, start=i, cols=j - i, word_start=word, group_start=group)
        segs.append(seg)
        word += seg.words() if b > 0 else 0
        group += seg.groups(group_size)
        i = j
    return segs


def layer_shapes(out_features: int, in_features: int, counts: list[int], group_size: int,
                 rotation_block: int = 0) -> dict:
    """Tensor shapes of a layer from its per-depth column counts (counts[b] = columns at b bits); a layer stored
    in a rotated basis (rotation_block > 0, see xbit.rotation) also holds its packed input signs."""
    words = sum(segment_words(c, b) for b, c in enumerate(counts) if b > 0)
    groups = sum(segment_groups(c, b, group_size) for b, c in enumerate(counts) if c > 0)
    shapes = {
        "qweight": ((words, out_features), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "zeros": ((groups, out_features), torch.float16),
        "perm": ((in_features,), perm_dtype(in_features)),
        "bits": ((in_features,), torch.uint8),
    }
    if rotation_block:
        shapes["rot_signs"] = ((signs_bytes(in_features),), torch.uint8)
    return shapes


def layer_bytes(out_features: int, in_features: int, counts: list[int], group_size: int,
                rotation_block: int = 0) -> int:
    """Exact stored bytes of a quantized layer (bias not included)."""
    total = 0
    for shape, dtype in layer_shapes(out_features, in_features, counts, group_size, rotation_block).values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


# ---------------------------------------------------------------- packing


def _stream_positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(BLOCK, device=device) * bits
    return pos // 32, pos % 32  # word index inside the block, bit offset inside that word


ROW_SLICE_ELEMENTS = 1 << 24  # weights per slice of output rows: pack and dequantize hold int64 temporaries


def _row_slices(out: int, cols: int) -> list[slice]:
    step = max(1, ROW_SLICE_ELEMENTS // max(1, cols))
    return [slice(r, min(r + step, out)) for r in range(0, out, step)]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [out, cols] in 0..2^bits-1 -> int32 [ceil(cols/32)*bits, out]. Rows are packed independently,
    a slice of them at a time (a 128k-row head would need gigabytes of int64 temporaries at once)."""
    out, cols = codes.shape
    slices = _row_slices(out, cols)
    if len(slices) > 1:
        return torch.cat([pack(codes[s], bits) for s in slices], dim=1)
    nblk = -(-cols // BLOCK)
    c = torch.zeros(out, nblk * BLOCK, dtype=torch.int64, device=codes.device)
    c[:, :cols] = codes.to(torch.int64)
    if int(c.min()) < 0 or int(c.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    c = c.view(out, nblk, BLOCK)
    word, shift = _stream_positions(bits, codes.device)
    words = torch.zeros(out, nblk, bits + 1, dtype=torch.int64, device=codes.device)
    shifted = c << shift  # code j shifted into its word; may spill past bit 31 into the next word
    words.scatter_add_(2, word.expand(out, nblk, BLOCK), shifted & 0xFFFFFFFF)
    words.scatter_add_(2, (word + 1).expand(out, nblk, BLOCK), shifted >> 32)
    words = words[:, :, :bits]  # the spill word past the block is always empty
    # bit fields never overlap, so the sums above are exact ORs; store as signed int32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(out, nblk * bits).t().contiguous().to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [ceil(cols/32)*bits, out] -> int64 codes [out, cols]."""
    nwords, out = packed.shape
    nblk = nwords // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.view(nblk, bits, out)
    w = torch.cat([w, torch.zeros(nblk, 1, out, dtype=torch.int64, device=w.device)], dim=1)
    word, shift = _stream_positions(bits, packed.device)
    lo = w[:, word, :]  # [nblk, 32, out]
    hi = w[:, word + 1, :]
    codes = ((lo | (hi << 32)) >> shift.view(1, BLOCK, 1)) & ((1 << bits) - 1)
    return codes.reshape(nblk * BLOCK, out)[:cols].t()


# ---------------------------------------------------------------- reference math


def unpack_layer(qweight, perm, bits, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored codes of every column with bits > 0, in storage order: (codes uint8 [out, n], the scales/zeros
    row of each column [n], its original column index [n])."""
    perm = perm.long()
    codes, group, cols = [qweight.new_zeros(qweight.shape[1], 0, dtype=torch.uint8)], [], []
    for seg in segments_of(bits, perm, group_size):
        if seg.bits == 0:
            continue
        words = qweight[seg.word_start : seg.word_start + seg.words()]
        codes.append(torch.cat([unpack(words[:, s], seg.bits, seg.cols).to(torch.uint8)  # int64 a slice at a time
                                for s in _row_slices(words.shape[1], seg.cols)]))
        group.append(seg.group_start + torch.arange(seg.cols, device=perm.device) // group_size)
        cols.append(perm[seg.start : seg.start + seg.cols])
    empty = perm.new_zeros(0)
    return torch.cat(codes, 1), torch.cat([empty, *group]), torch.cat([empty, *cols])


def dequantize_unpacked(codes, group, cols, scales, zeros, in_features: int) -> torch.Tensor:
    """float32 [out, in] from `unpack_layer`'s output: scale * (code - zero), 0-bit columns zero. Differentiable
    in scales and zeros (xbit.tune trains them through it)."""
    w = scales[group].t().float() * (codes.float() - zeros[group].t().float())
    return w.new_zeros(w.shape[0], in_features).index_copy(1, cols, w)


def dequantize(qweight, scales, zeros, perm, bits, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """The reference: the float weight [out, in] in the original column order (computed a slice of output rows at a
    time, each row independent of the others)."""
    out, in_features = qweight.shape[1], bits.numel()
    slices = _row_slices(out, in_features)
    if len(slices) > 1:
        w = torch.empty(out, in_features, dtype=dtype, device=qweight.device)
        for s in slices:
            w[s] = dequantize(qweight[:, s], scales[:, s], zeros[:, s], perm, bits, group_size, dtype)
        return w
    codes, group, cols = unpack_layer(qweight, perm, bits, group_size)
    return dequantize_unpacked(codes, group, cols, scales, zeros, bits.numel()).to(dtype)


def reference_matmul(x, qweight, scales, zeros, perm, bits, group_size: int, bias=None) -> torch.Tensor:
    """y = x @ W.T (+ bias), W dequantized by `dequantize`; computed in x's dtype."""
    w = dequantize(qweight, scales, zeros, perm, bits, group_size, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def assemble(out: int, bits: torch.Tensor, perm: torch.Tensor, group_size: int, seg_codes, seg_scales, seg_zeros):
    """Stored tensors of a layer from per-segment codes [out, cols] and grids [groups, out], in storage order.

    The lists hold one entry per segment of `segments_of(bits, perm)` with bits > 0.
    """
    in_features = bits.numel()
    segs = [s for s in segments_of(bits, perm, group_size) if s.bits > 0]
    if not (len(segs) == len(seg_codes) == len(seg_scales) == len(seg_zeros)):
        raise ValueError("one codes/scales/zeros entry is needed per non-empty segment")
    device = bits.device
    qweight = [pack(c, s.bits) for s, c in zip(segs, seg_codes)]
    no_half = torch.zeros(0, out, dtype=torch.float16, device=device)
    return {
        "qweight": torch.cat(qweight) if qweight else torch.zeros(0, out, dtype=torch.int32, device=device),
        "scales": torch.cat(seg_scales).half() if seg_scales else no_half,
        "zeros": torch.cat(seg_zeros).half() if seg_zeros else no_half,
        "perm": perm.to(perm_dtype(in_features)),
        "bits": bits.to(torch.uint8),
    }
