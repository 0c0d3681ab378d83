"""The xbit method end to end: measure, learn the allocation, quantize with error compensation.

1. Measure: calibration text through the float model block by block, E[x_j^2] per linear input; the real error
   of every column at every depth 0..8 (xbit.allocate.column_errors). Saved/loaded with --save/--load-measurement.
2. Learn: budgets across layers from the gradient of the end-to-end cost on held-out tokens (xbit.learn), every
   column's depth from the joint Lagrangian solve (xbit.allocate.solve), exact to the byte budget.
3. Quantize: block by block again, each layer with GPTQ-style compensation (xbit.gptq) at its per-column depths,
   low depths first so that finer columns absorb the coarse columns' error; or plain rounding (compensate=False).
"""

import torch
from safetensors.torch import load_file, save_file

from .allocate import Problem, column_errors, solve, uniform_fraction
from .calibrate import calibration_ids, decoder_layers_path, run_blocks
from .gptq import quantize_weight_gptq
from .learn import learn_allocation
from .rtn import quantize_weight_rtn

ALLOCATIONS = ("learned", "proxy", "uniform")


def split_held_out(texts: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Calibration texts and held-out texts for the cost (the last documents, or the end of a single text)."""
    if len(texts) >= 2:
        k = max(1, int(len(texts) * fraction))
        return texts[:-k], texts[-k:]
    cut = int(len(texts[0]) * (1 - fraction))
    return [texts[0][:cut]], [texts[0][cut:]]


def measure(model, linears: dict, ids: torch.Tensor, device, group_size: int, progress: bool) -> dict:
    """{name: {"h_diag": E[x_j^2], "err": column errors [in, 9]}} from the float model."""
    prefix = decoder_layers_path(model)
    out = {}

    def record(index, block, hessians):
        for local, h in hessians.items():
            name = f"{prefix}.{index}.{local}"
            if name in linears:
                diag = h  # diag_only: E[x_j^2]
                out[name] = {"h_diag": diag.cpu(), "err": column_errors(linears[name].weight, diag, group_size).cpu()}

    run_blocks(model, ids, device, record, progress=progress, diag_only=True)
    missing = set(linears) - set(out)
    if missing:
        raise ValueError(f"layers outside the decoder blocks cannot be measured yet: {sorted(missing)[:3]}")
    return out


def save_measurement(path, measurement: dict, group_size: int):
    tensors = {f"{n}.{k}": v.contiguous() for n, d in measurement.items() for k, v in d.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "group_size": str(group_size)})


def load_measurement(path, linears: dict, group_size: int) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved_gs = int(f.metadata().get("group_size", -1))
    if saved_gs != group_size:
        raise ValueError(f"measurement {path} was made with group size {saved_gs}, not {group_size}")
    tensors = load_file(str(path))
    out = {}
    for n, lin in linears.items():
        if f"{n}.err" not in tensors or tensors[f"{n}.err"].shape[0] != lin.in_features:
            raise ValueError(f"measurement {path} does not match this model (layer {n})")
        out[n] = {"h_diag": tensors[f"{n}.h_diag"], "err": tensors[f"{n}.err"]}
    return out


def storage_order(bits: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
    """Segments by increasing depth; inside a segment, act order (decreasing E[x_j^2])."""
    rank = torch.argsort(torch.argsort(h_diag, descending=True, stable=True))  # 0 = most active column
    return torch.argsort(bits.long() * bits.numel() + rank.to(bits.device), stable=True)


def tempered_errors(measurement: dict, importance: float) -> dict:
    """Column errors with E[x_j^2] raised to `importance` instead of 1.

    E[x_j^2] is dominated by a few massive activation dimensions (largest on the first tokens); weighting by it
    fully starves the ordinary dimensions. Measured on SmolLM2 at the GPTQ 3-bit size (held-out KL of the
    proxy allocation, plain rounding): importance 1.0 -> 3.2, 0.5 -> 1.2, 0.0 -> 2.0; uniform 3-bit 2.75.
    """
    out = {}
    for n, m in measurement.items():
        h = m["h_diag"].double().clamp(min=1e-20)
        out[n] = (m["err"].double() * h[:, None] ** (importance - 1.0)).float()
    return out


def allocate(model, linears, measurement, budget, group_size, allocation, held_out_ids, cost_fn, rounds,
             progress, importance: float = 0.5, min_bits: int = 2) -> tuple[dict, dict]:
    err = tempered_errors(measurement, importance)
    problem = Problem({n: (err[n], linears[n].out_features) for n in linears}, group_size,
                      allowed=range(min_bits, 9))
    if allocation == "uniform":
        return uniform_fraction(problem, budget, {n: measurement[n]["h_diag"] for n in linears}), {}
    # each layer's errors relative to its output energy (its error with every column at 0 bits): scale-free
    energy = torch.tensor([err[n][:, 0].double().sum().item() for n in linears], dtype=torch.float64)
    weights = 1.0 / energy.clamp(min=1e-30)
    if allocation == "proxy":
        return solve(problem, budget, weights), {}
    return learn_allocation(model, problem, solve, budget, linears, held_out_ids, cost_fn, rounds=rounds,
                            progress=progress, initial_weights=weights)


def quantize_xbit(model, tokenizer, linears: dict, replace, budget: int, texts: list[str], group_size: int, device,
                  calib_samples: int, seq_len: int, seed: int, damp: float, cost_fn, allocation: str = "learned",
                  rounds: int = 3, compensate: bool = True, held_out_samples: int = 16,
                  importance: float = 0.5, min_bits: int = 2,
                  save_measurement_to=None, load_measurement_from=None, progress: bool = True):
    """Quantizes every layer in `linears`, handing its stored tensors to replace(name, linear, tensors) inside its
    block (so later blocks calibrate on quantized inputs). Returns the report extras."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; available: {', '.join(ALLOCATIONS)}")
    calib_texts, held_texts = split_held_out(texts)
    ids = calibration_ids(tokenizer, calib_texts, calib_samples, seq_len, seed)
    held_ids = calibration_ids(tokenizer, held_texts, held_out_samples, seq_len, seed + 1)
    if load_measurement_from:
        measurement = load_measurement(load_measurement_from, linears, group_size)
    else:
        measurement = measure(model, linears, ids, device, group_size, progress)
    if save_measurement_to:
        save_measurement(save_measurement_to, measurement, group_size)
    bits, learned = allocate(model, linears, measurement, budget, group_size, allocation, held_ids, cost_fn,
                             rounds, progress, importance=importance, min_bits=min_bits)
    prefix = decoder_layers_path(model)

    def quantize_block(index, block, hessians):
        for local, h in hessians.items():
            name = f"{prefix}.{index}.{local}"
            if name not in linears:
                continue
            w, b = linears[name].weight, bits[name].to(linears[name].weight.device)
            perm = storage_order(b, measurement[name]["h_diag"])
            if compensate:
                replace(name, linears[name], quantize_weight_gptq(w, h, b, perm, group_size, damp))
            else:
                replace(name, linears[name], quantize_weight_rtn(w, b, perm, group_size))

    run_blocks(model, ids, device, quantize_block, progress=progress, diag_only=not compensate)
    return {"allocation": allocation, "compensate": compensate, **learned}

