"""End-to-end grid tuning: the differentiable weight is scale * (code - zero) of a layer built by hand, tuning lowers
the task cost on text it never saw, and nothing but the scales and zeros changes."""

import copy

import pytest
import torch

import xbit
from xbit import blockwise
from xbit.format import assemble
from xbit.learn import kl_cost
from xbit.modules import XbitEmbedding, XbitLinear
from xbit.quantize import match_size
from xbit.blockwise import Teacher
from xbit.tune import Tables, TunableGrid, _differentiable_forwards, tune_grids
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.xbit.test_allocate import texts


def hand_built_layer():
    """A layer with known codes, scales and zeros: storage positions 0..39 hold 3-bit columns (groups of 16: scale
    and zero rows 0, 1, 2), 40..44 0-bit columns, 45..69 5-bit columns (rows 3, 4); position j holds column perm[j]."""
    g = torch.Generator().manual_seed(3)
    out, group = 6, 16
    perm = torch.randperm(70, generator=g)
    bits = torch.zeros(70, dtype=torch.uint8)
    bits[perm] = torch.tensor([3] * 40 + [0] * 5 + [5] * 25, dtype=torch.uint8)
    codes3, codes5 = torch.randint(0, 8, (out, 40), generator=g), torch.randint(0, 32, (out, 25), generator=g)
    scales = (torch.rand(5, out, generator=g) + 0.1).half()
    zeros = (torch.rand(5, out, generator=g) * 7).half()
    t = assemble(out, bits, perm, group, [codes3, codes5], [scales[:3], scales[3:]], [zeros[:3], zeros[3:]])
    return XbitLinear.from_tensors(t, None, group), perm, codes3, codes5, scales.float(), zeros.float()


def expected_weight(perm, codes3, codes5, scales, zeros):
    """scale * (code - zero), element by element, in the original column order (0-bit columns zero)."""
    w = torch.zeros(codes3.shape[0], 70)
    for o in range(w.shape[0]):
        for j in range(70):
            if j < 40:
                code, row = codes3[o, j], j // 16
            elif j < 45:
                continue
            else:
                code, row = codes5[o, j - 45], 3 + (j - 45) // 16
            w[o, perm[j]] = scales[row, o] * (code - zeros[row, o])
    return w


@pytest.mark.parametrize("keep_codes", [True, False])
def test_tunable_weight_is_scale_times_code_minus_zero_and_writes_back_its_grid(keep_codes):
    layer, perm, codes3, codes5, scales, zeros = hand_built_layer()
    grid = TunableGrid(layer, keep_codes=keep_codes)  # codes kept unpacked, or unpacked at each use
    assert (grid.kept is not None) == keep_codes
    torch.testing.assert_close(grid.weight(), expected_weight(perm, codes3, codes5, scales, zeros))
    with torch.no_grad():  # a moved grid: scale * e^(0.1 r), zero + 0.25 code steps
        grid.log_scale.add_(0.1)
        grid.shift.add_(0.25)
    rate = torch.tensor([1.0] * 3 + [0.25] * (scales.shape[0] - 3))[:, None]  # 3-bit groups 1, 5-bit 2^-2
    moved_scales, moved_zeros = scales * (0.1 * rate).exp(), zeros + 0.25
    torch.testing.assert_close(grid.weight(), expected_weight(perm, codes3, codes5, moved_scales, moved_zeros))
    grid.write_back()  # into the float16 tensors the kernels read
    assert torch.equal(layer.scales, moved_scales.half()) and torch.equal(layer.zeros, moved_zeros.half())
    rounded = expected_weight(perm, codes3, codes5, moved_scales.half().float(), moved_zeros.half().float())
    torch.testing.assert_close(TunableGrid(layer).weight(), rounded)


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
    patched = _differentiable_forwards(model, grids, Tables())
    with torch.no_grad():
        torch.testing.assert_close(model(unseen).logits, kernel_logits, rtol=1e-4, atol=1e-4)
    for m in patched:
        del m.forward
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    rep = tune_grids(model, Teacher(reference, train, "cpu"), Teacher(reference, held, "cpu"), kl_cost, "cpu",
                     epochs=4, lr=1e-2, batch_size=4, progress=False)
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
    rep = tune_grids(model, Teacher(reference, train, "cpu"), Teacher(reference, held, "cpu"), kl_cost, "cpu",
                     epochs=1, lr=10.0, batch_size=4, progress=False)
    assert rep["tune_kept_epoch"] == 0  # a wild step only made it worse
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0)


@pytest.mark.parametrize("big_table", [None, 500])
def test_tuning_gradients_match_one_graph_with_the_tied_table_expanded_once_per_step(big_table, monkeypatch):
    """The blockwise chain with the embedding table as one leaf per step (Tables) gives every scale and zero the
    gradient of one autograd graph over the whole model in which every lookup and head product dequantizes anew.
    With every table "big" (big_table 500 weights), lookups dequantize only the rows they read and every product
    goes a few rows at a time, each chunk recomputed in the backward pass: the same gradients."""
    tok = tiny_tokenizer()
    model, _, _ = xbit.quantize(tiny_llama(), tok, method="xbit", bits=3.0, group_size=32, calib=texts(),
                                calib_samples=4, seq_len=64, allocation="uniform", tune_epochs=0, progress=False)
    assert any(isinstance(m, XbitEmbedding) for m in model.modules())  # the tied table is quantized and tuned
    reference = tiny_llama()
    ids = torch.randint(3, 128, (5, 32), generator=torch.Generator().manual_seed(8))
    teacher = Teacher(reference, ids, "cpu", batch_size=2)
    for p in model.parameters():
        p.requires_grad_(False)
    grids = {m: TunableGrid(m) for m in model.modules() if isinstance(m, XbitLinear)}
    with torch.no_grad():  # away from the quantized grids, so that no gradient is zero by symmetry
        for g in grids.values():
            for p in g.params():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))

    class EveryUse(Tables):
        def get(self, g, device):
            return g.weight(device)

    def grads(tables, run):
        patched = _differentiable_forwards(model, grids, tables)
        try:
            total = run()
            tables.backward()
        finally:
            for m in patched:
                del m.forward
        out = [p.grad.clone() for g in grids.values() for p in g.params()]
        for g in grids.values():
            for p in g.params():
                p.grad = None
        return total, out

    def one_graph():
        with torch.enable_grad():
            logits = model(ids, use_cache=False).logits
            loss = sum(kl_cost(logits[i : i + 1], teacher.logits(model, i, "cpu"), ids[i : i + 1])
                       for i in range(ids.shape[0])) / ids.shape[0]
            loss.backward()
        return loss.item()

    want_cost, want = grads(EveryUse(), one_graph)
    if big_table:
        monkeypatch.setattr(blockwise, "BIG_TABLE", big_table)
        monkeypatch.setattr(blockwise, "CHUNK", big_table // 2)
    got_cost, got = grads(Tables(), lambda: blockwise.cost(model, ids, teacher, kl_cost, "cpu", batch_size=2))
    assert want_cost > 1e-3 and got_cost == pytest.approx(want_cost, rel=1e-4)
    assert sum(w.abs().sum() > 0 for w in want) == len(want)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=1e-4 * w.abs().max().item())
