"""llama.cpp's importance-matrix quants as a peer: built from the sources vendored in the llama-cpp-python sdist
(PyPI), run on xbit's own calibration sequences, and scored by xbit's perplexity code.

    pip install -e ".[eval,llamacpp]"    # its converter's Python needs
    python -m eval.llamacpp build        # into $XBIT_CACHE/llama.cpp (needs cmake and a C++ compiler; ~5 min, 2 cores)
    python -m eval.llamacpp path         # the folder of its binaries

`eval.compare --targets gguf:Q2_K ...` makes (once, cached in its run folder) the model's float16 GGUF, the
importance matrix of the calibration sequences and the TYPE file; method `llamacpp` is that file, loaded back with
transformers' GGUF dequantization; every other method gets the file's bytes less its metadata key-values (the
tokenizer, which xbit stores outside its counted .safetensors bytes), so xbit never gets more bytes than the peer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from eval.assets import AssetError, _Parser, cache_dir, load_gguf, run_command

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e570
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity")
TYPES = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
         "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL")


def root() -> Path:
    return cache_dir() / "llama.cpp"


def tool(name: str) -> Path:
    path = root() / "build" / "bin" / name
    if not path.is_file():
        raise AssetError(f"{name} not found in {path.parent}; build llama.cpp first: python -m eval.llamacpp build")
    return path


def _timed(cmd: list, what: str) -> float:
    """Wall seconds of a step (eval.assets.run_command: a failure is one line)."""
    t0 = time.time()
    run_command(cmd, what=what)
    return time.time() - t0


def build() -> Path:
    """Download the sdist, build the tools statically in a scratch folder, move it into place when done."""
    final = root()
    if (final / "build" / "bin" / TOOLS[0]).is_file():
        return final / "build" / "bin"
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-llama.cpp-", dir=final.parent))
    try:
        print(f"[eval.llamacpp] downloading the {SDIST} sdist ...", file=sys.stderr, flush=True)
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", work,
                     SDIST], what="pip download")
        sdist = next(work.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(work, members=members, filter="data")
        src = next(work.glob("*/vendor/llama.cpp"))
        out = work / "out"
        out.mkdir()
        shutil.move(src, out / "src")
        print("[eval.llamacpp] building (cmake, Release, GGML_NATIVE) ...", file=sys.stderr, flush=True)
        run_command(["cmake", "-S", out / "src", "-B", out / "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_SERVER=OFF"], what="cmake configure")
        run_command(["cmake", "--build", out / "build", "-j", os.cpu_count() or 2, "--target", *TOOLS],
                    what="cmake build")
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / "build" / "bin"


# ---------------------------------------------------------------- files


def metadata_bytes(path: Path) -> int:
    """Bytes of a GGUF file's metadata key-values (the tokenizer and hyperparameters, not the tensors)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return sum(sum(p.nbytes for p in f.parts) for name, f in reader.fields.items() if not name.startswith("GGUF."))


def budget_bytes(path: Path) -> int:
    """What another method may spend beside this file: its bytes less the metadata key-values."""
    return path.stat().st_size - metadata_bytes(path)


def chunk_count(imatrix: Path) -> int:
    """How many chunks of calibration text llama-imatrix averaged."""
    from gguf import GGUFReader

    return int(GGUFReader(imatrix).fields["imatrix.chunk_count"].contents())


def make(model_dir: Path, qtype: str, work: Path, ids=None, chunks: int = 0,
         threads: int | None = None) -> tuple[Path, dict]:
    """The model's file of type qtype made from its float folder, cached in work with the seconds of each step.
    With calibration token ids [n, seq_len]: an imatrix file, the importance matrix averaged over the first
    `chunks` windows (n > chunks: llama.cpp tokenizes their text again, a few tokens shorter, and puts a BOS token
    first in each chunk, so spare windows make up the last chunks). Without: plain llama-quantize."""
    if qtype not in TYPES:
        raise AssetError(f"unknown llama.cpp type {qtype!r}; choose from {', '.join(TYPES)}")
    out, info_path = work / f"{qtype}.gguf", work / f"{qtype}.json"
    if out.is_file() and info_path.is_file():
        return out, json.loads(info_path.read_text())
    imatrix_tool, quantize_tool = tool("llama-imatrix"), tool("llama-quantize")  # built, before any work
    convert = root() / "src" / "convert_hf_to_gguf.py"
    work.mkdir(parents=True, exist_ok=True)
    threads = str(threads or os.cpu_count() or 2)
    info = {}
    f16, imatrix, imatrix_info = work / "model-f16.gguf", work / "imatrix.gguf", work / "imatrix.json"
    if not f16.is_file():
        tmp = work / ".model-f16.gguf"
        info["convert_seconds"] = _timed([sys.executable, convert, model_dir, "--outtype", "f16", "--outfile", tmp],
                                         "convert_hf_to_gguf.py")
        os.replace(tmp, f16)
    if ids is not None and not imatrix.is_file():
        # xbit's calibration windows as text, one per chunk of the same length
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        text = work / "calibration.txt"
        text.write_text("".join(tok.decode(row) for row in ids.tolist()))
        tmp = work / ".imatrix.gguf"
        seconds = _timed([imatrix_tool, "-m", f16, "-f", text, "-o", tmp, "-c", ids.shape[1], "--chunks", chunks,
                          "-t", threads, "--no-ppl"], "llama-imatrix")
        imatrix_info.write_text(json.dumps({"imatrix_seconds": seconds, "imatrix_chunks": chunk_count(tmp)}))
        os.replace(tmp, imatrix)
    if ids is not None:  # every type's file costs the importance matrix, made once here
        info.update(json.loads(imatrix_info.read_text()))
    tmp = work / f".{qtype}.gguf"
    info["quantize_seconds"] = _timed([quantize_tool, *(["--imatrix", imatrix] if ids is not None else []), f16, tmp,
                                       qtype, threads], f"llama-quantize {qtype}")
    os.replace(tmp, out)
    info.update(file_bytes=out.stat().st_size, budget_bytes=budget_bytes(out))
    info_path.write_text(json.dumps(info, indent=1))
    return out, info


def speed(path: Path, prompt: int, new: int, threads: int, repeat: int) -> dict:
    """llama-bench on a file: {"pp": prompt tokens/s (pp<prompt>), "tg": generated tokens/s (tg<new>)}."""
    rows = json.loads(run_command([tool("llama-bench"), "-m", path, "-p", prompt, "-n", new, "-t", threads, "-r",
                                   repeat, "-o", "json"], what="llama-bench"))
    return {"pp": next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0),
            "tg": next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)}


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m eval.llamacpp", description=__doc__.split("\n\n")[0])  # errors: one line
    parser.add_argument("cmd", choices=["build", "path"])
    args = parser.parse_args(argv)
    try:
        print(build() if args.cmd == "build" else tool(TOOLS[0]).parent)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
