"""The static-cache greedy loop produces exactly transformers' greedy tokens, for float and xbit models."""

import pytest
import torch

import xbit
from xbit.generate import greedy_decode
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.xbit.test_allocate import texts


def _lively(seed=1):
    """Tiny Llama with weights scaled up, so that greedy decoding does not repeat one token."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


@pytest.mark.parametrize("quantized", [False, True])
def test_static_cache_loop_matches_generate(quantized):
    model = _lively()
    if quantized:
        model, _, _ = xbit.quantize(model, tiny_tokenizer(), method="xbit", bits=4.0, group_size=32, calib=texts(),
                                    calib_samples=4, seq_len=64, allocation="uniform", compensate=False,
                                    progress=False)
    prompt = torch.tensor([[1, 5, 9, 33, 70, 8]])
    got = greedy_decode(model, prompt, 24)
    want = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got["tokens"] == want[0, prompt.shape[1]:].tolist()
    assert len(set(got["tokens"])) > 8  # a real sequence, not one repeated token
    assert got["prefill_s"] > 0 and got["decode_s"] > 0


def test_stops_at_eos_and_rejects_batches():
    model = _lively()
    prompt = torch.tensor([[1, 5, 9, 33, 70, 8]])
    first = greedy_decode(model, prompt, 24)["tokens"]
    stop = first[5]
    assert greedy_decode(model, prompt, 24, eos_token_id=stop)["tokens"] == first[: first.index(stop) + 1]
    with pytest.raises(ValueError):
        greedy_decode(model, prompt.repeat(2, 1), 4)
