"""The C++ dequantizer (`cpu_fallback.dequantize`) beside the PyTorch reference (`xbit.format.dequantize`), on random
layers of bench/cpu.py's kind; checks that both give the same bits.

    python -m bench.dequantize
"""

import time

import torch

import cpu_fallback as cf
from bench.cpu import MIXES, random_layer
from xbit.format import dequantize

LAYERS = [(8960, 1536, "mix2.5"), (1536, 1536, "u3"), (49152, 576, "mix3.0")]  # Qwen2.5-1.5B, SmolLM2's table


def main():
    torch.manual_seed(0)
    for out, inn, mix in LAYERS:
        layer = random_layer(out, inn, MIXES[mix])
        t = time.perf_counter()
        want = dequantize(layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, layer.group_size)
        ref = time.perf_counter() - t
        cf.dequantize(layer)
        t = time.perf_counter()
        for _ in range(3):
            got = cf.dequantize(layer)
        fast = (time.perf_counter() - t) / 3
        assert torch.equal(got, want), f"{out}x{inn} {mix}: the C++ dequantizer differs from the reference"
        n = out * inn
        print(f"{out}x{inn} {mix}: reference {ref * 1e3:.0f} ms ({ref * 1e9 / n:.1f} ns a weight), C++ "
              f"{fast * 1e3:.1f} ms ({fast * 1e9 / n:.2f} ns), {ref / fast:.0f}x, bit-identical")


if __name__ == "__main__":
    main()
