"""Calibration statistics: block-by-block E[x x^T] equals the statistics of a plain forward pass."""

import pytest
import torch
from torch import nn

from xbit.calibrate import head_hessian, run_blocks
from tests.tiny import tiny_llama


def _direct_statistics(model, ids):
    """E[x x^T] of every linear's input and of the head's input, from hooks on one whole-model forward."""
    sums, counts, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.t() @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def test_block_statistics_and_head_statistics_match_a_plain_forward():
    model = tiny_llama(seed=4)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    want = _direct_statistics(model, ids)
    got = {}

    def record(i, block, hessians):
        got.update({f"model.layers.{i}.{n}": h for n, h in hessians.items()})

    hidden = run_blocks(model, ids, "cpu", record, batch_size=2, progress=False)
    assert set(got) == {n for n in want if n != "lm_head"}
    for name, h in got.items():  # q/k/v and gate/up share one product: each must still be its own input's
        torch.testing.assert_close(h, want[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_hessian(model, hidden, "cpu"), want["lm_head"], rtol=1e-4, atol=1e-5)

    diag = {}
    run_blocks(model, ids, "cpu", lambda i, b, hs: diag.update({f"model.layers.{i}.{n}": h for n, h in hs.items()}),
               batch_size=3, progress=False, diag_only=True)
    for name, h in diag.items():
        torch.testing.assert_close(h, want[name].diagonal(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "xbit"])
def test_dense_rerun_of_a_quantized_block_computes_what_its_kernels_compute(method):
    """The calibration reruns each quantized block with its layers' dequantized weights (xbit's rotation
    included); the outputs equal those of the modules' own kernels."""
    import xbit
    from xbit.calibrate import dense_xbit_layers
    from xbit.modules import XbitLinear
    from tests.tiny import WORDS, tiny_tokenizer

    words = " ".join(WORDS[(7 * j) % len(WORDS)] for j in range(3000))
    kw = dict(method="rtn", code_bits=3) if method == "rtn" else dict(
        method="xbit", bits=3.5, calib=[words], calib_samples=4, seq_len=64, allocation="uniform", tune_epochs=0)
    model, _, _ = xbit.quantize(tiny_llama(), tiny_tokenizer(), group_size=32, progress=False, **kw)
    block = model.model.layers[1]
    layers = [m for m in block.modules() if isinstance(m, XbitLinear)]
    assert len(layers) == 7 and all(m.rotation_block > 0 for m in layers) == (method == "xbit")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, model.config.hidden_size, generator=g)
    pos = torch.arange(40)[None].expand(2, -1)
    args = dict(position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None)
    out = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    with torch.no_grad():
        kernels = out(block(x, **args))
        with dense_xbit_layers(block):
            dense = out(block(x, **args))
        again = out(block(x, **args))
    torch.testing.assert_close(dense, kernels, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, kernels)  # the kernels are back


def test_on_device_computes_in_float32_and_puts_back_the_stored_dtype():
    from xbit.calibrate import on_device
    from xbit.modules import XbitLinear

    block = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    block.register_buffer("index", torch.arange(3, dtype=torch.uint8))
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    with on_device(block, "cpu"):
        assert all(p.dtype == torch.float32 for p in block.parameters())
        assert block.index.dtype == torch.uint8
        # e.g. a layer quantized during the visit
        added = XbitLinear(4, 6, [0, 0, 0, 4, 0, 0, 0, 0, 0], group_size=32, dtype=torch.float16)
        block.append(added)
    assert all(torch.equal(p, before[n]) and p.dtype == torch.bfloat16 for n, p in block.named_parameters()
               if n in before)
    assert block[2].scales.dtype == torch.float16  # what joined during the visit is left as it is


@pytest.mark.parametrize("method", ["gptq", "xbit"])
def test_a_bfloat16_model_quantizes_exactly_as_its_float32_copy_and_its_blocks_stay_bfloat16(method):
    """The host keeps the blocks in their stored dtype and every phase computes in float32: the checkpoint is the
    one the float32 copy of the same weights gives, bit for bit."""
    import copy

    import xbit
    from xbit.modules import XbitLinear
    from tests.tiny import WORDS, tiny_tokenizer

    words = " ".join(WORDS[(11 * j) % len(WORDS)] for j in range(3000))
    kw = dict(method="gptq", code_bits=3) if method == "gptq" else dict(
        method="xbit", bits=3.5, rounds=2, tune_epochs=1, rotation_block=0)
    half = tiny_llama(seed=3).to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    originals = [m for m in half.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    out = [xbit.quantize(m, tiny_tokenizer(), group_size=32, calib=[words], calib_samples=4, seq_len=64,
                         progress=False, **kw)[0] for m in (half, full)]
    layers = [{n: m for n, m in model.named_modules() if isinstance(m, (XbitLinear, xbit.modules.XbitEmbedding))}
              for model in out]
    assert len(layers[0]) >= 14 and layers[0].keys() == layers[1].keys()
    for name, a in layers[0].items():
        for key, t in a.state_dict().items():
            assert torch.equal(t, layers[1][name].state_dict()[key]), (name, key)
    norms = [m.weight for n, m in out[0].named_modules() if n.startswith("model.layers.") and n.endswith("norm")]
    assert norms and all(w.dtype == torch.bfloat16 for w in norms)
    quantized = [m for m in originals if not any(m is k for k in out[0].modules())]
    assert len(quantized) >= 14 and all(m.weight.numel() == 0 for m in quantized)  # float weights freed
