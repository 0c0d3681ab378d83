"""Checkpoints: a Hugging Face folder with safetensors, written atomically, validated before loading.

Size accounting: a checkpoint's tensor bytes are the sum over its stored tensors (every component, tied weights
once); its file bytes are the sizes of its .safetensors files on disk (tensors plus each file's header), the
number every size target bounds. Config, tokenizer and report files are not counted.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .format import READABLE_VERSIONS, layer_shapes
from .sizes import FILE_METADATA, safetensors_header_bytes

REPORT_NAME = "xbit_report.json"
MAX_SHARD_BYTES = 4 << 30  # tensor bytes per .safetensors file before save splits the checkpoint
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
                      "I16": torch.int16, "U8": torch.uint8, "I64": torch.int64, "I8": torch.int8}


class CheckpointError(ValueError):
    pass


def state_dict_to_store(model, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to write: tied weights once (first name wins), floats cast to the storage dtype."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.device.type != "meta" and t.numel() and key in seen:  # empty tensors share a null pointer
            continue
        seen.add(key)
        if t.is_floating_point() and not name.endswith((".scales", ".zeros")):
            t = t.to(float_dtype)
        out[name] = t.detach().contiguous().cpu()
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def file_bytes(tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """The bytes `save` writes into .safetensors files for these tensors (headers included), computed exactly
    without writing."""
    total = 0
    for shard in _shards(tensors, max_shard_bytes):
        entries = [(name, t.dtype, tuple(t.shape)) for name, t in shard.items()]
        total += tensor_bytes(shard) + safetensors_header_bytes(entries, FILE_METADATA)
    return total


def _shards(tensors: dict, max_shard_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    return shards + [cur]


def check_output(out_dir, overwrite: bool):
    """The output folder may be written: it does not exist, or is empty, or (with overwrite) holds an xbit
    checkpoint; nothing else is ever replaced. Its parent must be a folder (or not exist yet)."""
    out_dir = Path(out_dir).absolute()
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"output {out_dir}: {parent} is a file, not a folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"output {out_dir} is a file, not a folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"output folder {out_dir} exists and is not empty (use --overwrite)")
    if not _is_xbit_checkpoint(out_dir):
        raise CheckpointError(f"--overwrite replaces only an xbit checkpoint, and {out_dir} is not one "
                              "(no config.json with quant_method xbit); choose another --out")
    if Path.cwd().absolute() in (out_dir, *out_dir.parents):
        raise CheckpointError(f"output folder {out_dir} holds the current folder; choose another --out")


def _is_xbit_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "xbit"


def save(model, tokenizer, out_dir, quantization_config: dict, report: dict, float_dtype=torch.float16,
         max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> int:
    """Write model (with XbitLinear modules) as a checkpoint folder; returns the bytes of its .safetensors files
    on disk (headers included).

    Everything is written to a temporary folder beside `out_dir` and renamed into place at the end, so an
    interrupted or failed save never leaves a folder under the output name.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_to_store(model, float_dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config
        config["dtype"] = str(float_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata=FILE_METADATA)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=FILE_METADATA)
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": tensor_bytes(tensors)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
        written = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def read_header(path: Path) -> dict:
    """The safetensors header of a file, checked against the file's length (truncation names the tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file (header cut)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if 8 + n + info["data_offsets"][1] > size:
            raise CheckpointError(f"{path.name}: tensor {name} is truncated (file ends before its data)")
    return header


def validate(checkpoint_files, expected: dict[str, tuple[tuple, torch.dtype]]):
    """Check every expected tensor is present once with its shape and dtype; no pickle files at all."""
    found = {}
    for f in checkpoint_files or []:
        path = Path(f)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path.name}: xbit checkpoints load from safetensors only (no pickle files)")
        for name, info in read_header(path).items():
            found[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
    for name, (shape, dtype) in expected.items():
        if name not in found:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        fshape, fdtype = found[name]
        if fshape != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(fshape)}, expected {list(shape)}")
        if dtype is not None and fdtype != dtype:
            raise CheckpointError(f"tensor {name} has dtype {fdtype}, expected {dtype}")


def check_version(quantization_config: dict):
    v = quantization_config.get("format_version")
    if v not in READABLE_VERSIONS:
        raise CheckpointError(f"xbit checkpoint format_version {v} is not supported by this xbit (it reads "
                              f"format_version {', '.join(map(str, READABLE_VERSIONS))}); re-quantize the checkpoint")


def expected_xbit_tensors(layers: dict) -> dict:
    out = {}
    for name, spec in layers.items():
        for t, (shape, dtype) in layer_shapes(spec["out"], spec["in"], spec["counts"], spec["group_size"],
                                               spec.get("rotation_block", 0)).items():
            out[f"{name}.{t}"] = (shape, dtype)
    return out
