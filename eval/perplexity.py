"""Perplexity of a causal language model on plain text.

Protocol "plain": the texts are joined with "\\n\\n" and tokenized once without
special tokens; `max_tokens` truncates that token stream; the stream is cut into
non-overlapping windows of `ctx` model positions. With bos=True each window is
BOS + ctx-1 text tokens (BOS is input only, never a target). Every token after
the first position of a window is a target, so each window scores ctx-1 tokens.
A last partial window is dropped: every scored token then sees the same
range of context lengths, and all windows batch without padding.

    python -m eval.perplexity --model ~/.cache/xbit/smollm2 --text sotu-eval moby
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def load_texts(paths) -> list[str]:
    """Read utf-8 files; a folder stands for all .txt files in it, sorted by name."""
    texts = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        texts.extend(f.read_text(encoding="utf-8") for f in files)
    return texts


LOGITS_BUDGET = 2**30  # bytes of logits per batch: a 150k vocabulary gets one window per batch, not 8 (7 GB)


def perplexity_ids(model, ids, ctx: int = 512, bos_id: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Plain-protocol perplexity of a 1-D token stream `ids` (see module doc). `batch_size` windows per forward,
    fewer where the logits would pass LOGITS_BUDGET (the sum is the same)."""
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    stride = ctx - 1 if bos_id is not None else ctx  # text tokens per window
    n_windows = ids.numel() // stride
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {stride}")
    windows = ids[: n_windows * stride].view(n_windows, stride)
    if bos_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), windows], dim=1)

    device = next(model.parameters()).device
    vocab = getattr(model.config.get_text_config(), "vocab_size", 0) or 0
    # logits, their float copy and log-softmax: about 12 bytes per window token and vocabulary entry
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // max(1, 12 * ctx * vocab)))
    was_training = model.training
    model.eval()
    total_nll = 0.0
    with torch.inference_mode():
        bar = tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress)
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            # sum in float64 across batches so long texts do not lose precision
            total_nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            ).double().item()
            bar.update(batch.size(0))
        bar.close()
    model.train(was_training)

    tokens = n_windows * (ctx - 1)
    nll = total_nll / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": n_windows,
            "protocol": "plain", "ctx": ctx, "bos": bos_id is not None}


def perplexity(model, tokenizer, texts: list[str], ctx: int = 512, bos: bool = False,
               max_tokens: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """Plain-protocol perplexity of `texts`. Keys: ppl, nll (mean, nats), tokens
    (scored targets), windows, protocol (plus ctx, bos)."""
    bos_id = None
    if bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return perplexity_ids(model, ids, ctx=ctx, bos_id=bos_id, max_tokens=max_tokens,
                          batch_size=batch_size, progress=progress)


def resolve_text(item: str) -> tuple[str, list[Path]]:
    """A text argument is a file, a folder, or a split shortcut of eval.assets."""
    from eval import assets

    if item in assets.SPLITS and not Path(item).exists():
        return item, assets.text_files(item)
    path = Path(item).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text not found: {item}")
    return item, [path]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m eval.perplexity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder (or Hub id)")
    parser.add_argument("--text", nargs="+", required=True,
                        help="files, folders, or sotu-eval / sotu-calib / moby")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--bos", action="store_true", help="prepend BOS to every window")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from eval.assets import AssetError

    try:
        if args.ctx < 2:
            raise ValueError(f"--ctx must be at least 2, got {args.ctx}")
        model_path = Path(args.model).expanduser()
        # an id like "org/name" may be a Hub model; anything path-like must be a local folder
        looks_local = args.model.startswith((".", "/", "~")) or model_path.exists()
        if looks_local and not model_path.is_dir():
            raise FileNotFoundError(f"model folder not found: {args.model}")
        model_path = str(model_path) if looks_local else args.model
        texts = [resolve_text(t) for t in args.text]

        try:
            import xbit  # noqa: F401  registers the xbit quantizer so quantized checkpoints load
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
        model.to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)

        # print each row as soon as it is done: long texts take minutes on a CPU
        print(f"{'model':<24} {'text':<12} {'tokens':>8} {'windows':>7} {'ppl':>9} {'time_s':>7}  protocol")
        for name, files in texts:
            t0 = time.perf_counter()
            res = perplexity(model, tokenizer, load_texts(files), ctx=args.ctx, bos=args.bos,
                             max_tokens=args.max_tokens, batch_size=args.batch_size)
            proto = f"{res['protocol']} ctx={res['ctx']} bos={int(res['bos'])}"
            print(f"{Path(args.model).name[:24]:<24} {Path(name).name[:12]:<12} {res['tokens']:>8} "
                  f"{res['windows']:>7} {res['ppl']:>9.3f} {time.perf_counter() - t0:>7.1f}  {proto}",
                  flush=True)
    except (ValueError, FileNotFoundError, OSError, AssetError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
