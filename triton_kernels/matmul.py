"""Launching the x-bit Triton kernels: which kernel for which batch, their autotune configs, and `plan`, which
bench/sass.py also uses to compile exactly what a launch would.

Imported lazily by `triton_kernels` (it imports triton, and `triton.jit` decides at import time whether the
kernels run compiled or in the interpreter, from TRITON_INTERPRET).

Paths (one launch per layer, all segments; see gemv.py and gemm.py):
- M == 1: `xbit_gemv_kernel`, FFMA GEMV, split-K over the concatenated tiles;
- 2 <= M <= DECODE_MAX_M: `xbit_gemm_kernel` with one 16-row tl.dot tile, split-K;
- larger M: `xbit_gemm_kernel`, tiled GEMM.
Split-K programs add their partial sums atomically into y in y's dtype (y zeroed first); a config with
SPLIT_K == 1 stores. x is gathered through perm inside the kernels: no permuted copy, no fp32 buffer.

Autotuning is keyed on the shape (N, K, M bucket), the set of depths (DEPTHS), group size, bias and dtypes, not on a
layer's mean bits, so the layers of a model share results; results are kept on disk (triton's cache_results).
Configs whose compiled kernel needs more shared memory than the device has are pruned before anything launches.
"""

import os
from collections import namedtuple

import torch
import triton

from .codes import ONE_BITS
from .gemm import xbit_gemm_kernel
from .gemv import xbit_gemv_kernel

DECODE_MAX_M = 16
# Read when this module is imported, like triton.jit does. The kernels call no triton.language function that is
# itself @triton.jit (tl.cdiv...), since those are decorated when triton is imported and would not follow a
# TRITON_INTERPRET set after that.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _cfg(bn, bk, sk, warps, stages, bm=None):
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "ATOMIC": sk > 1}
    if bm is not None:
        kw = {"BLOCK_M": bm, **kw}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# The first config of each list is the one the interpreter runs (SPLIT_K == 1 there: the interpreter has no
# bfloat16 atomics). SPLIT_K is a run-time argument, so configs that differ only in it share one compiled kernel.
# Every tile shape compiles one inner loop per depth present; bench/sass.py reports each one's instructions per
# weight, registers and shared memory (sm_90, 4096 x 4096: every GEMV tile <= 0.090 / 0.094 / 0.100 warp
# instructions per weight at 2 / 3 / 4 bits; no config spills or exceeds 227 KB at any depth or for all depths).
GEMV_CONFIGS = [_cfg(256, 128, 1, 4, 2), _cfg(256, 128, 4, 4, 2), _cfg(256, 128, 16, 4, 2), _cfg(256, 64, 8, 2, 2),
                _cfg(512, 64, 8, 4, 2), _cfg(512, 64, 16, 4, 2), _cfg(512, 128, 8, 4, 2), _cfg(128, 128, 32, 1, 2)]
SPLITK_CONFIGS = [_cfg(64, 64, 1, 4, 3, 16), _cfg(64, 64, 4, 4, 2, 16), _cfg(128, 64, 4, 4, 3, 16),
                  _cfg(128, 64, 8, 4, 3, 16), _cfg(64, 128, 8, 4, 3, 16), _cfg(256, 64, 16, 8, 3, 16)]
GEMM_CONFIGS = [_cfg(64, 64, 1, 4, 2, 32), _cfg(64, 64, 1, 4, 3, 64), _cfg(128, 64, 1, 4, 3, 64),
                _cfg(128, 64, 1, 8, 3, 128), _cfg(64, 64, 1, 4, 3, 128), _cfg(256, 64, 1, 8, 3, 64)]

GEMV_KEY = ["N", "K", "DEPTHS", "GROUP_SIZE", "HAS_BIAS"]  # + dtypes, added by triton
GEMM_KEY = ["m_key", *GEMV_KEY]


def _max_shared(device) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def _prune(fn):
    """early_config_prune: compile each config (the benchmark would) and drop those that do not compile for this
    device (bfloat16 atomics before sm_90) or need more shared memory than it has, so that no launch fails or is
    silently skipped."""
    def prune(configs, nargs, **kwargs):
        args = list(nargs.values())
        limit = _max_shared(next(a for a in args if isinstance(a, torch.Tensor)).device)
        kept, errors = [], []
        for cfg in configs:
            try:
                kernel = fn.warmup(*args, grid=(1,), **kwargs, **cfg.all_kwargs())
            except Exception as e:  # noqa: BLE001 (a config this device cannot compile is not an error)
                errors.append(f"{cfg}: {type(e).__name__}: {e}")
                continue
            if kernel.metadata.shared <= limit:
                kept.append(cfg)
        if not kept:
            raise RuntimeError(f"no xbit kernel config compiles within {limit} bytes of shared memory: {errors}")
        return kept
    return prune


def _tuned(fn, configs, key, reset=()):
    if INTERPRET:  # timing is meaningless and slow there: the first config only
        return triton.autotune(configs=configs[:1], key=key, reset_to_zero=list(reset) or None)(fn)
    kw = dict(configs=configs, key=key, reset_to_zero=list(reset) or None,
              prune_configs_by={"early_config_prune": _prune(fn)})
    try:
        return triton.autotune(**kw, cache_results=True)(fn)
    except TypeError:  # triton < 3.3: no on-disk autotuning cache
        return triton.autotune(**kw)(fn)


_gemv = _tuned(xbit_gemv_kernel, GEMV_CONFIGS, GEMV_KEY, reset=["y_ptr"])
_splitk = _tuned(xbit_gemm_kernel, SPLITK_CONFIGS, GEMM_KEY, reset=["y_ptr"])
_gemm = _tuned(xbit_gemm_kernel, GEMM_CONFIGS, GEMM_KEY)

Plan = namedtuple("Plan", "kernel tuner args kwargs configs grid atomic")


def _m_key(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


def plan(x2, qweight, scales, zeros, perm, table, group_size: int, bias=None, depths: int = 0, y2=None) -> Plan:
    """What `launch` runs for x2 [M, K] (unit stride along K) into y2 [M, N]: kernel, autotuner, positional
    arguments, constexpr arguments, configs, grid(meta) and whether split-K configs add atomically into y2."""
    m, k = x2.shape
    n = scales.shape[1]
    depths = (depths & 0x1FE) or 0x1FE  # bit b set for each depth b present; 0 means all
    bias_arg = bias if bias is not None else y2
    common = dict(GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DEPTHS=depths)
    if m == 1:
        args = (x2, perm, qweight, scales, zeros, table, bias_arg, y2, n, k, ONE_BITS)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        # shift window of the magic conversion (codes.py): shared shifts for 16-bit x, fp32-exact for fp32 x
        common["WINDOW"] = 8 if x2.dtype in (torch.float16, torch.bfloat16) else 1
        return Plan(xbit_gemv_kernel, _gemv, args, common, GEMV_CONFIGS, grid, True)
    args = (x2, perm, qweight, scales, zeros, table, bias_arg, y2, m, n, k, x2.stride(0), y2.stride(0), _m_key(m),
            ONE_BITS)
    common["UPCAST_DOT"] = INTERPRET and x2.dtype == torch.bfloat16
    decode = m <= DECODE_MAX_M

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"]))

    if decode:
        return Plan(xbit_gemm_kernel, _splitk, args, common, SPLITK_CONFIGS, grid, True)
    return Plan(xbit_gemm_kernel, _gemm, args, common, GEMM_CONFIGS, grid, False)


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor,
           table: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, depths: int = 0,
           out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for a stored x-bit layer; x [..., in] fp16/bf16/fp32, y in x's dtype.

    perm: int32 storage order; table: `segment_table(...)`; depths: mask of the depths present (`bit_key`); out:
    optional preallocated y (every element is written); config: fixed launch parameters (BLOCK_N, BLOCK_K,
    SPLIT_K, BLOCK_M for M > 1, num_warps, num_stages) instead of autotuning, for tests.
    """
    n, k = scales.shape[1], x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)}")
    if m == 0 or n == 0:
        return out
    y2 = out.view(m, n)
    p = plan(x2, qweight, scales, zeros, perm, table, group_size, bias, depths, y2)
    if config is not None:
        meta = {"SPLIT_K": 1, **config}
        meta["ATOMIC"] = meta["SPLIT_K"] > 1
        if not p.atomic and meta.get("SPLIT_K", 1) != 1:
            raise ValueError(f"SPLIT_K > 1 is only used for M <= {DECODE_MAX_M}")
        if meta.get("SPLIT_K", 1) > 1:
            y2.zero_()
        p.kernel[p.grid(meta)](*p.args, **p.kwargs, **meta)
        return out
    if p.atomic:
        y2.zero_()
    known = len(p.tuner.cache)
    p.tuner[p.grid](*p.args, **p.kwargs)
    if p.atomic and len(p.tuner.cache) > known:  # this call benchmarked the configs, each adding into y: run it
        y2.zero_()                                # once more (newer triton resets after benchmarking too)
        p.tuner[p.grid](*p.args, **p.kwargs)
    return out
