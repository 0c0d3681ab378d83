"""Bit allocation: the Lagrangian solver against brute force, exactness to the byte budget, learned budgets."""

import itertools
import json

import pytest
import torch

import xbit
from xbit.allocate import Problem, column_errors, solve
from xbit.quantize import match_size
from tests.tiny import WORDS, tiny_llama, tiny_tokenizer


def random_problem(seed=0, layers=((256, 576),) * 6 + ((576, 1536),) * 2, group_size=128):
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for i, (out, k) in enumerate(layers):
        w = torch.randn(out, k, generator=g) * torch.rand(1, k, generator=g)
        h = torch.rand(k, generator=g) * 3
        parts[f"l{i}"] = (column_errors(w, h, group_size), out)
    return Problem(parts, group_size)


def test_column_errors_fall_with_depth_and_zero_bits_is_the_weight_energy():
    g = torch.Generator().manual_seed(3)
    w, h = torch.randn(48, 70, generator=g), torch.rand(70, generator=g) + 0.1
    err = column_errors(w, h, 32)
    torch.testing.assert_close(err[:, 0], w.pow(2).sum(0) * h)
    assert torch.all(err[:, 2:] <= err[:, 1:-1] * 1.0001)


def test_lagrangian_choice_is_brute_force_optimal_on_its_hull_points():
    """For every multiplier, the per-column choice minimises total error among all assignments of no more
    (additive) cost: checked exhaustively on 4 columns x 9 depths."""
    g = torch.Generator().manual_seed(1)
    w, h = torch.randn(16, 4, generator=g), torch.rand(4, generator=g) + 0.5
    p = Problem({"l": (column_errors(w, h, 32), 16)}, 32)
    combos = torch.tensor(list(itertools.product(range(9), repeat=4)))
    rows = torch.arange(4)
    all_err = p.err[rows, combos].sum(1)
    all_cost = p.cost[rows, combos].sum(1)
    for lam in [1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]:
        bits = p.choose(lam, torch.ones(1, dtype=torch.float64))
        cost, err = p.cost[rows, bits].sum(), p.err[rows, bits].sum()
        assert err <= all_err[all_cost <= cost + 1e-9].min() + 1e-12


@pytest.mark.parametrize("seed", range(12))
def test_solution_never_exceeds_budget_and_lands_close(seed):
    p = random_problem(seed)
    g = torch.Generator().manual_seed(100 + seed)
    full = p.exact_bytes(torch.full((p.err.shape[0],), 8))
    low = p.exact_bytes(torch.zeros(p.err.shape[0], dtype=torch.long))
    budget = int(low + (full - low) * (0.1 + 0.8 * torch.rand(1, generator=g).item()))
    bits = solve(p, budget)
    used = p.exact_bytes(torch.cat([bits[n].long() for n in p.names]))
    assert used <= budget
    assert used >= budget * 0.99  # (on whole models the benchmarks hold it to 0.5%)


def test_fee_keeps_the_solve_near_its_anchor():
    """fee 0 is the free solve; a higher fee moves fewer columns away from the anchor at the same budget and
    never beats the free solve's proxy error; fee >= 1 returns the anchor itself."""
    p = random_problem(5)
    budget = p.exact_bytes(torch.full((p.err.shape[0],), 3))
    anchor = {n: torch.full((p.shapes[n][1],), 3, dtype=torch.uint8) for n in p.names}
    weights = torch.linspace(0.5, 2.0, len(p.names), dtype=torch.float64)
    flat = lambda bits: torch.cat([bits[n].long() for n in p.names])
    rows = torch.arange(p.err.shape[0])
    proxy = lambda b: (p.err[rows, b] * weights[p.layer_of]).sum().item()
    free = flat(solve(p, budget, weights))
    assert torch.equal(flat(solve(p, budget, weights, anchor=anchor, fee=0.0)), free)
    moved, errors = [], []
    for fee in (0.0, 0.3, 0.6, 0.9):
        b = flat(solve(p, budget, weights, anchor=anchor, fee=fee))
        assert p.exact_bytes(b) <= budget
        moved.append((b != 3).sum().item())
        errors.append(proxy(b))
    assert moved[0] > moved[1] > moved[2] > moved[3] > 0
    assert min(errors) == errors[0] and errors[-1] < proxy(flat(anchor))  # a small move still pays
    assert torch.equal(flat(solve(p, budget, weights, anchor=anchor, fee=1.0)), flat(anchor))


def test_trust_region_drops_worse_rounds_and_shrinks_the_step(monkeypatch):
    """With a stand-in cost that punishes every column moved away from the start, every learned round is worse:
    each is dropped, the fee climbs 0 -> 0.5 -> 0.75, and the start comes back. With a cost that rewards
    moves, the first round is kept and the fee halves."""
    import xbit.learn as learn

    p = random_problem(2)
    budget = p.exact_bytes(torch.full((p.err.shape[0],), 3))
    start = {n: torch.full((p.shapes[n][1],), 3, dtype=torch.uint8) for n in p.names}

    def run(sign):
        def stand_in_cost(model, linears, deltas, teacher, cost_fn, device, batch_size, tied_heads):
            moved = sum((d != 3).sum().item() for d in deltas.values())
            return 1.0 + sign * moved / 1000, torch.linspace(1.0, 3.0, len(p.names), dtype=torch.float64)

        monkeypatch.setattr(learn, "cost_and_gradient", stand_in_cost)
        return learn.learn_allocation(torch.nn.Linear(1, 1), p, solve, budget, {}, None, None,
                                      lambda name, bits: bits, "cpu", rounds=4, progress=False, start=start)

    bits, report = run(+1)
    assert all(torch.equal(bits[n], start[n]) for n in p.names)
    assert [r["fee"] for r in report["rounds"]] == [None, 0.0, 0.5, 0.75]
    assert report["best_cost"] == 1.0 and all(r["moved"] > 0 for r in report["rounds"][1:])
    bits, report = run(-1)
    assert report["best_cost"] < 1.0 and any(not torch.equal(bits[n], start[n]) for n in p.names)
    assert report["rounds"][2]["fee"] == 0.0


def test_budget_below_the_format_floor_is_refused():
    p = random_problem()
    with pytest.raises(ValueError, match="below the smallest allocation"):
        solve(p, 10)


def texts(n=10, words=800, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist()) for _ in range(n)]


def test_learned_allocation_beats_uniform_budgets_end_to_end_and_fits_size():
    """At the same bytes, the learned allocation gives a lower KL to the float model than the allocation forced
    uniform, on text neither saw; and its gradient rounds lower the held-out cost they start from."""
    from xbit.learn import kl_cost

    tok = tiny_tokenizer()
    size = match_size(tiny_llama(), "gptq:2:32")
    evaluation = torch.randint(3, 128, (8, 64), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = tiny_llama()(evaluation).logits
    kl, reports = {}, {}
    for allocation in ("uniform", "learned"):
        model, qc, rep = xbit.quantize(tiny_llama(), tok, method="xbit", size=size, group_size=32, calib=texts(),
                                       calib_samples=8, seq_len=64, allocation=allocation, rounds=3, progress=False)
        assert rep["checkpoint_bytes"] <= size
        with torch.no_grad():
            kl[allocation] = kl_cost(model(evaluation).logits, ref, evaluation).item()
        reports[allocation] = rep
    assert kl["learned"] < 0.5 * kl["uniform"]
    rep = reports["learned"]
    assert rep["best_cost"] < rep["rounds"][0]["cost"]
    assert len(rep["sensitivities"]) == 15  # 14 linears and the tied embedding table


def test_xbit_checkpoint_round_trip_and_measurement_reuse(tmp_path):
    tok = tiny_tokenizer()
    calib = texts()
    meas = tmp_path / "m.safetensors"
    model, qc, rep = xbit.quantize(tiny_llama(), tok, method="xbit", bits=4.0, group_size=32, calib=calib,
                                   calib_samples=4, seq_len=64, allocation="proxy", progress=False,
                                   save_measurement=meas)
    assert 4.0 * 0.97 <= rep["bits_per_weight_layers"] <= 4.0  # tiny layers: coarse steps (0.5% on real models)
    again, _, rep2 = xbit.quantize(tiny_llama(), tok, method="xbit", bits=4.0, group_size=32, calib=calib,
                                   calib_samples=4, seq_len=64, allocation="proxy", progress=False,
                                   load_measurement=meas)
    assert rep2["layers"] == rep["layers"]
    xbit.checkpoint.save(model, tok, tmp_path / "ck", qc, rep)
    loaded = xbit.load(tmp_path / "ck", device="cpu", dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5, 6]])
    model.half().float()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_measurement_keeps_one_hessian_per_input_through_save_and_load(tmp_path):
    """q/k/v (and gate/up) read one input: one E[x x^T], stored once, shared again after loading; its diagonal is
    the E[x_j^2] the column errors use; and a learned allocation from the loaded measurement is the same."""
    from safetensors import safe_open

    from xbit.method_xbit import load_measurement
    from xbit.quantize import quantizable_linears

    tok, calib, meas = tiny_tokenizer(), texts(), tmp_path / "m.safetensors"
    kw = dict(method="xbit", bits=4.5, group_size=32, calib=calib, calib_samples=8, seq_len=64, rounds=2,
              progress=False)
    _, _, rep = xbit.quantize(tiny_llama(), tok, save_measurement=meas, **kw)
    with safe_open(str(meas), "pt") as f:
        alias, setup = json.loads(f.metadata()["h_alias"]), f.metadata()["setup"]
        stored = [k for k in f.keys() if k.endswith(".h") and k.startswith("model.layers.")]
    assert alias["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert alias["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert len(stored) == 2 * 4  # per block: attention input, o_proj input, MLP input, down_proj input
    model = tiny_llama()
    linears = {n: m for n, m in quantizable_linears(model).items() if n.startswith("model.layers.")}
    m = load_measurement(meas, linears, 32, setup)
    q, v = m["model.layers.0.self_attn.q_proj"], m["model.layers.0.self_attn.v_proj"]
    assert v["h"] is q["h"] and q["h"].load().dtype == torch.float32  # read from the file when used
    torch.testing.assert_close(q["h"].load().diagonal(), q["h_diag"], rtol=0, atol=0)
    _, _, again = xbit.quantize(tiny_llama(), tok, load_measurement=meas, **kw)
    assert again["layers"] == rep["layers"]


def test_learning_scores_the_compensated_errors_the_checkpoint_will_have():
    """FinalLayers.delta is what quantization stores: with compensation its error in the layer's output,
    tr(D H D^T), is below plain rounding's at the same depths; without, it is exactly the rounding one."""
    from xbit.gptq import quantize_weight_gptq
    from xbit.method_xbit import FinalLayers, storage_order
    from xbit.rtn import quantize_weight_rtn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = x.t() @ x / x.shape[0]
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data = torch.randn(48, 64, generator=g)
    meas = {"l": {"h_diag": h.diagonal().clone(), "h": h}}
    bits = torch.randint(2, 5, (64,), generator=g).to(torch.uint8)
    comp = FinalLayers({"l": lin}, meas, 32, 0.01, "mse", True, "cpu").delta("l", bits)(slice(None))
    plain = FinalLayers({"l": lin}, meas, 32, 0.01, "mse", False, "cpu").delta("l", bits)(slice(None))
    out_err = lambda d: torch.trace(d @ h @ d.t()).item()  # noqa: E731
    assert out_err(comp) < 0.8 * out_err(plain)
    exact = quantize_weight_gptq(lin.weight, h, bits, storage_order(bits, h.diagonal()), 32, 0.01, grid="mse")
    w = xbit.format.dequantize(exact["qweight"], exact["scales"], exact["zeros"], exact["perm"], exact["bits"], 32)
    torch.testing.assert_close(comp, w - lin.weight, rtol=0, atol=0)
    r = quantize_weight_rtn(lin.weight, bits, storage_order(bits, h.diagonal()), 32, "mse")
    w = xbit.format.dequantize(r["qweight"], r["scales"], r["zeros"], r["perm"], r["bits"], 32)
    torch.testing.assert_close(plain, w - lin.weight, rtol=0, atol=0)
    rows = torch.tensor([47, 0, 5, 5])  # a big table's lookups: the rows read, in any order (the C++ dequantizer)
    delta = FinalLayers({"l": lin}, meas, 32, 0.01, "mse", False, "cpu").delta("l", bits)
    torch.testing.assert_close(delta(rows), (w - lin.weight)[rows], rtol=0, atol=0)


def test_default_floor_of_two_bits_is_lowered_only_where_the_size_needs_it():
    """At a size below every column at 2 bits, the default floor drops to 1 bit and the size is still met; an
    explicit --min-bits 2 refuses that size."""
    tok, calib = tiny_tokenizer(), texts()
    kw = dict(method="xbit", group_size=32, calib=calib, calib_samples=4, seq_len=64, allocation="proxy",
              progress=False)
    size = int(match_size(tiny_llama(), "gptq:2:32") * 0.7)  # below every column at 2 bits
    _, _, rep = xbit.quantize(tiny_llama(), tok, size=size, **kw)
    assert rep["checkpoint_bytes"] <= size and rep["min_bits"] == 1
    assert any(layer["counts"][1] > 0 for layer in rep["layers"].values())
    with pytest.raises(ValueError, match="below the smallest allocation"):
        xbit.quantize(tiny_llama(), tok, size=size, min_bits=2, **kw)
    _, _, rep = xbit.quantize(tiny_llama(), tok, size=match_size(tiny_llama(), "gptq:3:32"), **kw)
    assert rep["min_bits"] == 2


def test_measured_hessians_wait_on_disk_and_read_back_equal(tmp_path):
    """With a scratch folder, every E[x x^T] is written when measured (one file per input, shared by the layers
    reading it) and reads back equal to the one kept in memory without it."""
    from xbit.calibrate import calibration_ids
    from xbit.method_xbit import measure
    from xbit.quantize import quantizable_linears
    from xbit.spill import OnDisk

    model = tiny_llama()
    linears = quantizable_linears(model)
    ids = calibration_ids(tiny_tokenizer(), texts(), 4, 64, seed=0)
    in_memory, _ = measure(model, linears, ids, "cpu", 32, False)
    spilled, _ = measure(model, linears, ids, "cpu", 32, False, scratch=tmp_path)
    assert all(isinstance(spilled[n]["h"], OnDisk) for n in linears)
    assert len({id(spilled[n]["h"]) for n in linears}) == len(list(tmp_path.iterdir())) == 2 * 4
    for n in linears:
        assert torch.equal(spilled[n]["h"].load(), in_memory[n]["h"])
        assert torch.equal(spilled[n]["err"], in_memory[n]["err"])


def test_final_pass_reuse_keeps_the_learned_layers_and_sequential_requantizes(monkeypatch):
    """Both final passes store the learned allocation. reuse stores the layers as the learning quantized them
    (GPTQ with the float model's E[x x^T]) without another pass over the calibration data; sequential quantizes
    the blocks again on the quantized blocks' outputs: the same tensors in block 0 (whose inputs are the float
    model's either way, the embeddings kept float), other ones after it."""
    from xbit import method_xbit

    passes = []
    real_run_blocks = method_xbit.run_blocks
    monkeypatch.setattr(method_xbit, "run_blocks", lambda *a, **k: passes.append(1) or real_run_blocks(*a, **k))
    kw = dict(method="xbit", group_size=32, calib=texts(), calib_samples=8, seq_len=64, rounds=2, tune_epochs=0,
              quantize_embeddings=False, progress=False, size=match_size(tiny_llama(), "gptq:3:32"))
    reuse, _, rep = xbit.quantize(tiny_llama(), tiny_tokenizer(), final_pass="reuse", **kw)
    assert len(passes) == 1  # the measurement
    sequential, _, seq_rep = xbit.quantize(tiny_llama(), tiny_tokenizer(), final_pass="sequential", **kw)
    assert len(passes) == 3  # its measurement and the final pass
    assert rep["layers"] == seq_rep["layers"] and rep["checkpoint_bytes"] <= kw["size"]
    for name, m in reuse.named_modules():
        if isinstance(m, xbit.modules.XbitLinear):
            s = sequential.get_submodule(name)
            same = all(torch.equal(getattr(m, k), getattr(s, k)) for k in ("qweight", "scales", "zeros", "perm"))
            assert same == name.startswith("model.layers.0."), name
    # with the tuning (whose teacher reuses the measurement's hidden states) the pass asked for still runs
    xbit.quantize(tiny_llama(), tiny_tokenizer(), final_pass="sequential", **{**kw, "tune_epochs": 1})
    assert len(passes) == 5
    xbit.quantize(tiny_llama(), tiny_tokenizer(), final_pass="reuse", **{**kw, "tune_epochs": 1})
    assert len(passes) == 6
