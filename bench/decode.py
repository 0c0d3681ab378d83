"""End-to-end batch-1 generation speed on the CPU: xbit models against the float transformers baseline.

    python -m bench.decode --model smollm2 --bits 2.5 3 4 --threads 2
    python -m bench.decode --model qwen --bits 2.5 3 4 --threads 2
    python -m bench.decode --model qwen --bits --llamacpp Q2_K Q3_K_M Q4_K_M --threads 2   # llama.cpp beside xbit

Rows, all in one run on one machine: transformers `generate` in float32 and bfloat16 (the baseline), the same
float32 model in xbit's static-cache loop (xbit.generate), and for every --bits an xbit model (embeddings and head
included, like xbit checkpoints) in that loop. The xbit models for this benchmark are quantized with the allocation
forced uniform and plain min-max rounding from a few calibration samples: speed depends on the bit layout, not on
how well the bits were chosen. tokens/s counts every new token over the whole call (prefill included); "x fp32" is
the ratio to the float32 transformers baseline.

With --llamacpp TYPE...: llama.cpp (built by `python -m eval.llamacpp build`) beside xbit in the same run. The
float model is converted to GGUF and quantized to each TYPE (plain llama-quantize, no importance matrix: speed
only), timed by llama-bench (pp<prompt> and tg<new>); an xbit checkpoint at that file's bytes less its metadata
(the tokenizer) is timed in the static loop: prompt tokens/s from its prefill, generated tokens/s from the rest
(llama-bench's tg starts from an empty context, ours after the prompt). The machine's read bandwidth is printed.
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


def quantize_for_speed(model, tok, **target):
    """In place (the caller loads a fresh float model for each: one model in memory at a time); target: bits= or
    size=."""
    import xbit
    from eval.assets import text_files
    from eval.perplexity import load_texts

    calib = load_texts(text_files("sotu-calib"))
    q, _, report = xbit.quantize(model, tok, method="xbit", allocation="uniform", compensate=False, grid="minmax",
                                 calib=calib, calib_samples=4, seq_len=128, progress=False, **target)
    return q, report


def beside_llamacpp(args, path: str, tok, ids) -> list[str]:
    """Markdown rows: each llama.cpp type and xbit at its bytes, prompt and generated tokens/s."""
    from pathlib import Path

    from bench.cpu import memory_bandwidth
    from eval import llamacpp
    from xbit.generate import greedy_decode

    try:
        llamacpp.tool("llama-bench")
    except llamacpp.AssetError as e:
        return [f"llama.cpp rows skipped: {e}"]
    lines = [f"measured read bandwidth {memory_bandwidth(5) / 1e9:.1f} GB/s (a sum over 512 MiB, {args.threads} "
             f"threads)", "", "| engine | type | file bytes | pp tokens/s | tg tokens/s | tg x llama.cpp |",
             "|---|---|---|---|---|---|"]
    work = llamacpp.root() / "files" / Path(path).name
    for qtype in args.llamacpp:
        gguf, info = llamacpp.make(Path(path), qtype, work, threads=args.threads)
        ref = llamacpp.speed(gguf, ids.shape[1], args.new_tokens, args.threads, args.repeat)
        lines.append(f"| llama.cpp | {qtype} | {info['file_bytes']:,} | {ref['pp']:.1f} | {ref['tg']:.2f} | 1.00 |")
        q, report = quantize_for_speed(load(path)[0], tok, size=info["budget_bytes"])
        runs = [greedy_decode(q, ids, args.new_tokens) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["decode_s"])
        pp, tg = ids.shape[1] / best["prefill_s"], (args.new_tokens - 1) / best["decode_s"]
        lines.append(f"| xbit | uniform at those bytes | {report['file_bytes']:,} | {pp:.1f} | {tg:.2f} | "
                     f"{tg / ref['tg']:.2f} |")
        del q
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen, or a local folder")
    p.add_argument("--bits", type=float, nargs="*", default=[2.5, 3.0, 4.0])
    p.add_argument("--llamacpp", nargs="*", default=[], metavar="TYPE",
                   help="llama.cpp types timed beside xbit at their file bytes (e.g. Q2_K Q3_K_M Q4_K_M)")
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
        q, report = quantize_for_speed(load(args.model)[0], tok, bits=b)
        tps, toks = time_static(q, ids, args.new_tokens, args.repeat)
        rows.append((f"xbit {b:g} bits/weight, static loop", report["checkpoint_bytes"], tps, None))
        del q
    print("| configuration | checkpoint bytes | tokens/s | x fp32 | same tokens as fp32 |")
    print("|---|---|---|---|---|")
    for name, nbytes, tps, same in rows:
        size = f"{nbytes:,}" if nbytes else "-"
        print(f"| {name} | {size} | {tps:.2f} | {tps / fp32_tps:.2f} | {'' if same is None else same} |")
    if args.llamacpp:
        print("\n".join([""] + beside_llamacpp(args, path, tok, ids)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
