"""Compile every Triton specialisation for an H100/H200 (sm_90) without a GPU and read the generated code.

    python bench/sass.py                        # every depth 1..8, every path and autotune config, 4096 x 4096
    python bench/sass.py --bits 2 3 4 --paths gemv --show-loop 2   # ... and print the batch-1 inner loop at 2 bits

Triton compiles ahead of time for any target and ships ptxas/cuobjdump in its wheel, so this runs with the CPU
torch wheel and no driver. For each (path, bit depth, autotune config) it compiles the kernel exactly as the
launcher would (`triton_kernels.matmul.plan` gives the kernel, its arguments and its configs; the arguments'
specialisation, M == 1 as a constant, 16-divisible sizes and pointers, is derived by Triton's own binder) and
reports:

- ``loop``: instructions in the inner loop. The SASS is cut into loops at backward branches (a BRA whose target
  lies before it); a loop is innermost if no other loop lies inside it, and the inner loop is the innermost loop
  with the most global loads (LDG / LDGSTS), i.e. the one that streams qweight. Its body is every instruction from
  the branch target to the backward branch, both included, NOPs excluded; forward branches inside it (masks,
  segment edges) are counted as if every instruction ran, so the count is an upper bound on what one iteration
  issues.
- ``w/iter``: weights one warp consumes per iteration: BLOCK_K * BLOCK_N / num_warps, times the unroll factor
  (the ratio of global loads in the SASS loop to those in the PTX loop; ptxas unrolls some loops).
- ``instr/w``: loop / (w/iter): warp instructions issued per weight, the number the issue budget is set in
  (0.09 / 0.14 / 0.18 at 2 / 3 / 4 bits keeps 85% of an H100's 3.35 TB/s at batch 1, see
  /work/shared/recipes/triton-sass-without-gpu.md).
- ``regs``, ``local`` (bytes of local memory per thread: spills or stack arrays; ``stl``: spill stores in the
  whole kernel), ``smem`` (bytes of shared memory the launch needs) and whether it fits sm_90's 227 KB.

The ``mix`` rows compile the kernel of a layer holding every depth 1..8 (one launch, eight inner loops): their
resources are what a mixed layer runs with.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMEM_LIMIT = 232448  # 227 KB: the most shared memory one block may use on sm_90
BUDGET = {2: 0.09, 3: 0.14, 4: 0.18}  # warp instructions per weight at 85% of an H100's copy bandwidth
PATHS = {"gemv": 1, "batch4": 4, "gemm": 512}  # path name -> M it is compiled for
LOADS = ("LDG", "LDGSTS")


def _tools():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, args, kwargs):
    """triton.compile for sm_90 with the signature, constants and attributes the launcher would derive."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, full text) per instruction of a `cuobjdump -sass` listing."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text):
        ins = m.group(2).strip()
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins).split()[0] if ins else ""
        out.append((int(m.group(1), 16), op, ins))
    return out


def _loops(items, is_branch, target_of):
    """(first, last) index pairs of backward branches: item `last` branches back to item `first`."""
    index = {key: i for i, key in enumerate(k for k, _ in items)}
    loops = []
    for i, (_, ins) in enumerate(items):
        if is_branch(ins):
            t = target_of(ins)
            if t in index and index[t] <= i:
                loops.append((index[t], i))
    return [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]


def inner_loop_sass(sass):
    items = [(addr, (op, ins)) for addr, op, ins in sass]
    loops = _loops(items, lambda x: x[0] == "BRA",
                   lambda x: int(m.group(1), 16) if (m := re.search(r"0x([0-9a-f]+)", x[1])) else None)
    if not loops:
        return [], 0
    body = lambda lp: [sass[i] for i in range(lp[0], lp[1] + 1) if sass[i][1] != "NOP"]  # noqa: E731
    best = max(loops, key=lambda lp: (sum(op.startswith(LOADS) for _, op, _ in body(lp)), lp[1] - lp[0]))
    return body(best), len(loops)


def inner_loop_ptx_loads(ptx: str) -> int:
    """Global loads in the PTX loop that matches the SASS inner loop (innermost, most loads)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    items = []
    for ln in lines:
        if ln.endswith(":") and ln.startswith("$"):
            items.append((ln[:-1], "label"))
        elif ln and not ln.startswith("//"):
            items.append((None, ln))
    items = [(k if k is not None else ("#", i), v) for i, (k, v) in enumerate(items)]
    loops = _loops(items, lambda x: re.search(r"\bbra(\.uni)?\s", x) is not None,
                   lambda x: m.group(1) if (m := re.search(r"bra(?:\.uni)?\s+(\$[\w]+)", x)) else None)
    count = lambda lp: sum(("ld.global" in v or "cp.async" in v) and "commit" not in v and "wait" not in v  # noqa
                           for _, v in items[lp[0]:lp[1] + 1])
    return max((count(lp) for lp in loops), default=0)


def analyse(kernel, show: bool = False) -> dict:
    tools = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass_text = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True,
                                   text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", res))
    sass = parse_sass(sass_text)
    body, nloops = inner_loop_sass(sass)
    sass_loads = sum(op.startswith(LOADS) for _, op, _ in body)
    ptx_loads = inner_loop_ptx_loads(kernel.asm["ptx"])
    unroll = max(1, round(sass_loads / ptx_loads)) if ptx_loads else 1
    if show:
        for addr, _, ins in body:
            print(f"    /*{addr:04x}*/ {ins}")
    ops = {}
    for _, op, _ in body:
        base = op.split(".")[0]
        ops[base] = ops.get(base, 0) + 1
    return {
        "regs": int(usage.get("REG", 0)), "local": int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
        "stl": sum(op.startswith("STL") for _, op, _ in sass), "smem": kernel.metadata.shared,
        "loop": len(body), "loops": nloops, "unroll": unroll, "ops": ops,
    }


def layer_args(counts: list[int], m: int, n: int, k: int, group_size: int, dtype):
    """CPU tensors with the shapes and dtypes of a real launch (values do not matter for compiling); shapes as
    xbit.format.layer_shapes (not imported: xbit pulls in transformers and the CPU kernels)."""
    import triton_kernels

    words = sum(-(-c // 32) * b for b, c in enumerate(counts) if b > 0)
    groups = sum(-(-c // group_size) for b, c in enumerate(counts) if b > 0)
    qweight = torch.zeros(words, n, dtype=torch.int32)
    scales, zeros = torch.zeros(groups, n, dtype=torch.float16), torch.zeros(groups, n, dtype=torch.float16)
    bits = torch.cat([torch.full((c,), b, dtype=torch.uint8) for b, c in enumerate(counts)])
    perm = torch.arange(k, dtype=torch.int32)
    table = triton_kernels.segment_table(bits, perm, group_size)
    x = torch.zeros(m, k, dtype=dtype)
    return x, qweight, scales, zeros, perm, table, triton_kernels.bit_key(counts)


def parse_config(text: str):
    """"BLOCK_N=512,BLOCK_K=64,SPLIT_K=8,num_warps=4,num_stages=2" -> triton.Config."""
    import triton

    kw = {name: int(v) for name, v in (item.split("=") for item in text.split(","))}
    meta = {k: v for k, v in kw.items() if k.isupper()}
    meta.setdefault("SPLIT_K", 1)
    meta["ATOMIC"] = meta["SPLIT_K"] > 1
    return triton.Config(meta, num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 2))


def cases(paths, depths, n, k, group_size, dtype, mix: bool, configs=None):
    from triton_kernels import matmul

    for path in paths:
        m = PATHS[path]
        for b in depths + (["mix"] if mix else []):
            if b == "mix":
                counts = [0] + [k // 8] * 8
                counts[8] += k - sum(counts)
            else:
                counts = [0] * 9
                counts[b] = k
            x, qw, s, z, perm, table, key = layer_args(counts, m, n, k, group_size, dtype)
            out = torch.empty(m, n, dtype=dtype)
            p = matmul.plan(x, qw, s, z, perm, table, group_size, None, key, out)
            for cfg in configs or p.configs:
                yield path, b, p, cfg


def fmt_cfg(cfg) -> str:
    kw = cfg.kwargs
    short = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "SPLIT_K": "s"}
    parts = [f"{short[name]}{kw[name]}" for name in short if name in kw]
    return " ".join(parts) + f" w{cfg.num_warps} st{cfg.num_stages}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--n", type=int, default=4096, help="output features")
    p.add_argument("--k", type=int, default=4096, help="input features")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--no-mix", action="store_true", help="skip the all-depths kernel")
    p.add_argument("--show-loop", type=int, nargs="*", default=None,
                   help="print the inner loop's SASS of the first config at these depths")
    p.add_argument("--ops", action="store_true", help="print the inner loop's instruction mix")
    p.add_argument("--config", action="append", default=None,
                   help="compile this config instead of the kernel's list (repeatable), e.g. "
                        "BLOCK_N=512,BLOCK_K=64,SPLIT_K=8,num_warps=4,num_stages=2")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("bench/sass.py: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shown = set()
    print(f"sm_90, {args.n} x {args.k}, group {args.group_size}, {args.dtype}; instr/w = warp instructions per "
          f"weight in the inner loop")
    print(f"{'path':>6s} {'bits':>4s} {'config':>28s} {'loop':>5s} {'w/iter':>7s} {'instr/w':>8s} {'budget':>6s} "
          f"{'regs':>4s} {'local':>5s} {'stl':>4s} {'smem':>7s} {'fits':>4s}")
    worst = 0
    configs = [parse_config(c) for c in args.config] if args.config else None
    for path, b, plan, cfg in cases(args.paths, args.bits, args.n, args.k, args.group_size, dtype, not args.no_mix,
                                    configs):
        show = args.show_loop is not None and b in args.show_loop and (path, b) not in shown
        try:
            kern = compile_sm90(plan.kernel, plan.args, {**plan.kwargs, **cfg.all_kwargs()})
        except Exception as e:  # a config that does not compile is a result to report, not a crash
            while e.__cause__ is not None or e.__context__ is not None:  # the innermost error says why
                e = e.__cause__ or e.__context__
            print(f"{path:>6s} {b!s:>4s} {fmt_cfg(cfg):>28s} compile failed: {type(e).__name__}: "
                  f"{str(e).strip().splitlines()[-1][:100]}")
            worst = 1
            continue
        if show:
            print(f"--- inner loop, {path}, {b} bits, {fmt_cfg(cfg)}")
            shown.add((path, b))
        r = analyse(kern, show)
        fits = r["smem"] <= SMEM_LIMIT
        if b == "mix":
            print(f"{path:>6s} {'mix':>4s} {fmt_cfg(cfg):>28s} {'':>5s} {'':>7s} {'':>8s} {'':>6s} "
                  f"{r['regs']:4d} {r['local']:5d} {r['stl']:4d} {r['smem']:7d} {'yes' if fits else 'NO':>4s}")
        else:
            w = cfg.kwargs["BLOCK_K"] * cfg.kwargs["BLOCK_N"] // cfg.num_warps * r["unroll"]
            per = r["loop"] / w
            budget = f"{BUDGET[b]:.2f}" if path == "gemv" and b in BUDGET else ""
            unroll = f"x{r['unroll']}" if r["unroll"] > 1 else ""
            print(f"{path:>6s} {b:4d} {fmt_cfg(cfg):>28s} {r['loop']:5d} {w:5d}{unroll:2s} {per:8.4f} {budget:>6s} "
                  f"{r['regs']:4d} {r['local']:5d} {r['stl']:4d} {r['smem']:7d} {'yes' if fits else 'NO':>4s}")
            if args.ops:
                print("       " + " ".join(f"{k}:{v}" for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1])))
        sys.stdout.flush()
    return worst


if __name__ == "__main__":
    sys.exit(main())
