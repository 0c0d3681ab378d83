"""Perplexity protocols, chosen by name; every result names its protocol.

- "plain" (eval.perplexity): the texts joined, non-overlapping windows of `ctx` tokens, every target but the
  first of each window scored, one perplexity over all scored tokens.
- "picollm" (the picoLLM compression benchmark's protocol): `n_seq` = 128 sequences of `seq_len` = 1024 tokens
  drawn from the joined token stream at seeded random offsets (seed 0: torch.Generator, start uniform in
  [0, n_tokens - seq_len]); the loss is taken on the second half of each sequence only (the first half is
  context); each sequence gets its own perplexity exp(mean nll of its second half), and the reported perplexity
  is the mean of those per-sequence perplexities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval.perplexity import perplexity

PROTOCOLS = ("plain", "picollm")


def picollm_perplexity_ids(model, ids, n_seq: int = 128, seq_len: int = 1024, seed: int = 0,
                           batch_size: int = 4, progress: bool = True) -> dict:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_seq,), generator=gen)
    seqs = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    half = seq_len // 2
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_seq = []
    with torch.inference_mode():
        for b in tqdm(range(0, n_seq, batch_size), desc="perplexity (picollm)", disable=not progress):
            batch = seqs[b:b + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, half - 1:-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, half:], reduction="none").double().mean(dim=1)
            per_seq.extend(nll.tolist())
    model.train(was_training)
    ppls = [math.exp(v) for v in per_seq]
    return {"ppl": sum(ppls) / len(ppls), "nll": sum(per_seq) / len(per_seq), "tokens": n_seq * (seq_len - half),
            "windows": n_seq, "protocol": "picollm", "seq_len": seq_len, "n_seq": n_seq, "seed": seed}


def evaluate_perplexity(model, tokenizer, texts: list[str], protocol: str = "plain", ctx: int = 512,
                        max_tokens: int | None = None, n_seq: int = 128, seq_len: int = 1024, seed: int = 0,
                        batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of `texts` under `protocol`; the result always carries "protocol".

    max_tokens caps the plain protocol's token stream; for picollm the cap is n_seq x seq_len.
    """
    if protocol == "plain":
        res = perplexity(model, tokenizer, texts, ctx=ctx, max_tokens=max_tokens, batch_size=batch_size,
                         progress=progress)
        res.setdefault("protocol", "plain")
        return res
    if protocol == "picollm":
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        return picollm_perplexity_ids(model, ids, n_seq=n_seq, seq_len=seq_len, seed=seed,
                                      batch_size=max(1, batch_size // 2), progress=progress)
    raise ValueError(f"unknown perplexity protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def describe(res: dict) -> str:
    """One-line protocol description for tables."""
    if res.get("protocol") == "picollm":
        return f"picollm {res['n_seq']}x{res['seq_len']} (loss on 2nd half, mean of per-sequence ppl)"
    return f"plain ctx={res.get('ctx')} bos={int(bool(res.get('bos')))} ({res.get('tokens')} tokens)"
