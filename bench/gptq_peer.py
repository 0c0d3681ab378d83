"""Our GPTQ baseline beside a public GPTQ (the reference IST-DASLab/gptq code) on SmolLM2-135M-Instruct.

Both get the same float32 model, the same calibration windows (xbit.calibrate.calibration_ids on the default
calibration texts), the same settings (g128, act-order, asymmetric, damp 0.01, blocks quantized in order, each
block's inputs the outputs of the previous quantized block) and the same perplexity protocol (eval.perplexity,
ctx 512, first 16384 tokens of each text). The peer's code is imported from --peer-dir, never copied here:

    git -C <mirror of IST-DASLab/gptq> show HEAD:gptq.py > /tmp/peer/gptq.py   # and quant.py
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/gptq_peer.py --peer-dir /tmp/peer --bits 3 4 \
        --impl ours peer --results /tmp/gptq_peer.jsonl

Each (implementation, bits) cell appends one row to --results, so cells may run in separate processes; the table
printed at the end holds every row of that file, with ours/peer perplexity ratios.
"""

import argparse
import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != HERE]  # bench/kernels.py would shadow `kernels`
sys.path.insert(0, str(HERE.parent))

from eval.perplexity import load_texts, perplexity, resolve_text  # noqa: E402
from xbit.calibrate import calibration_ids, decoder_layers  # noqa: E402
from xbit.quantize import _default_calib, _load_model, quantize_model  # noqa: E402


class _Caught(Exception):
    pass


def first_block_inputs(model, ids, batch_size):
    """(hidden states, keyword arguments) entering decoder block 0, one pair per calibration batch."""
    got = []

    def grab(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append((hidden, kwargs))
        raise _Caught

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch_size):
            with contextlib.suppress(_Caught):
                model(ids[i : i + batch_size], use_cache=False)
    finally:
        handle.remove()
    return got


@torch.no_grad()
def quantize_peer(model, ids, peer_dir, bits, group_size, damp, batch_size=8):
    """Fake-quantize every decoder-block linear in place with the peer's GPTQ class; returns per-layer errors."""
    sys.path.insert(0, str(Path(peer_dir).resolve()))
    import gptq as peer_gptq  # noqa: the peer's gptq.py (class GPTQ)
    import quant as peer_quant  # noqa: the peer's quant.py (class Quantizer)

    torch.cuda.synchronize = lambda *a, **k: None  # the peer calls it unconditionally; a no-op on this CPU run
    batches = first_block_inputs(model, ids, batch_size)
    errors = {}
    for index, block in enumerate(decoder_layers(model)):
        workers, hooks = {}, []
        for name, lin in block.named_modules():
            if isinstance(lin, nn.Linear):
                worker = workers[name] = peer_gptq.GPTQ(lin)
                worker.quantizer = peer_quant.Quantizer()
                worker.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
                hooks.append(lin.register_forward_hook(lambda m, x, y, w=worker: w.add_batch(x[0].data, y.data)))
        for hidden, kwargs in batches:
            block(hidden, **kwargs)
        for h in hooks:
            h.remove()
        for name, worker in workers.items():
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # the peer prints "time ..." and "error ..." per layer
                worker.fasterquant(blocksize=128, percdamp=damp, groupsize=group_size, actorder=True)
            found = re.search(r"error ([-\d.e+]+)", log.getvalue())
            errors[f"{index}.{name}"] = float(found.group(1)) if found else None
        batches = [(_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
    return errors


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def perplexities(model, tok, texts, ctx, max_tokens):
    return {t: perplexity(model, tok, load_texts(resolve_text(t)[1]), ctx=ctx, max_tokens=max_tokens,
                          progress=False)["ppl"] for t in texts}


def run_cell(impl, bits, args, calib):
    model, tok, _ = _load_model(None, "cpu")
    model.float()  # both implementations start from the same float32 weights
    t0, c0 = time.time(), time.process_time()  # CPU time too: this machine is shared, wall time is noisy
    extra = {}
    if impl == "ours":
        quantize_model(model, tok, method="gptq", code_bits=bits, group_size=args.group_size, calib=calib,
                       calib_samples=args.calib_samples, seq_len=args.seq_len, damp=args.damp, device="cpu",
                       progress=False, seed=args.seed)
    elif impl == "peer":
        ids = calibration_ids(tok, calib, args.calib_samples, args.seq_len, args.seed)  # exactly ours
        extra["layer_errors"] = quantize_peer(model, ids, args.peer_dir, bits, args.group_size, args.damp)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    ppl = perplexities(model, tok, args.texts, args.ctx, args.eval_max_tokens)
    return {"impl": impl, "bits": bits if impl != "float" else None, "ppl": ppl, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "calib_samples": args.calib_samples, "threads": args.threads, **extra}


def print_table(rows, texts):
    peer = {r["bits"]: r for r in rows if r["impl"] == "peer"}
    head = ["impl", "bits", *[f"ppl {t}" for t in texts], "quantize s", "cpu s", *[f"ours/peer {t}" for t in texts]]
    lines = [head]
    for r in rows:
        p = peer.get(r["bits"]) if r["impl"] == "ours" else None
        ratios = [f"{r['ppl'][t] / p['ppl'][t]:.4f}" if p else "" for t in texts]
        lines.append([r["impl"], str(r["bits"] or "-"), *[f"{r['ppl'][t]:.3f}" for t in texts],
                      *([f"{r['seconds']:.0f}", f"{r.get('cpu_seconds', float('nan')):.0f}"] if r["impl"] != "float"
                        else ["-", "-"]), *ratios])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-dir", default="/tmp/peer", help="folder holding the peer's gptq.py and quant.py")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--impl", nargs="+", default=["ours", "peer"], choices=["float", "ours", "peer"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", nargs="+", default=["sotu-eval", "moby"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--eval-max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", help="JSON-lines file: rows are appended, and the table shows all of them")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = _default_calib()
    rows = [json.loads(line) for line in open(args.results)] if args.results and Path(args.results).exists() else []
    for impl in args.impl:
        for bits in ([None] if impl == "float" else args.bits):
            row = run_cell(impl, bits, args, calib)
            print(json.dumps({k: v for k, v in row.items() if k != "layer_errors"}), flush=True)
            rows.append(row)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows, args.texts)


if __name__ == "__main__":
    main()
