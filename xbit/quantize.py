"""`python -m xbit.quantize`: quantize a Hugging Face causal LM and write an xbit checkpoint.

Also the Python API: `xbit.quantize(model, tokenizer, method=..., bits=... | size=...)` quantizes in memory.
"""

import argparse
import dataclasses
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .format import FORMAT_VERSION, MAX_BITS
from .hf import layer_spec, set_submodule
from .modules import XbitEmbedding, XbitLinear, XbitTiedHead
from .arch import adapter_for, block_linears, embedding_and_head, split_experts
from .calibrate import (calibration_ids, decoder_layers_path, float_outside_blocks, init_distributed, on_device,
                        run_blocks)
from .gptq import act_order, quantize_weight_gptq
from .grid import GRIDS
from .learn import resolve_cost
from .method_xbit import quantize_xbit
from .rotation import MAX_BLOCK
from .rtn import quantize_weight_rtn
from .settings import ALLOCATIONS, FINAL_PASSES, METHODS, QuantizeSettings, UsageError, XbitOptions, parse_match
from .sizes import (float_component_bytes, float_linear_bytes, gptq_checkpoint_bytes, parse_size,
                    plan_bytes, planned_header_bytes, uniform_counts)
from .tune import DEFAULT_TUNE_EPOCHS, DEFAULT_TUNE_SAMPLES, TUNE_LR
from .usage import Usage

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantizable_linears(model) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks but the MoE routers (xbit.arch); the output head is not one of
    them (it stays float like GPTQ keeps it, unless xbit's embedding_candidates add it)."""
    return block_linears(model)


def embedding_candidates(model) -> tuple[dict, dict]:
    """The input embedding table and the output head, as xbit candidates (DESIGN regime a); see
    xbit.arch.embedding_and_head (a tied table is one candidate)."""
    return embedding_and_head(model)


def _uniform_plan(linears, bits: int) -> dict:
    return {n: uniform_counts(m.in_features, bits) for n, m in linears.items()}


def choose_uniform_bits(model, linears, group_size, float_dtype, bits=None, size=None) -> int:
    """Code width for a uniform method: the widest whose stored bits per weight (all overhead counted) stay within
    `bits`, or whose files (headers included) fit `size`."""
    fixed = float_component_bytes(model, set(linears), float_dtype)
    params = sum(m.weight.numel() for m in linears.values())
    float_total = fixed + float_linear_bytes(linears, float_dtype)
    if size is not None and size >= float_total:
        raise UsageError(f"--size {size} bytes is not below the float checkpoint ({float_total} bytes): nothing to do")

    def fits(b):
        plan = _uniform_plan(linears, b)
        layer_bytes = plan_bytes(linears, plan, group_size)
        if bits is not None:
            return 8 * layer_bytes / params <= bits
        header = planned_header_bytes(model, linears, float_dtype, group_size, size, checkpoint.MAX_SHARD_BYTES,
                                      counts=plan)  # a bound on the safetensors headers of the files written
        return fixed + layer_bytes + header <= size

    for b in range(MAX_BITS, 0, -1):
        if fits(b):
            return b
    smallest = plan_bytes(linears, _uniform_plan(linears, 1), group_size)
    what = f"{8 * smallest / params:.3f} bits per weight" if bits is not None else f"{fixed + smallest} bytes"
    raise UsageError(f"the target is below the smallest checkpoint a uniform method can write ({what} at 1 bit)")


@torch.no_grad()
def quantize_model(model, tokenizer=None, calib: list[str] | None = None, device=None, progress: bool = True,
                   settings: QuantizeSettings | None = None, usage: Usage | None = None, **options):
    """Replace the model's linears by XbitLinear in place; returns (model, quantization_config, report).

    `settings` (xbit.settings.QuantizeSettings), or the same as keyword arguments (method="xbit", bits=2.56,
    rounds=4, ...). rtn needs nothing else; gptq and xbit need `tokenizer` and `calib` (a list of texts). `bits`
    is the average stored bits per weight of the quantized layers (all overhead counted) and `size` the bytes of
    the checkpoint files, for every method; rtn and gptq take an integer `code_bits` instead. For xbit, `cost` is
    "kl", "ce" or a callable (logits, ref_logits, ids) -> scalar that is 0 when the outputs are identical. With
    `quantize_embeddings` (xbit only) the embedding table and output head are candidates too (tied ones as one
    table). xbit stores the decoder-block linears in a random-sign block Hadamard basis with blocks of up to
    `rotation_block` input features (0: no rotation; see xbit.rotation), and fits each group's grid by `grid`
    ("mse" or "minmax"; the rtn and gptq baselines always use minmax, the published GPTQ grid). xbit then trains
    the grids (scales and zeros) end to end against the cost for up to `tune_epochs` passes over the
    calibration sequences (the first `tune_samples` if set; xbit.tune; 0 epochs: no tuning). Every target is
    verified on the result. `usage` (xbit.usage.Usage) times the phases; the report gets its wall times and peak memory.
    """
    usage = usage or Usage()
    s = settings or QuantizeSettings.from_kwargs(**options)
    adapter = adapter_for(model)
    experts_split = split_experts(model, adapter)  # MoE: one nn.Linear per expert projection (xbit.moe)
    if s.match and s.method == "xbit":
        s = dataclasses.replace(s, match=None, size=match_size(model, s.match))
    elif s.match:  # a uniform baseline at gptq:B[:G] is that quantization itself
        width, group = parse_match(s.match)
        s = dataclasses.replace(s, match=None, code_bits=width, group_size=group)
    method, group_size, float_dtype = s.method, s.group_size, s.float_dtype
    float_outside_blocks(model)  # the blocks stay in their stored dtype and compute in float32 one at a time
    linears = quantizable_linears(model)
    if not linears:
        raise UsageError("the model has no nn.Linear layers to quantize")
    device = device or next(model.parameters()).device
    t0 = time.time()
    tied = {}
    if method == "xbit" and s.xbit.quantize_embeddings:
        extra_layers, tied = embedding_candidates(model)
        linears = {**linears, **extra_layers}
    if method == "xbit":
        budget = xbit_layer_budget(model, linears, group_size, float_dtype, bits=s.bits, size=s.size)
        width = None
    else:
        width = s.code_bits or choose_uniform_bits(model, linears, group_size, float_dtype, bits=s.bits, size=s.size)
    if method != "rtn" and (tokenizer is None or not calib):
        raise UsageError(f"{method} needs a tokenizer and calibration texts")
    layers, extra = {}, {}

    def replace(name, old, tensors, rotation_block=0):
        if isinstance(old, nn.Embedding):
            new = XbitEmbedding.from_tensors(tensors, group_size, dtype=old.weight.dtype,
                                             embed_scale=adapter.scale_of(old))
            for head, table in tied.items():
                if table == name:
                    set_submodule(model, head, XbitTiedHead(new))
        else:
            bias = old.bias.detach().to(float_dtype) if old.bias is not None else None
            new = XbitLinear.from_tensors(tensors, bias, group_size, rotation_block)
        set_submodule(model, name, new)
        layers[name] = layer_spec(new)
        # the float weight is freed now, not after the last phase (what still needs it, the teacher's head, holds
        # its own reference)
        old.weight.data = old.weight.data.new_empty(0)

    def uniform_bits(lin):
        return torch.full((lin.in_features,), width, dtype=torch.uint8, device=lin.weight.device)

    if method == "xbit":
        extra = quantize_xbit(model, tokenizer, linears, replace, budget, calib, device, s, tied=tied,
                              progress=progress, usage=usage)
    if method == "gptq":
        ids = calibration_ids(tokenizer, calib, s.calib_samples, s.seq_len, s.seed)
        prefix = decoder_layers_path(model)

        def quantize_block(index, block, hessians):
            for local, h in hessians.items():
                name = f"{prefix}.{index}.{local}"
                if name in linears:
                    lin = linears[name]
                    tensors = quantize_weight_gptq(lin.weight, h, uniform_bits(lin), act_order(h), group_size, s.damp)
                    replace(name, lin, tensors)

        with usage.phase("quantize"):
            run_blocks(model, ids, device, quantize_block, progress=progress)
    for name, lin in tqdm([kv for kv in linears.items() if kv[0] not in layers], desc=f"rtn {width}-bit",
                          disable=not progress or method != "rtn"):
        if width is None:
            raise UsageError(f"layer {name} lies outside the decoder blocks; xbit cannot quantize it yet")
        order = torch.arange(lin.in_features, device=lin.weight.device)
        replace(name, lin, quantize_weight_rtn(lin.weight, uniform_bits(lin), order, group_size))
    qconfig = {"quant_method": "xbit", "format_version": FORMAT_VERSION, "method": method, "layers": layers}
    if experts_split:
        qconfig["split_experts"] = True
    if tied:
        qconfig["tied"] = tied  # transformers must not tie (there is no .weight): xbit.hf ties the table on load
        model.config.tie_word_embeddings = False
    report = summarize(model, linears, float_dtype, method=method, code_bits=width, group_size=group_size,
                       seconds=time.time() - t0, **extra, **usage.report(device))
    verify_target(report, s)
    report["target_bytes"] = s.size  # --match resolved to bytes (xbit) or to a code width and group (rtn, gptq)
    return model, qconfig, report


def verify_target(report: dict, s: QuantizeSettings):
    """The result meets its target (a failure here is a bug in xbit, not in the input)."""
    if s.size is not None and report["file_bytes"] > s.size:
        raise RuntimeError(f"result {report['file_bytes']} file bytes exceeds the target {s.size} (a bug)")
    if s.bits is not None and report["bits_per_weight_layers"] > s.bits:
        raise RuntimeError(f"result {report['bits_per_weight_layers']:.4f} bits per weight exceeds the target "
                           f"{s.bits} (a bug)")
    if s.code_bits is not None and report["code_bits"] != s.code_bits:
        raise RuntimeError(f"result has {report['code_bits']}-bit codes, not {s.code_bits} (a bug)")


def xbit_layer_budget(model, linears, group_size, float_dtype, bits=None, size=None) -> int:
    """Bytes the quantized layers may use: bits * weights / 8, or the file size left after the float components
    and a bound on the safetensors headers (every layer at its largest shapes: its counts are not chosen yet)."""
    fixed = float_component_bytes(model, set(linears), float_dtype)
    params = sum(m.weight.numel() for m in linears.values())
    float_total = fixed + float_linear_bytes(linears, float_dtype)
    header = 0 if size is None else planned_header_bytes(model, linears, float_dtype, group_size, size,
                                                         checkpoint.MAX_SHARD_BYTES)
    budget = int(bits * params / 8) if bits is not None else size - fixed - header
    smallest = plan_bytes(linears, {n: [m.weight.shape[1]] + [0] * MAX_BITS for n, m in linears.items()}, group_size)
    if budget < smallest:
        raise UsageError(f"target is below the smallest checkpoint the format can hold "
                         f"({fixed + header + smallest} bytes, every column at 0 bits)")
    if fixed + budget >= float_total:
        raise UsageError(f"target ({fixed + header + budget} bytes) is not below the float checkpoint "
                         f"({float_total} bytes)")
    return budget


def match_size(model, spec: str) -> int:
    """'gptq:3' (groups of 128) or 'gptq:3:64' -> the file bytes of a standard GPTQ checkpoint of this model
    (GPTQModel / AutoGPTQ layout, headers included; xbit.sizes.gptq_checkpoint_bytes)."""
    bits, group = parse_match(spec)
    split_experts(model)  # MoE: the GPTQ file holds one linear per expert projection, as xbit quantizes them
    try:
        return gptq_checkpoint_bytes(model, bits, group, linears=quantizable_linears(model))
    except ValueError as e:
        raise UsageError(f"--match {spec!r}: {e}") from None


def summarize(model, original_linears: dict, float_dtype, **extra) -> dict:
    """Bytes and bits per weight of the quantized model as the checkpoint will store it."""
    quantized = {n: model.get_submodule(n) for n in original_linears}
    q_bytes = sum(m.stored_bytes() - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                  for m in quantized.values())
    q_params = sum(m.in_features * m.out_features for m in quantized.values())
    tensors = checkpoint.state_dict_to_store(model, float_dtype)
    total = checkpoint.tensor_bytes(tensors)
    params = sum(p.numel() for p in {id(p): p for p in original_params(model, quantized)}.values())
    return {**extra, "checkpoint_bytes": total, "file_bytes": checkpoint.file_bytes(tensors),
            "quantized_layer_bytes": q_bytes, "quantized_params": q_params,
            "bits_per_weight_layers": 8 * q_bytes / q_params, "bits_per_weight_total": 8 * total / params,
            "layers": {n: {"counts": m.counts, "bytes": m.stored_bytes(), "in": m.in_features, "out": m.out_features}
                       for n, m in quantized.items()}}


def original_params(model, quantized: dict):
    """Float parameters plus one virtual 'out x in' weight per quantized layer (for bits per weight)."""
    for p in model.parameters():
        yield p
    for m in quantized.values():
        yield torch.empty(m.out_features, m.in_features, device="meta")


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xbit.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hub id or local folder (default: the fetched SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="xbit", help=f"quantization method: {', '.join(METHODS)} (default xbit)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bits", type=float, help="average stored bits per weight of the quantized layers, all "
                        "overhead counted (every method; rtn/gptq take the widest code width that fits)")
    target.add_argument("--size", help="bytes of the checkpoint's .safetensors files, e.g. 60MB, 1.2GB")
    target.add_argument("--match", help="the file size of a standard GPTQ checkpoint of the model, gptq:BITS[:GROUP] "
                        "(GPTQModel layout, group 128 by default); rtn/gptq: that quantization itself")
    target.add_argument("--code-bits", type=int, help="rtn/gptq: integer code width 1..8 (no size target)")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale/zero group (default 128)")
    p.add_argument("--calib", help="calibration text: file, folder of .txt, or datasets:NAME "
                   "(default: State of the Union addresses before 2000)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--damp", type=float, default=0.01, help="gptq dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost", default="kl", help="xbit task cost: kl (default), ce, or module:function (a callable "
                   "(logits, ref_logits, ids) -> scalar, called per sequence)")
    p.add_argument("--cost-data", help="texts for --cost ce (file, folder or datasets:NAME)")
    p.add_argument("--allocation", default="learned", choices=ALLOCATIONS,
                   help="xbit: learned (default), proxy (no end-to-end learning) or uniform (ablation)")
    p.add_argument("--rounds", type=int, default=4,
                   help="xbit: rounds of allocation learning; round 0 scores the uniform allocation, a worse round "
                        "shrinks the next step (default 4; use 5 at 2 bits)")
    p.add_argument("--min-bits", type=int, default=None,
                   help="xbit: smallest column depth allowed, 0..8 (default 2, lowered where the size needs it)")
    p.add_argument("--importance", type=float, default=0.5,
                   help="xbit: exponent on E[x_j^2] in the column error (default 0.5; 1 = plain output MSE)")
    p.add_argument("--no-compensate", action="store_true",
                   help="xbit: plain rounding instead of GPTQ-style compensation")
    p.add_argument("--float-embeddings", action="store_true",
                   help="xbit: keep the embedding table and output head in float, as GPTQ does (default: they are "
                        "candidates for bits like every other weight)")
    p.add_argument("--rotation-block", type=int, default=MAX_BLOCK,
                   help="xbit: largest block of the random-sign Hadamard rotation of each decoder-block linear's "
                        f"inputs, a power of two (default {MAX_BLOCK}; 0: no rotation)")
    p.add_argument("--grid", default="mse", choices=GRIDS,
                   help="xbit: fit each group's grid to minimise its squared error by clipping its range (mse, "
                        "default) or use the published GPTQ grid of the rtn and gptq baselines (minmax: the range "
                        "with 0 in it, an integer zero point)")
    p.add_argument("--final-pass", default="reuse", choices=FINAL_PASSES,
                   help="xbit: reuse (default) keeps the layers as the learning quantized them, GPTQ with the float "
                        "model's E[x x^T]; sequential quantizes every block again, GPTQ's way, with E[x x^T] of the "
                        "quantized blocks before it (one more pass over the calibration data)")
    p.add_argument("--tune-epochs", type=int, default=DEFAULT_TUNE_EPOCHS,
                   help="xbit: passes over the calibration sequences training the scales and zeros end to "
                        f"end against the cost, codes fixed; stops at an epoch that does not help (default "
                        f"{DEFAULT_TUNE_EPOCHS}; 0: off)")
    p.add_argument("--tune-lr", type=float, default=TUNE_LR, help=f"xbit: Adam step of that tuning (default {TUNE_LR})")
    p.add_argument("--tune-samples", type=int, default=DEFAULT_TUNE_SAMPLES,
                   help="xbit: train the tuning on only the first N calibration sequences (default: all of them; 32 of "
                        "128 tunes ~3x faster at ~2%% higher perplexity)")
    p.add_argument("--save-measurement", help="xbit: save calibration statistics and column errors (safetensors)")
    p.add_argument("--load-measurement", help="xbit: reuse a saved measurement (same model and group size)")
    p.add_argument("--out", help="output checkpoint folder (omit to only report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float16", choices=sorted(FLOAT_DTYPES),
                   help="storage dtype of the float components (default float16)")
    p.add_argument("--eval-text", nargs="+", metavar="TEXT",
                   help="also report perplexity of the original and quantized model on these texts "
                        "(files, or sotu-eval / moby)")
    p.add_argument("--eval-max-tokens", type=int, default=None, help="cap on evaluation tokens per text")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--bos", action="store_true", help="start every perplexity window with the BOS token (for "
                   "models that expect it)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_model(model_id: str | None, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_id is None:
        from eval.assets import AssetError, model_dir

        try:
            model_id = str(model_dir("smollm2"))
        except AssetError as e:
            raise UsageError(f"cannot fetch the default model ({e}); pass --model") from None
    elif Path(model_id).exists() and not (Path(model_id) / "config.json").exists():
        raise UsageError(f"--model {model_id}: folder has no config.json")
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")  # the stored dtype, on the host
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {model_id}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok, model_id


def _default_calib() -> list[str]:
    """State of the Union addresses before 2000 (eval.assets fetches them once into the cache)."""
    from eval.assets import AssetError, text_files

    try:
        return [p.read_text(encoding="utf-8") for p in text_files("sotu-calib")]
    except AssetError as e:
        raise UsageError(f"default calibration text unavailable ({e}); pass --calib") from None


def _perplexities(model, tok, args, progress) -> dict:
    from eval.perplexity import load_texts, perplexity, resolve_text

    out = {}
    for spec in args.eval_text:
        _, paths = resolve_text(spec)
        out[spec] = perplexity(model, tok, load_texts(paths), ctx=args.ctx, bos=args.bos,
                               max_tokens=args.eval_max_tokens, progress=progress)["ppl"]
    return out


def print_table(rows: list[tuple[str, str]]):
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def settings_from_args(args, size: int | None) -> QuantizeSettings:
    xbit_options = XbitOptions(cost=args.cost, allocation=args.allocation, rounds=args.rounds,
                               compensate=not args.no_compensate, importance=args.importance, min_bits=args.min_bits,
                               quantize_embeddings=not args.float_embeddings, rotation_block=args.rotation_block,
                               grid=args.grid, tune_epochs=args.tune_epochs, tune_lr=args.tune_lr,
                               tune_samples=args.tune_samples, final_pass=args.final_pass,
                               save_measurement=args.save_measurement, load_measurement=args.load_measurement)
    return QuantizeSettings(method=args.method, bits=args.bits, size=size, code_bits=args.code_bits, match=args.match,
                            group_size=args.group_size,
                            calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, damp=args.damp,
                            float_dtype=FLOAT_DTYPES[args.dtype], xbit=xbit_options)


def run(args) -> int:
    size = parse_size(args.size) if args.size is not None else None
    settings = settings_from_args(args, size)  # validates every option once
    if args.out:
        checkpoint.check_output(args.out, args.overwrite)
    if args.load_measurement and not Path(args.load_measurement).is_file():
        raise UsageError(f"--load-measurement {args.load_measurement} not found")
    if args.cost not in ("kl", "ce"):
        resolve_cost(args.cost)  # an unimportable cost fails before any work
    calib = None
    if args.calib:
        from .calib import load_calib_texts

        calib = load_calib_texts(args.calib)  # read now so a bad path fails before any work
    elif args.method != "rtn":
        calib = _default_calib()
    if args.cost == "ce" and args.cost_data:
        from .calib import load_calib_texts

        calib = load_calib_texts(args.cost_data)  # ce on task text: that text also drives the measurement
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        known = torch.device(device).type in ("cpu", "cuda")
    except RuntimeError:
        known = False
    if not known:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked but no CUDA device is available")
    rank, processes = init_distributed()  # torchrun / accelerate launch: calibration split over processes
    if processes > 1 and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    lead = rank == 0  # only the first process evaluates, writes and prints
    progress = not args.no_progress and lead
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    usage = Usage()
    with usage.phase("load"):
        model, tok, model_id = _load_model(args.model, device)
    evaluate = bool(args.eval_text) and lead
    with usage.phase("reference perplexity"):
        if evaluate:  # like the checkpoint's perplexity (xbit.load): float32 on CPU, the stored dtype on CUDA
            with on_device(model, device, torch.float32 if torch.device(device).type == "cpu" else None):
                ref_ppl = _perplexities(model, tok, args, progress)
        else:
            ref_ppl = {}
    model, qconfig, report = quantize_model(model, tok, calib=calib, device=device, progress=progress,
                                            settings=settings, usage=usage)
    report.update(model=model_id, target_bits=args.bits, match=args.match)
    if not lead:
        return 0
    q_ppl = {}
    with tempfile.TemporaryDirectory(prefix="xbit-eval-") as scratch:
        out = args.out or (Path(scratch) / "checkpoint" if evaluate else None)
        if out:
            with usage.phase("save"):
                written = checkpoint.save(model, tok, out, qconfig, report, float_dtype=FLOAT_DTYPES[args.dtype],
                                          overwrite=args.overwrite)
            if report["target_bytes"] is not None and written > report["target_bytes"]:
                raise RuntimeError(f"wrote {written} bytes of .safetensors files, above the target "
                                   f"{report['target_bytes']} (a bug)")
        if evaluate:  # what users get: the checkpoint reloaded from disk, in the dtype xbit.load gives them
            del model
            from . import load

            with usage.phase("checkpoint perplexity"):
                q_ppl = _perplexities(load(out, device=device), tok, args, progress)
    report.update(usage.report(device))  # the table's figures include the saving and evaluating
    print_table(result_rows(args, report, model_id, device, ref_ppl, q_ppl))
    return 0


def result_rows(args, report, model_id, device, ref_ppl, q_ppl) -> list[tuple[str, str]]:
    what = f"{report['code_bits']}-bit" if report["code_bits"] else f"{args.allocation} allocation"
    target = (f" (target {report['target_bytes']:,})" if report["target_bytes"] else
              f" (target {args.bits} bits/weight)" if args.bits else "")
    rows = [("model", model_id), ("method", f"{args.method} {what}, group {report['group_size']}"),
            ("checkpoint bytes", f"{report['file_bytes']:,} in files, {report['checkpoint_bytes']:,} in tensors"
             + target),
            ("bits/weight (quantized layers)", f"{report['bits_per_weight_layers']:.3f}"),
            ("bits/weight (whole checkpoint)", f"{report['bits_per_weight_total']:.3f}"),
            ("quantize time", f"{report['seconds']:.1f} s"),
            ("wall time by phase", ", ".join(f"{k} {v:.1f} s" for k, v in report["phase_seconds"].items())),
            ("peak host RSS", f"{report['peak_host_rss_bytes'] / 2**30:.2f} GiB (after each phase: "
             + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in report["peak_rss_after_phase"].items()) + ")")]
    if report["peak_device_bytes"] is not None:
        rows.append(("peak device memory", f"{report['peak_device_bytes'] / 2**30:.2f} GiB"))
    if report.get("rounds"):  # these costs chose the kept round: a selection, not an estimate of quality
        costs = ", ".join(f"{r['cost']:.4f}" for r in report["rounds"])
        rows.append((f"selection cost by round ({args.cost})", f"{costs}; kept {report['best_cost']:.4f}"))
    if report.get("tune_costs"):  # epoch 0: the grids as quantized
        costs = ", ".join(f"{c:.4f}" for c in report["tune_costs"])
        rows.append((f"selection cost by tuning epoch ({args.cost})",
                     f"{costs}; kept epoch {report['tune_kept_epoch']}"))
    if "report_cost" in report:
        rows.append((f"task cost ({args.cost}, held-out tokens no choice saw)", f"{report['report_cost']:.4f}"))
    bos = ", BOS" if args.bos else ""
    for spec in ref_ppl:
        rows.append((f"perplexity {spec} (reference, ctx {args.ctx}{bos})", f"{ref_ppl[spec]:.3f}"))
        rows.append((f"perplexity {spec} (checkpoint reloaded)", f"{q_ppl[spec]:.3f}"))
    if args.out:
        rows.append(("written", str(args.out)))
    return rows


def main(argv=None) -> int:
    from eval.assets import AssetError

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one line on bad syntax
    try:
        return run(args)
    except (UsageError, checkpoint.CheckpointError, ValueError, FileNotFoundError, AssetError) as e:
        print(f"xbit.quantize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xbit.quantize: interrupted; nothing was written", file=sys.stderr)
        return 130


class _CallableModule(types.ModuleType):
    """`xbit.quantize(...)` is the Python API while `python -m xbit.quantize` is the CLI of the same module."""

    def __call__(self, *args, **kwargs):
        return quantize_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
