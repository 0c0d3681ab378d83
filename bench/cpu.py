"""CPU kernel benchmark: time, achieved bandwidth of the packed layer vs measured memory bandwidth, and speedup
over torch.nn.functional.linear (float32 and bfloat16 weights), per shape, bit mix and batch.

    python bench/cpu.py --shapes small --threads 2
    python bench/cpu.py --batches 1 --isa avx512,avx512vnni     # code paths side by side (default: the best)
    python bench/cpu.py --batches 64,256,512 --isa avx512vnni,blas   # the prefill's packed kernel vs BLAS
Times are the best of --repeat passes over enough copies of each layer (>= --rotate-mb in all) that every call
reads its weights from DRAM, as in a real decode step where the whole model does not fit in cache; torch's float
weights get the same treatment. The packed layer's bytes (codes, scales, zeros, perm, bits) are what a call reads.
"""

import argparse
import copy
import os
import time

import torch

import cpu_fallback as cf
from xbit.format import assemble
from xbit.modules import XbitLinear

SHAPES = {  # (out, in)
    "small": [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)],  # Qwen2.5-1.5B
    "llama": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],  # Llama-3-8B
}
MIXES = {  # share of columns per bit depth
    "u2": {2: 1.0}, "u3": {3: 1.0}, "u4": {4: 1.0},
    "mix2.5": {0: 0.05, 2: 0.45, 3: 0.40, 4: 0.10},
    "mix3.0": {1: 0.05, 2: 0.25, 3: 0.45, 4: 0.20, 6: 0.05},
}


def random_layer(out: int, inn: int, mix: dict, group_size: int = 128) -> XbitLinear:
    counts = {b: int(round(f * inn)) for b, f in mix.items()}
    counts[max(mix)] += inn - sum(counts.values())
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in counts.items()])[torch.randperm(inn)]
    shuffled = torch.randperm(inn)
    perm = shuffled[torch.argsort(-bits[shuffled].long(), stable=True)]  # one run per depth, random inside
    codes, scales, zeros = [], [], []
    for b in sorted({int(v) for v in bits.tolist()}, reverse=True):
        if b == 0:
            continue
        cols, groups = counts[b], -(-counts[b] // group_size)
        codes.append(torch.randint(0, 1 << b, (out, cols)))
        scales.append(torch.rand(groups, out) * 0.01 + 0.001)
        zeros.append(torch.rand(groups, out) * ((1 << b) - 1))
    return XbitLinear.from_tensors(assemble(inn, bits, perm, group_size, codes, scales, zeros), None, group_size)


def best_time(fn, repeat: int, copies: list | None = None) -> float:
    """Best seconds per call of fn(copy), each pass cycling through all copies (cold caches)."""
    copies = copies or [None]
    fn(copies[0])
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for c in copies:
            fn(c)
        best = min(best, (time.perf_counter() - t) / len(copies))
    return best


def n_copies(nbytes: int, rotate_mb: int) -> int:
    return max(1, min(64, -(-(rotate_mb << 20) // nbytes)))


_BW_BUF = None


def memory_bandwidth(repeat: int) -> float:
    """Read bandwidth in bytes/s: a sum over 512 MiB, far beyond any cache."""
    global _BW_BUF
    if _BW_BUF is None:
        _BW_BUF = torch.ones(128 << 20, dtype=torch.float32)
    a = _BW_BUF
    return a.numel() * 4 / best_time(lambda _: a.sum(), repeat)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=["small", "all"], default="all")
    p.add_argument("--mixes", default=",".join(MIXES))
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rotate-mb", type=int, default=256, help="total bytes of layer copies cycled through per pass")
    p.add_argument("--isa", default=None, help=f"comma-separated code paths to time, each on its own row, from "
                   f"{cf.supported_isas()} and {cf.BLAS} (dequantize, then torch's BLAS; default: XBIT_CPU_ISA, "
                   "else the best this CPU supports)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["XBIT_CPU_THREADS"] = str(args.threads)
    ok, why = cf.available()
    if not ok:
        raise SystemExit(f"CPU kernels unavailable: {why}")
    isas = (args.isa or os.environ.get("XBIT_CPU_ISA") or cf.best_isa()).split(",")
    for isa in isas:
        if isa not in cf.supported_isas() + [cf.BLAS]:
            raise SystemExit(f"--isa {isa}: not one of this CPU's paths {cf.supported_isas()}")
    bw = memory_bandwidth(args.repeat)
    print(f"isa={','.join(isas)} (best on this CPU: {cf.best_isa()}) threads={args.threads} "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s (best of {args.repeat}; measured again right before each "
          f"shape, mix and batch, column bw, the %bw denominator of its rows: it drifts on a shared machine)")
    shapes = SHAPES["small"] + (SHAPES["llama"] if args.shapes == "all" else [])
    print(f"{'out x in':>12} {'mix':>7} {'M':>3} {'isa':>10} | {'f32 ms':>8} {'GB/s':>6} {'bw':>5} {'%bw':>5} "
          f"{'torch ms':>9} {'speedup':>7} | {'bf16 ms':>8} {'torch ms':>9} {'speedup':>7}")
    for out, inn in shapes:
        w32 = [torch.randn(out, inn) * 0.02 for _ in range(n_copies(out * inn * 4, args.rotate_mb))]
        w16 = [w.bfloat16() for w in w32[: n_copies(out * inn * 2, args.rotate_mb)]]
        for mix in args.mixes.split(","):
            layer = random_layer(out, inn, MIXES[mix])
            nbytes = layer.stored_bytes()
            layers = [layer] + [copy.deepcopy(layer) for _ in range(n_copies(nbytes, args.rotate_mb) - 1)]
            for m in (int(b) for b in args.batches.split(",")):
                bw = memory_bandwidth(args.repeat)
                x32 = torch.randn(m, inn)
                x16 = x32.bfloat16()
                r32 = best_time(lambda w: torch.nn.functional.linear(x32, w), args.repeat, w32)
                r16 = best_time(lambda w: torch.nn.functional.linear(x16, w), args.repeat, w16)
                for isa in isas:
                    t32 = best_time(lambda c: cf.matmul(x32, c, isa=isa), args.repeat, layers)
                    t16 = best_time(lambda c: cf.matmul(x16, c, isa=isa), args.repeat, layers)
                    print(f"{out:>5}x{inn:<6} {mix:>7} {m:>3} {isa:>10} | {t32 * 1e3:8.3f} {nbytes / t32 / 1e9:6.1f} "
                          f"{bw / 1e9:5.1f} {100 * nbytes / t32 / bw:5.0f} {r32 * 1e3:9.3f} {r32 / t32:7.2f} "
                          f"| {t16 * 1e3:8.3f} {r16 * 1e3:9.3f} {r16 / t16:7.2f}", flush=True)


if __name__ == "__main__":
    main()
