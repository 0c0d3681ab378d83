"""Checkpoints: a Hugging Face folder with safetensors, written atomically, validated before loading (names, shapes,
dtypes and header sanity from the file headers) and after (the values the kernels index with or compute from).

Size accounting: a checkpoint's tensor bytes are the sum over its stored tensors (every component, tied weights
once); its file bytes are the sizes of its .safetensors files on disk (tensors plus each file's header), the
number every size target bounds. Config, tokenizer and report files are not counted.
"""

import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .format import MAX_BITS, READABLE_VERSIONS, layer_shapes
from .modules import XbitLinear
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


def tmp_prefix(name: str, pid: int | None = None) -> str:
    """Name prefix of save's temporary folder beside the output folder `name`: it names the saving process (pid and
    host), so that a later save can tell a folder left by a killed run from one of a live concurrent save."""
    return f".{name}.tmp-{os.getpid() if pid is None else pid}-{_host()}-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # no "-": remove_stale_tmp splits the name on it


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows: assume alive, remove nothing
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid at all: keep the folder
        return True
    return True


def remove_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove the temporary folders that earlier saves to `out_dir` left when killed (SIGKILL, power loss): those
    made on this host by a process that no longer exists. Returns what was removed."""
    out_dir = Path(out_dir).absolute()
    mine = re.compile(re.escape(f".{out_dir.name}.tmp-") + r"(\d+)-([^-]*)-[^-]*")
    removed = []
    for p in out_dir.parent.iterdir():
        m = mine.fullmatch(p.name)
        if m and m.group(2) == _host() and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)  # a concurrent save may be removing it too
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: restored at once
    os.umask(mask)
    return mask


def _normal_permissions(folder: Path):
    """mkdtemp makes its folder 0700 (and some writers make 0600 files): give the checkpoint the modes a plain mkdir
    and open() would, so that other users and services may read it as far as the umask allows."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def save(model, tokenizer, out_dir, quantization_config: dict, report: dict, float_dtype=torch.float16,
         max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> int:
    """Write model (with XbitLinear modules) as a checkpoint folder; returns the bytes of its .safetensors files
    on disk (headers included).

    Everything is written to a temporary folder beside `out_dir` (`.NAME.tmp-PID-HOST-XXXXXXXX`) and renamed into
    place at the end, so an interrupted or failed save never leaves a folder under the output name. With
    `overwrite`, the old checkpoint is renamed aside first and removed after the new one is in place (restored if
    that rename fails). A save that is
    killed outright (SIGKILL) cannot remove its temporary folder: the next save to the same output removes every
    such folder whose process (on this host) no longer exists, and keeps those of live concurrent saves. The
    folder and its files get the permissions the umask gives a plain mkdir and open() (0755 / 0644 under 022).
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)
    tensors = state_dict_to_store(model, float_dtype)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(out_dir.name), dir=out_dir.parent))
    aside = tmp.with_name(tmp.name + ".old")
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
        _normal_permissions(tmp)
        if out_dir.exists():  # the old checkpoint goes aside (named like tmp, so that a kill here leaves it to
            os.replace(out_dir, aside)  # remove_stale_tmp) and is removed only once the new one is in place
        os.replace(tmp, out_dir)
    except BaseException:
        if aside.exists() and not out_dir.exists():
            os.replace(aside, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return written


def read_header(path: Path) -> dict:
    """The safetensors header of a file, each entry checked (dtype, shape, data offsets inside the file and sized
    for its shape and dtype): any damage raises CheckpointError naming the file, and the tensor where there is one."""
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
        except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        why = _entry_problem(info)
        if why:
            raise CheckpointError(f"{path.name}: tensor {name} has a damaged header entry ({why})")
        if 8 + n + info["data_offsets"][1] > size:
            raise CheckpointError(f"{path.name}: tensor {name} is truncated (file ends before its data)")
    return header


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(info) -> str:
    """What is wrong with one tensor's header entry ("" if nothing)."""
    if not isinstance(info, dict):
        return "not a JSON object"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            return f"no {key}"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        return f"dtype {dtype!r}"
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        return f"shape {shape}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets}"
    if dtype in SAFETENSORS_DTYPES:  # other dtypes are refused by name in validate
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            return f"{offsets[1] - offsets[0]} bytes of data, its shape and dtype need {need}"
    return ""


def validate(checkpoint_files, expected: dict[str, tuple[tuple, torch.dtype]]) -> dict[str, str]:
    """Check every expected tensor is present once with its shape and dtype; no pickle files at all. Returns the
    file name of every tensor found (for the messages of `check_values`)."""
    found, files = {}, {}
    for f in checkpoint_files or []:
        path = Path(f)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path.name}: xbit checkpoints load from safetensors only (no pickle files)")
        for name, info in read_header(path).items():
            found[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
            files[name] = path.name
    for name, (shape, dtype) in expected.items():
        if name not in found:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        fshape, fdtype = found[name]
        if fshape != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(fshape)}, expected {list(shape)}")
        if dtype is not None and fdtype != dtype:
            raise CheckpointError(f"tensor {name} has dtype {fdtype}, expected {dtype}")
    return files


def check_spec(name: str, spec) -> None:
    """One layer's entry of quantization_config["layers"], before any shape is computed from it: positive sizes,
    columns per depth 0..8 that add up to the inputs, a positive group size, a rotation block that tiles the inputs."""

    def fail(why: str):
        raise CheckpointError(f"quantization_config: layer {name}: {why}")

    if not isinstance(spec, dict):
        fail("not a JSON object")
    for key in ("in", "out", "group_size"):
        if not _is_count(spec.get(key)) or spec[key] == 0:
            fail(f"{key} is {spec.get(key)!r}, expected a positive integer")
    counts = spec.get("counts")
    if not (isinstance(counts, list) and len(counts) == MAX_BITS + 1 and all(map(_is_count, counts))):
        fail(f"counts is {counts!r}, expected {MAX_BITS + 1} column counts (one per bit depth 0..{MAX_BITS})")
    if sum(counts) != spec["in"]:
        fail(f"counts add up to {sum(counts)} columns, the layer has {spec['in']}")
    block = spec.get("rotation_block", 0)
    if not _is_count(block) or (block and (block & (block - 1) or spec["in"] % block)):
        fail(f"rotation_block is {block!r}, expected 0 or a power of two dividing {spec['in']}")


def check_values(name: str, m: XbitLinear, files: dict[str, str] | None = None):
    """The values of a loaded xbit module `name` (XbitLinear or XbitEmbedding) that the kernels index with or
    compute from, a few vectorised passes per tensor: bits in 0..8 with the columns per depth that
    quantization_config gives (m.counts, from which the shapes were checked), perm a permutation of 0..in-1 with
    each depth one segment of storage order, scales and zeros finite. Raises CheckpointError naming the file (where
    `files` knows it) and the tensor."""

    def fail(tensor: str, why: str):
        where = (files or {}).get(f"{name}.{tensor}")
        raise CheckpointError(f"{where + ': ' if where else ''}tensor {name}.{tensor}: {why}")

    bits, perm, n = m.bits.long(), m.perm.long(), m.in_features
    if n == 0:
        return
    if int(bits.max()) > MAX_BITS:
        col = int((bits > MAX_BITS).int().argmax())
        fail("bits", f"column {col} has {int(bits[col])} bits (0..{MAX_BITS} allowed)")
    counts = torch.bincount(bits, minlength=MAX_BITS + 1).tolist()
    if counts != list(m.counts):
        fail("bits", f"columns per bit depth 0..{MAX_BITS} are {counts}, quantization_config says {list(m.counts)}")
    lo, hi = (int(v) for v in torch.aminmax(perm))
    if lo < 0 or hi >= n:
        i = int(((perm < 0) | (perm >= n)).int().argmax())
        fail("perm", f"entry {i} is {int(perm[i])} (must be 0..{n - 1})")
    seen = torch.bincount(perm, minlength=n)
    if int(seen.max()) > 1:  # n entries in range, none twice: a permutation
        fail("perm", f"column {int(seen.argmax())} appears more than once (perm must be a permutation of 0..{n - 1})")
    ordered = bits[perm]
    runs, depths = 1 + int((ordered[1:] != ordered[:-1]).sum()), sum(c > 0 for c in counts)
    if runs != depths:
        fail("perm", f"bits[perm] forms {runs} runs for {depths} bit depths (each depth must be one segment)")
    for tensor in ("scales", "zeros"):
        t = getattr(m, tensor)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            g, o = (int(i) for i in bad.nonzero()[0])
            fail(tensor, f"{float(t[g, o])} at [{g}, {o}] (scales and zeros must be finite)")


def check_model_values(model, files: dict[str, str] | None = None):
    """`check_values` for every xbit module of a loaded model: linears, expert projections (xbit.moe) and quantized
    embedding tables (a tied head holds no tensors of its own: its table is the embedding's). Tensors offloaded to
    the meta device are not there to check."""
    for name, m in model.named_modules():
        if isinstance(m, XbitLinear) and not m.bits.is_meta:
            check_values(name, m, files)


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
