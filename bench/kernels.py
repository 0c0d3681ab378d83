"""Benchmark the Triton x-bit kernel against fp16 torch.nn.functional.linear on Llama-3-8B shapes.

    python bench/kernels.py                 # needs a CUDA GPU and triton; prints one table
    python bench/kernels.py --dry-run       # no GPU: builds the layers on a tiny shape and runs the reference
                                            # (and the kernel through TRITON_INTERPRET=1 if triton is installed)

Per shape (out x in), bit mix and batch: kernel time (triton.testing.do_bench, median ms), achieved bytes/s
(bytes the kernel must move: packed codes, scales, zeros, perm, activations, output) as a fraction of the
device-to-device copy bandwidth measured in the same run, fp16 F.linear time and the speedup over it.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def build_layer(out: int, in_features: int, fractions: dict, group_size: int, device, seed: int = 0) -> XbitLinear:
    """A random RTN layer with the given bit mix; perm makes bits[perm] one run per depth."""
    g = torch.Generator().manual_seed(seed)
    counts = mix_counts(fractions, in_features)
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in enumerate(counts)])
    bits = bits[torch.randperm(in_features, generator=g)]
    # storage order: columns shuffled, then sorted by depth (stable), so that each depth is one contiguous run
    shuffle = torch.randperm(in_features, generator=g)
    perm = shuffle[torch.argsort(-bits[shuffle].long(), stable=True)]
    weight = torch.randn(out, in_features, generator=g).to(device) * 0.02
    tensors = quantize_weight_rtn(weight, bits.to(device), perm.to(device), group_size)
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
    args = p.parse_args(argv)
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
    print(f"{'shape':>11s} {'mix':>7s} {'bits':>5s} {'batch':>5s} {'xbit ms':>8s} {'GB/s':>6s} {'%copy':>6s} "
          f"{'fp16 ms':>8s} {'speedup':>7s} {'max err':>8s}")
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
                ms = do_bench(lambda: triton_kernels.TritonKernel.run(x, layer), warmup=25, rep=100)
                ms16 = do_bench(lambda: torch.nn.functional.linear(x, w16), warmup=25, rep=100)
                gbs = kernel_bytes(layer, m) / (ms * 1e-3)
                print(f"{shape:>11s} {name:>7s} {avg_bits(layer):5.2f} {m:5d} {ms:8.4f} {gbs / 1e9:6.0f} "
                      f"{100 * gbs / bw:5.1f}% {ms16:8.4f} {ms16 / ms:6.2f}x {err:8.1e}")
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
