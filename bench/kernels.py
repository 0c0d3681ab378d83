"""Benchmark the Triton x-bit kernel against fp16 torch.nn.functional.linear on Llama-3-8B shapes.

    python bench/kernels.py                 # needs a CUDA GPU and triton; prints one table
    python bench/kernels.py --decode        # end-to-end decode of a random model with Qwen2.5-1.5B shapes
    python bench/kernels.py --dry-run       # no GPU: builds the layers on a tiny shape and runs the reference
                                            # (and the kernel through TRITON_INTERPRET=1 if triton is installed)
    python bench/kernels.py --decode --dry-run   # the decode loop on a tiny random model, eager, on the CPU

Per shape (out x in), bit mix and batch (triton.testing.do_bench, median ms): the layer's whole op as called
(eager: Python, dispatch, launch), and under CUDA graphs (captured once, replayed: GPU time only) the kernel alone,
the whole op, and fp16 F.linear; achieved bytes/s of the kernel alone (bytes it must move: packed codes, scales,
zeros, perm, activations, output) as a fraction of the device-to-device copy bandwidth measured in the same run,
and the speedup of the whole op over fp16, both under graphs.

--decode: a randomly initialised Qwen2 model with Qwen2.5-1.5B's shapes (28 blocks, hidden 1536, MLP 8960, 12/2
heads, untied 151,936-row head), in fp16 and with every block linear and the head as x-bit layers (--bits: 2.5 =
the mix2.5 columns, 3 and 4 uniform; random RTN codes: speed depends on the layout, not on the values); greedy
decode after a --prompt-token prompt with a static KV cache, tokens/s eager and with one decode step captured as a
CUDA graph (what a server replays per token), and the ratio to fp16 under the same loop.
"""

import argparse
import os
import sys
import time

import torch

# run as a script, this folder comes first on sys.path and this file would shadow the `kernels` package that
# transformers imports: the repository root takes its place
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from xbit.format import reference_matmul  # noqa: E402
from xbit.modules import XbitLinear  # noqa: E402
from xbit.rtn import quantize_weight_rtn  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in): q/o, k/v, gate/up, down
MIXES = {  # name -> {bits: fraction of columns}
    "u2": {2: 1.0}, "u3": {3: 1.0}, "u4": {4: 1.0},
    "mix2.5": {1: 0.125, 2: 0.375, 3: 0.375, 4: 0.125},
    "mix3.0": {0: 0.04, 2: 0.22, 3: 0.48, 4: 0.22, 6: 0.04},
}
BATCHES = [1, 4, 16, 64, 256]


def mix_counts(fractions: dict, in_features: int) -> list[int]:
    counts = [0] * 9
    for b, f in fractions.items():
        counts[b] = int(round(f * in_features))
    counts[max(fractions, key=fractions.get)] += in_features - sum(counts)
    return counts


def build_layer(out: int, in_features: int, fractions: dict, group_size: int, device, seed: int = 0,
                weight: torch.Tensor | None = None) -> XbitLinear:
    """An RTN layer of `weight` (default: random) with the given bit mix; perm makes bits[perm] one run per
    depth."""
    g = torch.Generator().manual_seed(seed)
    counts = mix_counts(fractions, in_features)
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in enumerate(counts)])
    bits = bits[torch.randperm(in_features, generator=g)]
    # storage order: columns shuffled, then sorted by depth (stable), so that each depth is one contiguous run
    shuffle = torch.randperm(in_features, generator=g)
    perm = shuffle[torch.argsort(-bits[shuffle].long(), stable=True)]
    if weight is None:
        weight = torch.randn(out, in_features, generator=g).to(device) * 0.02
    tensors = quantize_weight_rtn(weight.float(), bits.to(device), perm.to(device), group_size)
    return XbitLinear.from_tensors(tensors, None, group_size)


def avg_bits(layer) -> float:
    return sum(b * c for b, c in enumerate(layer.counts)) / layer.in_features


def kernel_bytes(layer, m: int) -> int:
    stored = sum(getattr(layer, k).numel() * getattr(layer, k).element_size()
                 for k in ("qweight", "scales", "zeros", "perm"))
    return stored + 2 * m * (layer.in_features + layer.out_features)


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), on a 1 GiB buffer."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def captured(fn) -> "torch.cuda.CUDAGraph":
    """fn captured as a CUDA graph, after a warm-up call on a side stream (autotuning and first writes happen
    outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn, do_bench) -> float:
    """Median ms of fn replayed as a CUDA graph: the GPU's time alone, without Python or launch overhead."""
    return do_bench(captured(fn).replay, warmup=25, rep=100)


# ---------------------------------------------------------------- end-to-end decode

QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256)
DECODE_MIXES = {2.5: "mix2.5", 3.0: "u3", 4.0: "u4"}


def random_model(shapes: dict, device, bits: float | None, group_size: int):
    """A random Qwen2 model in fp16 (float32 on the CPU), its block linears and head x-bit layers unless bits is
    None."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from xbit.hf import set_submodule

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shapes)).eval()
    model = model.to(torch.float16 if device == "cuda" else torch.float32)
    if bits is not None:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        for i, name in enumerate(names):
            lin = model.get_submodule(name)
            layer = build_layer(lin.out_features, lin.in_features, MIXES[DECODE_MIXES[bits]], group_size, device,
                                seed=i, weight=lin.weight.data)
            set_submodule(model, name, layer)
    return model


@torch.no_grad()
def decode_tokens_per_s(model, prompt: int, new: int, graph: bool) -> float:
    """Greedy decode of `new` tokens after a random `prompt` with a static KV cache, one step at a time (eager),
    or each step a replay of one captured CUDA graph (graph=True)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt + new + 2)
    ids = torch.randint(model.config.vocab_size, (1, prompt), device=device)
    logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=device))
    tok = logits.logits[:, -1:].argmax(-1)
    pos = torch.tensor([prompt], device=device)

    def step():
        out = model(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1:].argmax(-1)
        tok.copy_(out)
        pos.add_(1)

    run = captured(step).replay if graph else step
    pos.fill_(prompt)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new / (time.perf_counter() - t)


def decode(args) -> int:
    """Tokens/s of fp16 and each --bits model, eager and under a CUDA graph, side by side."""
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ.setdefault("XBIT_CPU_THREADS", "2")
    shapes = TINY if args.dry_run else QWEN_1_5B
    prompt, new = (8, 4) if args.dry_run else (args.prompt_tokens, args.new_tokens)
    print(f"decode: random Qwen2 {shapes['num_hidden_layers']} blocks, hidden {shapes['hidden_size']}, vocab "
          f"{shapes['vocab_size']}; prompt {prompt}, {new} new tokens, greedy, static cache"
          + ("" if args.dry_run else f"; {torch.cuda.get_device_name()}"))
    print(f"{'model':>8s} {'weights MB':>10s} {'eager tok/s':>11s} {'graph tok/s':>11s} {'x fp16 (graph)':>14s}")
    base = None
    for bits in [None] + args.bits:
        model = random_model(shapes, device, bits, args.group_size)
        mb = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers())) / 1e6
        eager = decode_tokens_per_s(model, prompt, new, graph=False)
        graphed, note = float("nan"), ""
        if device == "cuda":
            try:
                graphed = decode_tokens_per_s(model, prompt, new, graph=True)
            except Exception as e:  # noqa: BLE001 (reported, the row is kept)
                note = f"  graph capture failed: {str(e).splitlines()[0][:100]}"
        ref = graphed if graphed == graphed else eager
        base = ref if bits is None else base
        name = "fp16" if bits is None else f"{bits:g} bits"
        print(f"{name:>8s} {mb:10.0f} {eager:11.1f} {graphed:11.1f} {ref / base:13.2f}x{note}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


def dry_run(args) -> int:
    out, inf, m = 96, 256, 3
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel runs in the interpreter
    os.environ["XBIT_TRITON_CPU"] = "1"  # and CPU tensors may use it
    import triton_kernels

    use_kernel, why = triton_kernels.triton_available()
    if not use_kernel:
        print(f"{why}: the kernel is skipped, only the reference runs")

    for name, fractions in MIXES.items():
        layer = build_layer(out, inf, fractions, args.group_size, "cpu")
        x = torch.randn(m, inf, dtype=torch.float16)
        ref = reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size)
        line = f"{name:8s} {out}x{inf} avg {avg_bits(layer):.3f} bits, {kernel_bytes(layer, m)} bytes, reference ok"
        if use_kernel:
            ok, why = triton_kernels.TritonKernel.can_run(layer, x)
            if not ok:
                print(f"kernel cannot run: {why}", file=sys.stderr)
                return 1
            err = (triton_kernels.TritonKernel.run(x, layer).float() - ref.float()).abs().max().item()
            line += f", kernel (interpreted) max err {err:.2e}"
        print(line)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no GPU: build tiny layers, run the reference")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    p.add_argument("--decode", action="store_true", help="end-to-end decode tokens/s instead of the layer table")
    p.add_argument("--bits", type=float, nargs="+", default=list(DECODE_MIXES), choices=list(DECODE_MIXES),
                   help="--decode: the x-bit models beside fp16")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    if args.decode and (args.dry_run or torch.cuda.is_available()):
        return decode(args)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU available; run on a GPU machine or use --dry-run", file=sys.stderr)
        return 2
    try:
        from triton.testing import do_bench
    except ImportError:
        print("bench/kernels.py: triton is not installed (pip install 'xbit[gpu]')", file=sys.stderr)
        return 2
    import triton_kernels

    torch.manual_seed(0)
    bw = copy_bandwidth(do_bench)
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s; group size {args.group_size}")
    print(f"{'shape':>11s} {'mix':>7s} {'bits':>5s} {'batch':>5s} {'op ms':>8s} {'kern g':>8s} {'op g':>8s} "
          f"{'fp16 g':>8s} {'GB/s':>6s} {'%copy':>6s} {'speedup':>7s} {'max err':>8s}   (g: under a CUDA graph)")
    for shape in args.shapes:
        out, inf = (int(v) for v in shape.split("x"))
        w16 = torch.randn(out, inf, dtype=torch.float16, device="cuda") * 0.02
        for name in args.mixes:
            layer = build_layer(out, inf, MIXES[name], args.group_size, "cuda")
            for m in args.batches:
                x = torch.randn(m, inf, dtype=torch.float16, device="cuda")
                ok, why = triton_kernels.TritonKernel.can_run(layer, x)
                if not ok:
                    print(f"bench/kernels.py: kernel cannot run: {why}", file=sys.stderr)
                    return 1
                y = triton_kernels.TritonKernel.run(x, layer)  # autotunes on first call for this key
                err = float("nan")
                if m == args.batches[0]:  # one correctness check per layer against the reference
                    ref = reference_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits,
                                           layer.group_size)
                    err = (y.float() - ref.float()).abs().max().item()
                ms = do_bench(lambda: layer(x), warmup=25, rep=100)  # the whole op, eager
                perm, table, key = triton_kernels._layer_meta(layer)
                kern = triton_kernels._kernels()
                kern_g = graph_ms(lambda: kern.launch(x, layer.qweight, layer.scales, layer.zeros, perm, table,
                                                      layer.group_size, None, key), do_bench)
                op_g = graph_ms(lambda: layer(x), do_bench)
                fp16_g = graph_ms(lambda: torch.nn.functional.linear(x, w16), do_bench)
                gbs = kernel_bytes(layer, m) / (kern_g * 1e-3)
                print(f"{shape:>11s} {name:>7s} {avg_bits(layer):5.2f} {m:5d} {ms:8.4f} {kern_g:8.4f} {op_g:8.4f} "
                      f"{fp16_g:8.4f} {gbs / 1e9:6.0f} {100 * gbs / bw:5.1f}% {fp16_g / op_g:6.2f}x {err:8.1e}")
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
