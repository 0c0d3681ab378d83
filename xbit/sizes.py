"""Byte sizes: parsing user targets and counting a checkpoint's bytes before anything is quantized.

A size target is a file size: the bytes of the `.safetensors` files on disk, tensors plus each file's header. A
checkpoint's tensors are listed as entries (name, torch dtype, shape); `safetensors_header_bytes` gives the exact
header of one file of them, `safetensors_header_bound` a bound for any split into shards.
"""

import json
import re

import torch

from .format import layer_bytes, layer_shapes
from .rotation import signs_bytes

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

# safetensors' dtype names, in the order of its Rust `Dtype` enum: a file stores its tensors sorted by that order,
# descending, then by name (so the data offsets, and their digits, follow that order)
SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
                      torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_DTYPE_RANK = {d: i for i, d in enumerate(SAFETENSORS_DTYPES)}
FILE_METADATA = {"format": "pt"}  # what checkpoint.save writes into every file (transformers expects it)
GPTQ_BITS = (2, 3, 4, 8)  # the code widths GPTQModel / AutoGPTQ pack
GPTQ_WORD = 32  # bits per int32 word of qweight and qzeros


def parse_size(text: str) -> int:
    """'60MB', '1.2GB', '512MiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r} (examples: 60MB, 1.2GB, 512MiB, 123456)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---------------------------------------------------------------- entries and safetensors headers


def entry_bytes(entries) -> int:
    """Tensor bytes of entries (name, dtype, shape)."""
    total = 0
    for _, dtype, shape in entries:
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        total += n
    return total


def _entry_json(name: str, dtype: torch.dtype, shape, begin, end) -> str:
    """One tensor's `"name":{...}` as safetensors writes it (serde_json: compact, non-ASCII kept raw)."""
    info = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(name, ensure_ascii=False) + ":" + json.dumps(info, separators=(",", ":"))


def _padded_header(json_text: str) -> int:
    n = len(json_text.encode())
    return 8 + n + (-n) % 8  # u64 length prefix, then the JSON padded with spaces to a multiple of 8


def safetensors_header_bytes(entries, metadata: dict | None = FILE_METADATA) -> int:
    """Exact bytes before the tensor data in the file safetensors writes for entries (name, dtype, shape): an 8-byte
    length, then the compact JSON header ({"__metadata__": metadata} first, then the tensors in storage order:
    dtype descending, then name, each with its data offsets) padded with spaces to a multiple of 8 bytes."""
    ordered = sorted(entries, key=lambda e: (-_DTYPE_RANK[e[1]], e[0]))
    parts = [] if metadata is None else ['"__metadata__":' + json.dumps(metadata, separators=(",", ":"),
                                                                         ensure_ascii=False)]
    offset = 0
    for name, dtype, shape in ordered:
        end = offset + entry_bytes([(name, dtype, shape)])
        parts.append(_entry_json(name, dtype, shape, offset, end))
        offset = end
    return _padded_header("{" + ",".join(parts) + "}")


def shard_count_bound(total_bytes: int, max_shard_bytes: int) -> int:
    """Most files checkpoint.save's greedy split can make of total_bytes: two neighbouring shards always hold more
    than max_shard_bytes together (a shard is closed only when the next tensor does not fit)."""
    return 1 if total_bytes <= max_shard_bytes else 2 * total_bytes // max_shard_bytes + 1


def safetensors_header_bound(entries, total_bytes: int, max_shard_bytes: int) -> int:
    """Upper bound on the header bytes of all files when entries of total_bytes tensor bytes are split into shards
    of at most max_shard_bytes (as checkpoint.save does), in any order: every data offset is counted at the digits
    of total_bytes, and every shard pays the length prefix, the metadata and the most padding (7 bytes)."""
    digits = len(str(total_bytes))
    per_tensor = sum(len(_entry_json(n, d, s, 0, 0).encode()) - 2 + 2 * digits + 1 for n, d, s in entries)
    envelope = _padded_header('{"__metadata__":' + json.dumps(FILE_METADATA, separators=(",", ":")) + "}")
    return per_tensor + shard_count_bound(total_bytes, max_shard_bytes) * (envelope + 7)


# ---------------------------------------------------------------- a model's checkpoint, before quantizing


def float_entries(model, quantized: set[str], float_dtype: torch.dtype) -> list:
    """Entries of everything that is not a quantized weight, tied weights once (as checkpoint.save stores it):
    floats in float_dtype, other tensors in their own dtype."""
    seen, out = set(), []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.device.type != "meta" and t.numel() and key in seen:  # meta and empty tensors share a null pointer
            continue
        seen.add(key)
        if name.removesuffix(".weight") in quantized and name.endswith(".weight"):
            continue
        out.append((name, float_dtype if t.is_floating_point() else t.dtype, tuple(t.shape)))
    return out


def float_component_bytes(model, quantized: set[str], float_dtype: torch.dtype) -> int:
    """Bytes of everything that is not a quantized weight, tied weights once (as checkpoint.save stores it)."""
    return entry_bytes(float_entries(model, quantized, float_dtype))


def float_linear_bytes(linears: dict, float_dtype: torch.dtype) -> int:
    """Bytes the layers' weights would take unquantized (the ceiling every target must stay under)."""
    return sum(m.weight.numel() for m in linears.values()) * torch.empty((), dtype=float_dtype).element_size()


def uniform_counts(in_features: int, bits: int) -> list[int]:
    counts = [0] * 9
    counts[bits] = in_features
    return counts


def plan_bytes(linears: dict, counts: dict, group_size: int) -> int:
    """Bytes of the quantized layers (bias excluded: it is counted with the float components). A layer is anything
    with a [out, in] weight: nn.Linear, or an nn.Embedding table [vocabulary, dim]."""
    return sum(layer_bytes(*m.weight.shape, counts[n], group_size) for n, m in linears.items())


def _largest_xbit_entries(name: str, module, group_size: int) -> list:
    """A layer's tensors at the largest shapes any column counts give it (sum over depths b of ceil(c_b/32)*b words
    <= 8*(in//32) + 36, sum of ceil(c_b/G) groups <= in//G + 8), rotation signs included for a linear."""
    out_features, in_features = module.weight.shape
    entries = [(f"{name}.{t}", dtype, shape) for t, (shape, dtype) in
               layer_shapes(out_features, in_features, uniform_counts(in_features, 8), group_size).items()]
    largest = {"qweight": (8 * (in_features // 32) + 36, out_features),
               "scales": (in_features // group_size + 8, out_features),
               "zeros": (in_features // group_size + 8, out_features)}
    entries = [(n, d, largest.get(n.rsplit(".", 1)[1], s)) for n, d, s in entries]
    if isinstance(module, torch.nn.Linear):
        entries.append((f"{name}.rot_signs", torch.uint8, (signs_bytes(in_features),)))
    return entries


def planned_header_bytes(model, linears: dict, float_dtype: torch.dtype, group_size: int, total_bytes: int,
                         max_shard_bytes: int, counts: dict | None = None) -> int:
    """Safetensors header bytes of the checkpoint of `model` with `linears` quantized, whose tensors take at most
    total_bytes: exact where every layer's column counts are given (`counts[name]`, layers stored unrotated) and
    the checkpoint is one file; otherwise an upper bound, a layer whose counts are not chosen yet (counts None)
    taken at the largest shapes any counts give it."""
    entries = float_entries(model, set(linears), float_dtype)
    for name, m in linears.items():
        if counts is None:
            entries += _largest_xbit_entries(name, m, group_size)
        else:
            shapes = layer_shapes(*m.weight.shape, counts[name], group_size)
            entries += [(f"{name}.{t}", dtype, shape) for t, (shape, dtype) in shapes.items()]
    if counts is not None and total_bytes <= max_shard_bytes:
        return safetensors_header_bytes(entries)
    return safetensors_header_bound(entries, total_bytes, max_shard_bytes)


# ---------------------------------------------------------------- the GPTQ peer


def gptq_linears(model) -> dict:
    """The linears a GPTQ checkpoint quantizes: every nn.Linear but the output head (kept in float16)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def gptq_entries(model, bits: int, group_size: int, linears: dict | None = None) -> list:
    """The tensors of a standard GPTQ checkpoint (GPTQModel / AutoGPTQ layout) of `model`; see
    gptq_checkpoint_bytes. Raises ValueError where that layout cannot hold the model."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ checkpoints store {', '.join(map(str, GPTQ_BITS))}-bit codes, not {bits}")
    if group_size < 1:
        raise ValueError(f"group size must be a positive integer, got {group_size}")
    linears = gptq_linears(model) if linears is None else linears
    entries = float_entries(model, set(linears), torch.float16)  # biases included, in float16 as GPTQ keeps them
    for name, m in linears.items():
        out_features, in_features = m.weight.shape
        if in_features % GPTQ_WORD or out_features % GPTQ_WORD:
            raise ValueError(f"layer {name} ({in_features} -> {out_features}) does not fit GPTQ's layout, which "
                             f"packs input and output features in words of {GPTQ_WORD}")
        groups = -(-in_features // group_size)
        entries += [(f"{name}.qweight", torch.int32, (in_features * bits // GPTQ_WORD, out_features)),
                    (f"{name}.qzeros", torch.int32, (groups, out_features * bits // GPTQ_WORD)),
                    (f"{name}.scales", torch.float16, (groups, out_features)),
                    (f"{name}.g_idx", torch.int32, (in_features,))]
    return entries


def gptq_checkpoint_bytes(model, bits: int, group_size: int, linears: dict | None = None) -> int:
    """File bytes of a standard GPTQ checkpoint of `model` at `bits` with groups of `group_size` input features:
    the GPTQModel / AutoGPTQ tensor layout, in one safetensors file with {"format": "pt"} metadata.

    Per quantized linear (every nn.Linear but the output head unless `linears` says otherwise; in = K, out = N,
    groups g = ceil(K / G)):
        qweight  int32 [K*b/32, N]    4*K*N*b/32 bytes (codes packed across 32-bit words, 3 bits included)
        qzeros   int32 [g, N*b/32]    4*g*N*b/32
        scales   fp16  [g, N]         2*g*N
        g_idx    int32 [K]            4*K   (stored with or without act-order)
        bias     fp16  [N]            2*N   (only where the linear has one)
    Every other tensor (embeddings, output head, norms) in float16, tied weights once; plus the safetensors header
    (safetensors_header_bytes). GPTQModel packs only widths 2, 3, 4, 8 and refuses K or N not divisible by 32
    (older AutoGPTQ silently truncates there): both raise ValueError here.
    """
    entries = gptq_entries(model, bits, group_size, linears)
    return entry_bytes(entries) + safetensors_header_bytes(entries)
