"""End-to-end grid tuning: the differentiable weight is the reference dequantization, tuning lowers the task cost
on text it never saw, and nothing but the scales and zeros changes."""

import copy

import torch

import xbit
from xbit.format import dequantize
from xbit.learn import kl_cost
from xbit.modules import XbitLinear
from xbit.quantize import match_size
from xbit.rtn import quantize_weight_rtn
from xbit.tune import TunableGrid, _differentiable_forwards, tune_grids
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.xbit.test_allocate import texts


def test_tunable_weight_at_start_is_the_reference_dequantization():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 150, generator=g)
    bits = torch.randint(0, 9, (150,), generator=g).to(torch.uint8)
    perm = torch.argsort(bits.long() * 1000 + torch.randperm(150, generator=g))
    t = quantize_weight_rtn(w, bits, perm, 32)
    layer = XbitLinear.from_tensors(t, None, 32)
    expected = dequantize(t["qweight"], t["scales"], t["zeros"], t["perm"], t["bits"], 32)
    grid = TunableGrid(layer)
    torch.testing.assert_close(grid.weight(), expected)
    with torch.no_grad():  # a moved grid is written back into the float16 tensors the kernels read
        grid.log_scale.add_(0.1)
        grid.shift.add_(0.25)
    moved = grid.weight().detach()
    grid.write_back()
    after = dequantize(layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bits, 32)
    torch.testing.assert_close(after, moved, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(after, expected, atol=1e-3)


def test_tuning_lowers_the_cost_on_unseen_text_and_changes_only_scales_and_zeros(tmp_path):
    tok = tiny_tokenizer()
    size = match_size(tiny_llama(), "gptq:2:32")
    model, qc, rep = xbit.quantize(tiny_llama(), tok, method="xbit", size=size, group_size=32, calib=texts(),
                                   calib_samples=8, seq_len=64, allocation="uniform", tune_epochs=0,
                                   progress=False)
    xbit.checkpoint.save(model, tok, tmp_path / "ck", qc, rep)  # loaded: its caches fill in inference mode below
    model = xbit.load(tmp_path / "ck", device="cpu", dtype=torch.float32)
    reference = tiny_llama()
    g = torch.Generator().manual_seed(5)
    train, held, unseen = (torch.randint(3, 128, (n, 64), generator=g) for n in (16, 8, 8))
    with torch.inference_mode():  # as an evaluation before tuning would (its caches must not leak into autograd)
        ref_unseen = reference(unseen).logits.clone()
        kernel_logits = model(unseen).logits.clone()
        before = kl_cost(kernel_logits, ref_unseen, unseen).item()
    # the differentiable forwards (rotation folded back into the weights) compute the model's own function
    grids = {m: TunableGrid(m) for m in model.modules() if isinstance(m, XbitLinear)}
    patched = _differentiable_forwards(model, grids)
    with torch.no_grad():
        torch.testing.assert_close(model(unseen).logits, kernel_logits, rtol=1e-4, atol=1e-4)
    for m in patched:
        del m.forward
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    rep = tune_grids(model, reference, train, held, kl_cost, epochs=4, lr=1e-2, batch_size=4, progress=False)
    with torch.no_grad():
        after = kl_cost(model(unseen).logits, ref_unseen, unseen).item()
    assert after < 0.9 * before
    assert rep["tune_kept_epoch"] > 0 and min(rep["tune_costs"]) < rep["tune_costs"][0]
    state = model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], stored[k])}
    assert changed and all(k.endswith((".scales", ".zeros")) for k in changed)
    assert all("forward" not in vars(m) for m in model.modules())  # the differentiable forwards are gone


def test_tuning_keeps_the_untuned_grids_when_no_epoch_helps():
    tok = tiny_tokenizer()
    model, _, _ = xbit.quantize(tiny_llama(), tok, method="xbit", bits=3.0, group_size=32, calib=texts(),
                                calib_samples=4, seq_len=64, allocation="uniform", tune_epochs=0,
                                progress=False)
    reference = tiny_llama()
    g = torch.Generator().manual_seed(6)
    train, held = torch.randint(3, 128, (4, 64), generator=g), torch.randint(3, 128, (4, 64), generator=g)
    stored = copy.deepcopy(model.state_dict())
    rep = tune_grids(model, reference, train, held, kl_cost, epochs=1, lr=10.0, batch_size=4, progress=False)
    assert rep["tune_kept_epoch"] == 0  # a wild step only made it worse
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0)
