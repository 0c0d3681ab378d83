"""Batch-1 greedy decoding with a static KV cache: the lean loop that lets the kernels' speed show end to end.

transformers' `generate` re-plans its cache, logits processors and stopping criteria on every token; on a CPU
that costs as much as the matmuls of a small quantized model. This loop does only what decoding needs: one prefill,
then one forward per token into a preallocated StaticCache, greedy argmax, stop at EOS.
"""

import time

import torch
from transformers import StaticCache


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> dict:
    """input_ids [1, T] -> {"tokens": new token ids, "prefill_s": seconds, "decode_s": seconds for the rest}."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_decode takes one sequence [1, T], got shape {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters(), torch.empty(0)).device
    ids = input_ids.to(device)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(ids.shape[1], device=device)).logits[:, -1]
    nxt = logits.argmax(-1, keepdim=True)
    tokens = [int(nxt)]
    t1 = time.perf_counter()
    pos = ids.shape[1]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        logits = model(nxt, past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([pos], device=device)).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        pos += 1
    t2 = time.perf_counter()
    return {"tokens": tokens, "prefill_s": t1 - t0, "decode_s": t2 - t1}
