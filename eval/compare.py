"""`python -m eval.compare`: quantize one model with several methods at exactly equal checkpoint bytes, evaluate.

    python -m eval.compare --model smollm2 --methods rtn gptq xbit --targets gptq:2 gptq:3 gptq:4 \
        --out runs/smollm2 --max-tokens 16384 --limit 100

Targets (each becomes one byte count shared by every method):
  gptq:B   the file bytes of a standard GPTQ B-bit g128 checkpoint of the model (GPTQModel/AutoGPTQ layout,
           xbit.sizes.gptq_checkpoint_bytes); rtn and gptq are that B-bit quantization itself there
  2.56     bits per weight over the whole checkpoint (bytes = bits x parameters / 8)
  60MB     a plain size (B, KB, MB, GB, KiB, MiB, GiB)
  gguf:T   llama.cpp's importance-matrix file of type T (Q2_K, Q3_K_M, IQ2_XS, ...), made from the model and the
           calibration sequences (eval.llamacpp; build it once with `python -m eval.llamacpp build`); method
           llamacpp is that file, the other methods get its bytes less its metadata (the tokenizer)
Elsewhere uniform methods (rtn, gptq) take the widest code width that fits; xbit fills the bytes. Every cell is
evaluated on its checkpoint written to disk and loaded back, as users get it.
Methods: rtn, gptq, xbit, llamacpp (only at gguf:T targets), and the xbit ablations xbit-uniform (the same
bytes, the allocation forced uniform), xbit-float-emb (embedding table and head kept float16 as GPTQ keeps them:
regime b), xbit-float-emb-uniform (both),
xbit-no-rotation / xbit-float-emb-no-rotation (the layers quantized in their original basis),
xbit-float-emb-minmax (min-max grids, as the baselines use), xbit-float-emb-no-tune (the grids as quantized, not
trained end to end), xbit-float-emb-tune32 (the tuning on the first 32 calibration sequences only) and
xbit-float-emb-sequential (every block quantized again on the quantized blocks' outputs, --final-pass sequential).

Every cell (method x target, plus the float reference) is written to OUT/cells/ as it finishes and reused on the
next run when its evaluation settings are unchanged. Methods this xbit build lacks get a skip line in the table.
Writes OUT/results.json, OUT/results.md (the Markdown table, also printed) and OUT/plots/*.png.

Regime: rtn and gptq keep the embedding table and lm_head in float16, as GPTQ does. xbit treats them as candidates
like every other weight (DESIGN regime a), within the same total bytes; xbit-float-emb shows regime b.
One xbit measurement (calibration statistics, column errors) per variant is saved in OUT and reused by every target.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REGIME = ("equal total checkpoint bytes; rtn/gptq/xbit-float-emb keep embeddings and lm_head float16 (regime b), "
          "xbit and xbit-uniform also allocate bits to them (regime a)")
# compare's method name -> (xbit.quantize method, extra keyword arguments)
METHODS = {"rtn": ("rtn", {}), "gptq": ("gptq", {}), "xbit": ("xbit", {}),
           "xbit-uniform": ("xbit", {"allocation": "uniform"}),
           "xbit-float-emb": ("xbit", {"quantize_embeddings": False}),
           "xbit-float-emb-uniform": ("xbit", {"quantize_embeddings": False, "allocation": "uniform"}),
           "xbit-no-rotation": ("xbit", {"rotation_block": 0}),
           "xbit-float-emb-no-rotation": ("xbit", {"quantize_embeddings": False, "rotation_block": 0}),
           "xbit-float-emb-minmax": ("xbit", {"quantize_embeddings": False, "grid": "minmax"}),
           "xbit-float-emb-no-tune": ("xbit", {"quantize_embeddings": False, "tune_epochs": 0}),
           "xbit-float-emb-tune32": ("xbit", {"quantize_embeddings": False, "tune_samples": 32}),
           "xbit-float-emb-sequential": ("xbit", {"quantize_embeddings": False, "final_pass": "sequential"}),
           "llamacpp": ("llamacpp", {})}
TEXT_SPLITS = ("sotu-eval", "sotu-calib", "moby")


class CompareError(ValueError):
    """Bad arguments or inputs: printed as one line, exit 2."""


# ---------------------------------------------------------------- targets


def _linears(model):
    import xbit

    return xbit.quantize.quantizable_linears(model)


def parameter_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _gguf_file(spec: str, args, model_path: str, tok) -> tuple[Path, dict]:
    """The llama.cpp file of a gguf:TYPE target, made once in OUT/gguf on the calibration sequences."""
    from eval import llamacpp
    from xbit.calibrate import calibration_ids

    if not Path(model_path).is_dir():
        raise CompareError(f"target {spec}: llama.cpp converts a local model folder, not {model_path!r}")
    texts = _calib_kwargs("gptq", args)["calib"]
    # xbit's windows (default seed: the first calib_samples draws are xbit's own) and spare ones for llama.cpp
    ids = calibration_ids(tok, texts, args.calib_samples + 8, args.calib_seq_len, seed=0)
    work = Path(args.out) / "gguf" / f"calib-{args.calib_samples}x{args.calib_seq_len}"
    return llamacpp.make(Path(model_path), spec.split(":", 1)[1], work, ids, args.calib_samples)


def resolve_target(spec: str, model, gguf=None) -> int:
    """A target string (gptq:B[:G], gguf:TYPE, bits per weight, or a size) -> checkpoint file bytes. gptq:B is the
    file of a standard GPTQ B-bit g128 checkpoint of the model (xbit.sizes.gptq_checkpoint_bytes); gguf:TYPE is a
    llama.cpp file less its metadata, made by gguf(spec) -> (path, info)."""
    import xbit
    from xbit.sizes import parse_size

    if spec.strip().startswith("gguf:"):
        return gguf(spec.strip())[1]["budget_bytes"]
    if spec.strip().startswith("gptq:"):
        try:
            return xbit.quantize.match_size(model, spec.strip())
        except xbit.quantize.UsageError as e:
            raise CompareError(f"cannot read target {spec!r}: {e}") from None
    if re.fullmatch(r"[0-9]*\.?[0-9]+", spec.strip()):
        bpw = float(spec)
        if not 0 < bpw < 16:
            raise CompareError(f"target {spec!r}: bits per weight must be in (0, 16)")
        return int(bpw * parameter_count(model) / 8)
    try:
        return parse_size(spec)
    except ValueError:
        raise CompareError(f"cannot read target {spec!r} (examples: gptq:3, 2.56, 60MB)") from None


# ---------------------------------------------------------------- cells


def _settings(args) -> dict:
    return {"texts": args.texts, "protocol": args.protocol, "ctx": args.ctx, "max_tokens": args.max_tokens,
            "n_seq": args.n_seq, "seq_len": args.seq_len, "tasks": args.tasks, "limit": args.limit,
            "group_size": args.group_size}


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cell_path(out: Path, key: str) -> Path:
    return out / "cells" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _evaluate(model, tok, args, texts: dict[str, list[str]]) -> tuple[dict, dict]:
    from eval.protocols import evaluate_perplexity

    ppl = {}
    for name, docs in texts.items():
        ppl[name] = evaluate_perplexity(model, tok, docs, protocol=args.protocol, ctx=args.ctx,
                                        max_tokens=args.max_tokens, n_seq=args.n_seq, seq_len=args.seq_len,
                                        batch_size=args.batch_size, progress=args.progress)
    tasks = {}
    if args.tasks:
        from eval.lm_eval_model import run_lm_eval, summarize_results

        res = run_lm_eval(model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size)
        tasks = summarize_results(res)
    return ppl, tasks


def _calib_kwargs(method: str, args) -> dict:
    """Calibration arguments for methods that take them (gptq, xbit): SOTU before 2000 unless --calib says."""
    if method == "rtn":
        return {}
    if getattr(args, "_calib_texts", None) is None:
        args._calib_texts = [t for docs in _load_texts([args.calib]).values() for t in docs]
    return {"calib": args._calib_texts, "calib_samples": args.calib_samples, "seq_len": args.calib_seq_len}


def _measurement_kwargs(method: str, extra: dict, args) -> dict:
    """xbit variants share one saved measurement per embedding regime, basis and calibration (made by the first
    target)."""
    if method != "xbit":
        return {}
    calib = hashlib.sha256(json.dumps([args.calib, args.calib_samples, args.calib_seq_len, args.group_size])
                           .encode()).hexdigest()[:8]
    regime = "b" if extra.get("quantize_embeddings") is False else "a"
    basis = "" if extra.get("rotation_block", 1) else "-original"
    grid = "" if extra.get("grid", "mse") == "mse" else "-minmax"
    path = Path(args.out) / f"measurement-{regime}{basis}{grid}-{calib}.safetensors"
    return {"load_measurement": path} if path.is_file() else {"save_measurement": path}


def _reloaded(model, tok, qconfig, report):
    """The checkpoint as users get it: written to disk and loaded back (xbit.load's dtype for the device)."""
    import xbit

    device = next(model.parameters()).device.type
    with tempfile.TemporaryDirectory(prefix="xbit-compare-") as scratch:
        xbit.checkpoint.save(model, tok, Path(scratch) / "checkpoint", qconfig, report)
        del model
        return xbit.load(Path(scratch) / "checkpoint", device=device)


def run_cell(ref_model, tok, method: str, target: str, target_bytes: int | None, args, texts) -> dict:
    """Quantize a copy of the reference (unless method == "reference") and evaluate it."""
    import xbit
    from xbit.calibrate import on_device
    from xbit.sizes import float_component_bytes

    key = "reference" if method == "reference" else f"{method}@{target}"
    cell = {"key": key, "method": method, "target": target, "target_bytes": target_bytes}
    t0 = time.time()
    if method == "reference":
        model = ref_model
        cell["checkpoint_bytes"] = float_component_bytes(ref_model, set(), torch.float16)
        cell["bits_per_weight_total"] = 16.0
    elif method == "llamacpp":
        from eval.assets import load_gguf

        path, info = args._gguf(target)
        model = load_gguf(path)  # llama.cpp's weights, computed in float32 like every cell
        params = parameter_count(model)
        cell.update(file_bytes=info["file_bytes"], checkpoint_bytes=info["file_bytes"],
                    bits_per_weight_total=8 * info["file_bytes"] / params, gguf=str(path),
                    quantize_seconds=round(info.get("imatrix_seconds", 0) + info["quantize_seconds"], 2),
                    phase_seconds={k.removesuffix("_seconds"): round(v, 2) for k, v in info.items()
                                   if k.endswith("_seconds")})
    else:
        model = copy.deepcopy(ref_model)
        base, extra = METHODS[method]
        # a uniform baseline at gptq:B is that B-bit quantization itself (stored in xbit's layout, which is a
        # little larger than the GPTQ file); every other cell must fit the target's file bytes
        width = int(target.split(":")[1]) if base in ("rtn", "gptq") and target.startswith("gptq:") else None
        target_kw = {"code_bits": width} if width else {"size": target_bytes}
        model, qconfig, report = xbit.quantize(model, tok, method=base, **target_kw,
                                               group_size=args.group_size, progress=args.progress,
                                               **_calib_kwargs(base, args), **extra,
                                               **_measurement_kwargs(base, extra, args))
        model = _reloaded(model, tok, qconfig, report)
        if not width and report["file_bytes"] > target_bytes:
            raise RuntimeError(f"{key}: {report['file_bytes']} file bytes exceed the target {target_bytes}")
        cell.update({k: report[k] for k in ("checkpoint_bytes", "file_bytes", "bits_per_weight_total",
                                            "bits_per_weight_layers")})
        cell["code_bits"] = report.get("code_bits")
        cell["learning"] = {k: report[k] for k in ("min_bits", "rounds", "best_cost", "tune_costs", "tune_kept_epoch")
                            if k in report}
        cell["quantize_seconds"] = round(time.time() - t0, 2)
        # the process's peak so far: run one cell per process (--methods M --targets T) for a cell's own figure
        cell.update({k: report.get(k) for k in ("phase_seconds", "peak_host_rss_bytes", "peak_device_bytes")})
        cell["layers"] = {n: {"counts": v["counts"], "bytes": v["bytes"], "out_features": v["out"]}
                          for n, v in report["layers"].items()}
    # the reference computed in float32, as every phase of the quantizers computes
    with on_device(model, next(model.parameters()).device) if method == "reference" else nullcontext():
        cell["ppl"], cell["tasks"] = _evaluate(model, tok, args, texts)
    cell["seconds"] = round(time.time() - t0, 2)
    cell["status"] = "ok"
    return cell


# ---------------------------------------------------------------- table


def _fmt(v, nd=3):
    return "" if v is None else f"{v:.{nd}f}"


def _task_columns(cells) -> list[tuple[str, str]]:
    cols = set()
    for c in cells:
        for task, metrics in (c.get("tasks") or {}).items():
            for metric in metrics:
                if metric in ("acc", "acc_norm", "perplexity"):
                    cols.add((task, metric))
    return sorted(cols)


def markdown_table(cells: list[dict], texts: list[str]) -> str:
    tcols = _task_columns(cells)
    head = ["method", "target", "bytes", "bits/w total", "bits/w linears", "code"]
    head += [f"ppl {t}" for t in texts] + [f"{t.removeprefix('xbit_')} {m}" for t, m in tcols]
    head += ["quantize s", "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [c["method"], c.get("target") or "-"]
        if c.get("status") != "ok":
            row += [f"{c.get('target_bytes') or '':,}" if c.get("target_bytes") else "",
                    f"{c['status']}: {c.get('message', '')}"] + [""] * (len(head) - 4)
        else:
            row += [f"{c.get('file_bytes', c['checkpoint_bytes']):,}", _fmt(c.get("bits_per_weight_total")),
                    _fmt(c.get("bits_per_weight_layers")), f"{c['code_bits']}-bit" if c.get("code_bits") else "-"]
            row += [_fmt(c["ppl"][t]["ppl"]) if t in c.get("ppl", {}) else "" for t in texts]
            row += [_fmt((c.get("tasks") or {}).get(t, {}).get(m), 2 if m == "perplexity" else 3) for t, m in tcols]
            rss = c.get("peak_host_rss_bytes")
            row += [_fmt(c.get("quantize_seconds"), 0), _fmt(rss / 2**30 if rss else None, 2)]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def _protocol_line(cells) -> str:
    from eval.protocols import describe

    for c in cells:
        for res in (c.get("ppl") or {}).values():
            return describe(res)
    return "no perplexity"


# ---------------------------------------------------------------- main


def _load_reference(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec
    if spec in ("smollm2", "qwen"):
        from eval.assets import model_dir

        path = str(model_dir(spec))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()  # as xbit.quantize's CLI loads it
    return model, tok, path


def _load_texts(specs: list[str]) -> dict[str, list[str]]:
    from eval.perplexity import load_texts

    out = {}
    for spec in specs:
        if spec in TEXT_SPLITS and not Path(spec).exists():
            from eval.assets import text_files

            out[spec] = load_texts(text_files(spec))
        elif Path(spec).exists():
            out[Path(spec).name] = load_texts([spec])
        else:
            raise CompareError(f"text not found: {spec} (a file, a folder, or one of {', '.join(TEXT_SPLITS)})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[4:]))
    p.add_argument("--model", default="smollm2", help="local folder, Hub id, or smollm2 / qwen (eval.assets)")
    p.add_argument("--methods", nargs="+", default=["xbit", "gptq", "rtn"],
                   help=f"any of {', '.join(METHODS)} (default: xbit gptq rtn)")
    p.add_argument("--targets", nargs="+", default=["gptq:2", "gptq:3", "gptq:4"])
    p.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the float reference row")
    p.add_argument("--texts", nargs="*", default=["sotu-eval", "moby"], help="perplexity texts (files or splits)")
    p.add_argument("--protocol", choices=["plain", "picollm"], default="plain", help="perplexity protocol")
    p.add_argument("--ctx", type=int, default=512, help="plain protocol window")
    p.add_argument("--max-tokens", type=int, default=None, help="plain protocol: cap on tokens per text")
    p.add_argument("--n-seq", type=int, default=128, help="picollm protocol: sequences per text")
    p.add_argument("--seq-len", type=int, default=1024, help="picollm protocol: tokens per sequence")
    p.add_argument("--tasks", default="xbit_offline",
                   help="lm-eval tasks, comma separated (offline: xbit_offline; Hub tasks work too); 'none' skips")
    p.add_argument("--limit", type=float, default=None, help="lm-eval --limit per task (count or fraction)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib", default="sotu-calib", help="calibration text for gptq/xbit (default sotu-calib)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences for gptq/xbit")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run(args, argv=None) -> dict:
    import xbit

    args.tasks = [] if args.tasks in ("", "none") else [t for t in args.tasks.split(",") if t]
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # the xbit measurement is saved here before any cell is written
    texts = _load_texts(args.texts)
    ref, tok, model_path = _load_reference(args.model)
    args._gguf = lambda spec: _gguf_file(spec, args, model_path, tok)
    targets = {t: resolve_target(t, ref, args._gguf) for t in args.targets}
    settings = _settings(args)
    available = {m for m, (base, _) in METHODS.items()
                 if base in getattr(xbit.quantize, "METHODS", ()) or base == "llamacpp"}
    plan = ([("reference", None)] if args.reference else []) + [(m, t) for t in args.targets for m in args.methods]
    cells = []
    for method, target in plan:
        key = "reference" if method == "reference" else f"{method}@{target}"
        path = _cell_path(out, key)
        tbytes = targets.get(target)
        sh = _settings_hash(settings if method in ("reference", "rtn") else
                            {**settings, "calib": [args.calib, args.calib_samples, args.calib_seq_len]})
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("settings_hash") == sh and old.get("target_bytes") == tbytes:
                print(f"[compare] {key}: done earlier, reused ({path})", file=sys.stderr)
                cells.append(old)
                continue
            print(f"[compare] {key}: settings changed, recomputing", file=sys.stderr)
        if method == "llamacpp" and not target.startswith("gguf:"):
            cells.append({"key": key, "method": method, "target": target, "target_bytes": tbytes,
                          "status": "skipped", "message": "llamacpp is made at gguf:TYPE targets only"})
            print(f"[compare] {key}: skipped, {cells[-1]['message']}", file=sys.stderr)
            continue
        if method != "reference" and method not in available:
            cells.append({"key": key, "method": method, "target": target, "target_bytes": tbytes,
                          "status": "skipped",
                          "message": f"method {method!r} not available in this xbit (has: {', '.join(sorted(available))})"})
            print(f"[compare] {key}: skipped, {cells[-1]['message']}", file=sys.stderr)
            continue
        print(f"[compare] {key}: running (target {tbytes} bytes)" if tbytes else f"[compare] {key}: running",
              file=sys.stderr)
        try:
            cell = run_cell(ref, tok, method, target, tbytes, args, texts)
        except xbit.quantize.UsageError as e:  # e.g. a target below what the method can write
            cells.append({"key": key, "method": method, "target": target, "target_bytes": tbytes,
                          "status": "skipped", "message": str(e).splitlines()[0]})
            continue
        cell["settings_hash"] = sh
        _write_json(path, cell)
        cells.append(cell)

    from eval import plots

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    table = markdown_table(cells, list(texts))
    command = "python -m eval.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"model: {model_path}  \ncommand: `{command}`  \ndate: {now}; machine: {machine}  \n"
              f"perplexity protocol: {_protocol_line(cells)}  \nregime: {REGIME}  \n"
              f"targets: " + ", ".join(f"{t} = {b:,} bytes" for t, b in targets.items()) + "\n")
    results = {"model": model_path, "command": command, "date": now, "machine": machine, "settings": settings,
               "regime": REGIME, "targets": targets, "cells": cells}
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(header + "\n" + table + "\n")
    results["plots"] = [str(p) for p in plots.write_all(cells, out / "plots")]
    results["table"] = table
    print(header)
    print(table)
    return results


def main(argv: list[str] | None = None) -> int:
    from eval.assets import AssetError

    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except (CompareError, AssetError, ValueError, OSError) as e:
        print(f"eval.compare: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval.compare: interrupted; finished cells are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
