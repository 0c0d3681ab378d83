"""End-to-end batch-1 generation speed on the CPU: xbit models against the float transformers baseline.

    python bench/decode.py --model smollm2 --bits 2.5 3 4 --threads 2
    python bench/decode.py --model qwen --bits 2.5 3 4 --threads 2

Rows, all in one run on one machine: transformers `generate` in float32 and bfloat16 (the baseline), the same
float32 model in xbit's static-cache loop (xbit.generate), and for every --bits an xbit model (embeddings and head
included, like xbit checkpoints) in that loop. The xbit models for this benchmark are quantized with the allocation
forced uniform and plain rounding from a few calibration samples: speed depends on the bit layout, not on how well
the bits were chosen. tokens/s counts every new token over the whole call (prefill included); "x fp32" is the
ratio to the float32 transformers baseline.
"""

import argparse
import os
import platform
import time

import torch


def load(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec
    if spec in ("smollm2", "qwen"):
        from eval.assets import model_dir

        path = str(model_dir(spec))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path), path


def prompt_ids(tok, n: int) -> torch.Tensor:
    from eval.assets import text_files
    from eval.perplexity import load_texts

    text = load_texts(text_files("sotu-eval"))[0]
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n]


def time_generate(model, ids, new_tokens: int, repeat: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        best = min(best, time.perf_counter() - t)
    return new_tokens / best, out[0, ids.shape[1]:].tolist()


def time_static(model, ids, new_tokens: int, repeat: int) -> tuple[float, list]:
    from xbit.generate import greedy_decode

    best, toks = float("inf"), None
    for _ in range(repeat):
        r = greedy_decode(model, ids, new_tokens)
        best, toks = min(best, r["prefill_s"] + r["decode_s"]), r["tokens"]
    return new_tokens / best, toks


def quantize_for_speed(model, tok, bits: float):
    """In place (the caller loads a fresh float model for each: one model in memory at a time)."""
    import xbit
    from eval.assets import text_files
    from eval.perplexity import load_texts

    calib = load_texts(text_files("sotu-calib"))
    q, _, report = xbit.quantize(model, tok, method="xbit", bits=bits, allocation="uniform",
                                 compensate=False, calib=calib, calib_samples=4, seq_len=128, progress=False)
    return q, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen, or a local folder")
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="best of N runs per row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["XBIT_CPU_THREADS"] = str(args.threads)
    model, tok, path = load(args.model)
    ids = prompt_ids(tok, args.prompt_tokens)
    print(f"# {path}; {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, best of {args.repeat}")
    rows = []
    fp32_tps, fp32_tokens = time_generate(model, ids, args.new_tokens, args.repeat)
    rows.append(("transformers generate, float32", None, fp32_tps, True))
    tps, toks = time_static(model, ids, args.new_tokens, args.repeat)
    rows.append(("xbit static loop, float32", None, tps, toks == fp32_tokens))
    model = model.to(torch.bfloat16)
    tps, _ = time_generate(model, ids, args.new_tokens, args.repeat)
    rows.append(("transformers generate, bfloat16", None, tps, None))
    del model
    for b in args.bits:
        q, report = quantize_for_speed(load(args.model)[0], tok, b)
        tps, toks = time_static(q, ids, args.new_tokens, args.repeat)
        rows.append((f"xbit {b:g} bits/weight, static loop", report["checkpoint_bytes"], tps, None))
        del q
    print("| configuration | checkpoint bytes | tokens/s | x fp32 | same tokens as fp32 |")
    print("|---|---|---|---|---|")
    for name, nbytes, tps, same in rows:
        size = f"{nbytes:,}" if nbytes else "-"
        print(f"| {name} | {size} | {tps:.2f} | {tps / fp32_tps:.2f} | {'' if same is None else same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
