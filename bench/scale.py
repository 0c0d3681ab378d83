"""Memory and time of xbit at real layer shapes: a random-initialised model with Llama-3-8B's shapes (hidden 4096,
intermediate 14336, 32 query and 8 key/value heads, vocabulary 128256, untied head), truncated to a few decoder
blocks, quantized with the default xbit method on this machine.

    python -m bench.scale --blocks 4 --calib-samples 8 --rounds 1 --tune-epochs 1 --json /tmp/scale.json

Prints wall time per phase, the host RSS after every block of the measurement and of the final quantization and
after the embedding/head work, and the peak; then projects the peak to the full 32 blocks (see docs/BENCHMARKS.md
for the formula). The calibration text and the tokenizer are SmolLM2's and the State of the Union texts
(eval.assets smollm2 sotu).
"""

import argparse
import json
import time

import torch


def llama3_8b_shapes(blocks: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=blocks, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built as a bf16 checkpoint loads: no float32 copy on the way
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=float, default=3.0, help="average stored bits per weight (default 3.0)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tune-epochs", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the report's usage figures here")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    import xbit
    from eval.assets import model_dir, text_files

    t0 = time.perf_counter()
    model = llama3_8b_shapes(args.blocks)
    params = sum(p.numel() for p in model.parameters())
    in_blocks = sum(p.numel() for p in model.model.layers.parameters())
    built = time.perf_counter() - t0
    calib = [p.read_text(encoding="utf-8") for p in text_files("sotu-calib")]
    tok = AutoTokenizer.from_pretrained(model_dir("smollm2"))  # real text ids (all below 49152)
    _, _, report = xbit.quantize(model, tok, calib=calib, device=args.device, method="xbit", bits=args.bits,
                                 calib_samples=args.calib_samples, seq_len=args.seq_len, rounds=args.rounds,
                                 tune_epochs=args.tune_epochs)
    gib = 2**30
    held = 2 * in_blocks + 4 * (params - in_blocks)
    print(f"model: Llama-3-8B shapes, {args.blocks} blocks, {params / 1e9:.3f} B parameters "
          f"({2 * params / gib:.2f} GiB in bfloat16; held as {held / gib:.2f} GiB: blocks bfloat16, embedding and "
          f"head float32); built in {built:.0f} s")
    print("wall time by phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["phase_seconds"].items()))
    for n in report["rss_by_block"]:
        print(f"  {n['at']:<32} RSS {n['rss'] / gib:6.2f} GiB, peak so far {n['peak_rss'] / gib:6.2f} GiB")
    print(f"peak host RSS {report['peak_host_rss_bytes'] / gib:.2f} GiB"
          + ("" if report["peak_device_bytes"] is None else f", device {report['peak_device_bytes'] / gib:.2f} GiB"))
    if args.json:
        keep = ("phase_seconds", "peak_rss_after_phase", "rss_by_block", "peak_host_rss_bytes", "peak_device_bytes",
                "file_bytes", "bits_per_weight_layers", "rounds", "tune_costs", "report_cost")
        with open(args.json, "w") as f:
            json.dump({"params": params, "params_in_blocks": in_blocks, "blocks": args.blocks,
                       **{k: report.get(k) for k in keep}}, f, indent=1)


if __name__ == "__main__":
    main()
