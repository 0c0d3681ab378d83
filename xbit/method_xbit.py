"""The xbit method end to end: measure, learn the allocation, quantize with error compensation.

0. Rotate (rotation_block > 0): every decoder-block linear becomes the same function in a random-sign block
   Hadamard basis (xbit.rotation), which removes the outlier columns and activation dimensions before anything is
   measured; the layers are stored rotated.
1. Measure: calibration text through the float model block by block, E[x_j^2] per linear input; the real error
   of every column at every depth 0..8 (xbit.allocate.column_errors). Saved/loaded with --save/--load-measurement.
2. Learn: budgets across layers from the gradient of the end-to-end cost on held-out tokens (xbit.learn), every
   column's depth from the joint Lagrangian solve (xbit.allocate.solve), exact to the byte budget. Each round
   scores the errors step 3 will make (GPTQ with the measured E[x x^T]); round 0 scores the uniform allocation.
3. Quantize: each layer with GPTQ-style compensation (xbit.gptq) at its per-column depths, low depths first so
   that finer columns absorb the coarse columns' error; or plain rounding (compensate=False). final_pass "reuse"
   (default): the layers as the learning quantized them for the kept round, with the measured E[x x^T] (scoring
   exactly what is stored, and no further pass over the calibration data); "sequential": block by block again,
   each with E[x x^T] collected on the outputs of the quantized blocks before it, as GPTQ does.
4. Tune (tune_epochs > 0): the codes fixed, every group's scale and zero trained end to end against the cost
   (xbit.tune), aiming at the float model's outputs (xbit.blockwise.Teacher: its final hidden states, taken in the
   measurement, and its head).
Every phase keeps one decoder block on the compute device at a time, in float32 (the host holds the blocks in
their stored dtype: xbit.calibrate.on_device); the measured E[x x^T] waits on disk.
"""

import json
import tempfile
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .allocate import Problem, column_errors, solve, uniform_fraction
from .calibrate import calibration_ids, decoder_layers_path, head_hessian, run_blocks, world
from .format import dequantize
from .gptq import quantize_weight_gptq
from . import blockwise, dispatch
from .blockwise import Teacher
from .learn import learn_allocation, resolve_cost
from .rotation import block_size, pack_signs, random_signs, rotate_linear, signs_bytes
from .rtn import quantize_weight_rtn
from .tune import tune_grids
from .spill import OnDisk, loaded
from .usage import Usage


def split_held_out(texts: list[str], fraction: float = 0.1) -> tuple[list[str], list[str], list[str]]:
    """(calibration, selection, report) texts: the last documents (or the end of a single text) are held out,
    a `fraction` each. The selection texts choose among learning rounds and tuning epochs; the report texts give
    the reported task cost and influence nothing."""
    if len(texts) >= 3:
        k = max(1, int(len(texts) * fraction))
        return texts[: -2 * k], texts[-2 * k : -k], texts[-k:]
    text = "\n\n".join(texts)
    a, b = int(len(text) * (1 - 2 * fraction)), int(len(text) * (1 - fraction))
    return [text[:a]], [text[a:b]], [text[b:]]


def held_out_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Held-out windows of seq_len tokens, shorter where the held-out text is (small calibration sets)."""
    tokens = len(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    if tokens < 3:
        raise ValueError(f"the held-out part of the calibration text has {tokens} tokens; give more text")
    return calibration_ids(tokenizer, texts, n_samples, min(seq_len, tokens - 1), seed)


def measure(model, linears: dict, ids: torch.Tensor, device, group_size: int, progress: bool,
            tied: dict | None = None, grid: str = "mse", full_hessians: bool = True, scratch=None,
            usage: Usage | None = None) -> tuple:
    """{name: {"h_diag": E[x_j^2], "err": column errors [in, 9], "h": E[x x^T]}} from the float model.

    "h" (full_hessians) lets the learning rounds score GPTQ-compensated errors (float32: kept in bfloat16 it made
    the scored layers worse, SmolLM2 regime (b) at gptq:3: round-0 cost 0.452 vs 0.413), and with --final-pass
    reuse it is the checkpoint's. One tensor for the layers that read the same input (q/k/v, gate/up), written to
    the folder `scratch` (xbit.spill) when given, and read back when used. Returns the measurement and the last
    block's outputs.

    Layers outside the decoder blocks (regime a): the output head, and an input embedding tied to it, are measured
    on the head's input (the final norm of the last block's output; "h" keeps the full E[x x^T] for compensation).
    An untied input embedding weighs every column equally (its input is one-hot).
    """
    prefix = decoder_layers_path(model)
    heads_of = set((tied or {}).values())
    out = {}

    def record(index, block, hessians):
        kept = []  # (float32, stored) pairs of this block: equal inputs give bit-equal sums
        for local, h in hessians.items():
            name = f"{prefix}.{index}.{local}"
            if name in linears:
                diag = h.diagonal().clone() if full_hessians else h
                err = column_errors(linears[name].weight, diag, group_size, grid)
                out[name] = {"h_diag": diag.cpu(), "err": err.cpu()}
                if full_hessians:
                    same = [s for f, s in kept if torch.equal(f, h)]
                    stored = h.cpu()
                    out[name]["h"] = same[0] if same else OnDisk.write(stored, scratch) if scratch else stored
                    kept += [] if same else [(h, out[name]["h"])]
        if usage:
            usage.note(f"measure block {index}")

    hidden = run_blocks(model, ids, device, record, progress=progress, diag_only=not full_hessians,
                        read_only=True)
    outside = [n for n in linears if n not in out]
    h_head = head_hessian(model, hidden, device) if outside else None
    for name in outside:
        w = linears[name].weight
        if isinstance(linears[name], nn.Embedding) and name not in heads_of:
            ones = torch.ones(w.shape[1], device=device)
            out[name] = {"h_diag": ones.cpu(), "err": column_errors(w, ones, group_size, grid, device).cpu()}
        else:
            diag = h_head.diagonal().clone()
            err = column_errors(w, diag, group_size, grid, device)
            out[name] = {"h_diag": diag.cpu(), "h": OnDisk.write(h_head, scratch) if scratch else h_head.cpu(),
                         "err": err.cpu()}
    if usage and outside:
        usage.note("measure embedding and head")
    return out, hidden


def save_measurement(path, measurement: dict, group_size: int, setup: str):
    tensors, first, alias = {}, {}, {}  # a Hessian shared by several layers is stored once, under the first
    for n, d in measurement.items():
        for k, v in d.items():
            if k == "h" and id(v) in first:
                alias[n] = first[id(v)]
                continue
            if k == "h":
                first[id(v)] = n
            tensors[f"{n}.{k}"] = loaded(v).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "group_size": str(group_size), "setup": setup,
                                            "h_alias": json.dumps(alias)})


def load_measurement(path, linears: dict, group_size: int, setup: str) -> dict:
    """`setup` names the basis and grid the errors were measured with; they must be this run's."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    saved_gs, saved_setup = int(meta.get("group_size", -1)), meta.get("setup", "original basis, minmax grid")
    if saved_gs != group_size:
        raise ValueError(f"measurement {path} was made with group size {saved_gs}, not {group_size}")
    if saved_setup != setup:
        raise ValueError(f"measurement {path} was made with {saved_setup}, this run uses {setup} "
                         "(see --rotation-block and --grid)")
    alias = json.loads(meta.get("h_alias", "{}"))
    out, on_disk = {}, {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for n, lin in linears.items():
            if f"{n}.err" not in keys or f.get_slice(f"{n}.err").get_shape()[0] != lin.weight.shape[1]:
                raise ValueError(f"measurement {path} does not match this model (layer {n})")
            out[n] = {k: f.get_tensor(f"{n}.{k}") for k in ("h_diag", "err") if f"{n}.{k}" in keys}
            h = f"{alias.get(n, n)}.h"  # E[x x^T] stays in the file until a layer needs it
            if h in keys:
                out[n]["h"] = on_disk.setdefault(h, OnDisk(path, h))  # one object per input, as measured
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


def quantize_layer(w: torch.Tensor, h: torch.Tensor | None, bits: torch.Tensor, h_diag: torch.Tensor,
                   group_size: int, damp: float, grid: str) -> dict:
    """Stored tensors of one layer at per-column depths, in storage order: GPTQ-compensated with E[x x^T] `h`,
    or plain rounding where h is None (--no-compensate, or an untied embedding whose input is one-hot)."""
    bits = bits.to(w.device)
    perm = storage_order(bits, h_diag)
    if h is not None:
        return quantize_weight_gptq(w, h.to(w.device), bits, perm, group_size, damp, grid=grid)
    return quantize_weight_rtn(w, bits, perm, group_size, grid)


class FinalLayers:
    """Every layer quantized as the final quantization (quantize_layer) makes it at given depths, with the measured
    E[x x^T] (on the float model's inputs) in place of the one collected on quantized inputs. A layer is quantized
    at once (on the device) and kept packed on the host, a checkpoint's bytes for the whole model. A layer asked
    again at the depths of one of its last two quantizations (a dropped round's next one is anchored to the kept
    one) is not quantized again.

    `delta(name, bits)` gives the learning rounds a function making Q - W (expanded only when its block runs);
    `tensors(name, bits)` gives the stored tensors themselves, which --final-pass reuse keeps as the checkpoint's."""

    def __init__(self, linears: dict, measurement: dict, group_size: int, damp: float, grid: str,
                 compensate: bool, device):
        self.linears, self.measurement, self.device = linears, measurement, device
        self.group_size, self.damp, self.grid, self.compensate = group_size, damp, grid, compensate
        self.recent = {}

    def tensors(self, name: str, bits: torch.Tensor) -> dict:
        t = next((t for old, t in self.recent.get(name, []) if torch.equal(old, bits)), None)
        if t is None:
            w, m = self.linears[name].weight, self.measurement[name]
            h = loaded(m.get("h")) if self.compensate else None
            t = quantize_layer(w.to(self.device, torch.float32), None if h is None else h.to(self.device), bits,
                               m["h_diag"], self.group_size, self.damp, self.grid)
            t = {k: v.cpu() for k, v in t.items()}
            self.recent[name] = [(bits.clone(), t)] + self.recent.get(name, [])[:1]
        return t

    def delta(self, name: str, bits: torch.Tensor):
        """rows -> (Q - W)[rows] (a slice or an index tensor of output rows), made on the device when called."""
        t, w, device = self.tensors(name, bits), self.linears[name].weight, torch.device(self.device)
        packed = SimpleNamespace(**t, group_size=self.group_size)  # what an xbit kernel reads of a layer

        def rows_of(rows):
            if device.type == "cpu":
                q = dispatch.dequantize(packed, rows)
            else:  # the rows' codes travel to the device, not their float weights
                q = dequantize(t["qweight"][:, rows].to(device), t["scales"][:, rows].to(device),
                               t["zeros"][:, rows].to(device), t["perm"].to(device), t["bits"].to(device),
                               self.group_size)
            return q.sub_(w[rows].to(device, torch.float32))
        return rows_of


DEFAULT_MIN_BITS = 2  # 1-bit columns rarely pay; below the size where every column has 2 bits they must


def allocate(model, linears, measurement, budget, group_size, allocation, teacher, cost_fn, rounds,
             progress, device, importance: float = 0.5, min_bits: int | None = None, tied_heads: dict | None = None,
             delta_fn=None):
    """(bits per layer, report extras). min_bits None: DEFAULT_MIN_BITS, lowered until the budget can be met."""
    err = tempered_errors(measurement, importance)
    for floor in [min_bits] if min_bits is not None else range(DEFAULT_MIN_BITS, -1, -1):
        problem = Problem({n: (err[n], linears[n].weight.shape[0]) for n in linears}, group_size,
                          allowed=range(floor, 9))
        if problem.exact_bytes(problem.choose(1e30, torch.ones(len(linears)))) <= budget:
            break
    uniform = uniform_fraction(problem, budget, {n: measurement[n]["h_diag"] for n in linears})
    if allocation == "uniform":
        return uniform, {"min_bits": floor}
    # each layer's errors relative to its output energy (its error with every column at 0 bits): scale-free
    energy = torch.tensor([err[n][:, 0].double().sum().item() for n in linears], dtype=torch.float64)
    weights = 1.0 / energy.clamp(min=1e-30)
    if allocation == "proxy":
        return solve(problem, budget, weights), {"min_bits": floor}
    bits, learned = learn_allocation(model, problem, solve, budget, linears, teacher, cost_fn, delta_fn, device,
                                     rounds=rounds, progress=progress, initial_weights=weights,
                                     tied_heads=tied_heads, start=uniform)
    return bits, {"min_bits": floor, **learned}


SELECTION_SAMPLES = 16  # held-out sequences that choose the kept learning round and tuning epoch
REPORT_SAMPLES = 8  # further held-out sequences, seen by nothing, that give the reported task cost


def quantize_xbit(model, tokenizer, linears: dict, replace, budget: int, texts: list[str], device,
                  settings, tied: dict | None = None, progress: bool = True, usage: Usage | None = None):
    """Quantizes every layer in `linears`, handing its stored tensors to replace(name, module, tensors, block):
    layers of the decoder blocks inside their block (so later blocks calibrate on quantized inputs), the embeddings
    and head before the blocks. `tied` maps an output head's name to the embedding whose table it shares (one
    candidate). `settings`: xbit.settings.QuantizeSettings (its .xbit options: rotation, grid, allocation,
    compensation, tuning). `usage` (xbit.usage.Usage) times the phases. Returns the report extras, the task cost on
    the report tokens among them."""
    with tempfile.TemporaryDirectory(prefix="xbit-measure-") as scratch:  # E[x x^T] of every layer, on disk
        return _quantize_xbit(model, tokenizer, linears, replace, budget, texts, device, settings, tied, progress,
                              usage or Usage(), scratch)


def _quantize_xbit(model, tokenizer, linears, replace, budget, texts, device, settings, tied, progress, usage,
                   scratch):
    o = settings.xbit
    group_size, seed, damp, grid, compensate = settings.group_size, settings.seed, settings.damp, o.grid, o.compensate
    rotation_block, allocation = o.rotation_block, o.allocation
    reuse = o.final_pass == "reuse"
    with usage.phase("measure"):  # (the rotation and the teachers included)
        cost_fn = resolve_cost(o.cost) if isinstance(o.cost, str) else o.cost
        calib_texts, selection_texts, report_texts = split_held_out(texts)
        ids = calibration_ids(tokenizer, calib_texts, settings.calib_samples, settings.seq_len, seed)
        held_ids = held_out_ids(tokenizer, selection_texts, SELECTION_SAMPLES, settings.seq_len, seed + 1)
        report_ids = held_out_ids(tokenizer, report_texts, REPORT_SAMPLES, settings.seq_len, seed + 2)
        prefix = decoder_layers_path(model)
        rotated = {}  # name -> (signs, block); the float layers compute the same function in the rotated basis
        if rotation_block:
            for name, lin in linears.items():
                if not (name.startswith(prefix + ".") and isinstance(lin, nn.Linear)):
                    continue
                block = block_size(lin.in_features, rotation_block)
                if block > 1:  # (a block of 1 would only flip signs)
                    # one draw per block and width: layers reading one input (q/k/v, gate/up) see it rotated alike,
                    # so they still share one E[x x^T]
                    key = f"{prefix}.{name[len(prefix) + 1:].split('.')[0]}"
                    rotated[name] = (random_signs(lin.in_features, key, seed), block)
                    rotate_linear(lin, *rotated[name])
            budget -= sum(signs_bytes(linears[n].in_features) for n in rotated)
        basis = (f"Hadamard basis (blocks <= {rotation_block}, signs per block, seed {seed})" if rotated
                 else "original basis")
        setup = f"{basis}, {grid} grid, float32 E[x x^T]"  # what the saved measurement depends on besides the model
        load_measurement_from = o.load_measurement
        last_hidden = None  # the float model's last block outputs on the calibration sequences, when measured now
        if load_measurement_from:
            measurement = load_measurement(load_measurement_from, linears, group_size, setup)
            if compensate and allocation == "learned" and any("h" not in measurement[n] for n in linears
                                                              if n.startswith(prefix + ".")):
                raise ValueError(f"measurement {load_measurement_from} has no E[x x^T] per layer (made by an older "
                                 "xbit or with --no-compensate); measure again")
        else:
            measurement, last_hidden = measure(model, linears, ids, device, group_size, progress, tied, grid,
                                               full_hessians=compensate, scratch=scratch, usage=usage)
        if o.save_measurement and world()[0] == 0:
            save_measurement(o.save_measurement, measurement, group_size, setup)
        # the float model's outputs that the learning, the tuning and the report aim at (no copy of the model)
        report_teacher = Teacher(model, report_ids, device)
        held_teacher = Teacher(model, held_ids, device) if allocation == "learned" or o.tune_epochs else None
        train_teacher = None
        if o.tune_epochs:
            # the measurement's last hidden states serve as the teacher's (a process measures only its share)
            measured = last_hidden is not None and world()[1] == 1
            n = ids.shape[0] if o.tune_samples is None else min(o.tune_samples, ids.shape[0])
            train_teacher = Teacher(model, ids[:n], device, normed=blockwise.normed(model, last_hidden, device)[:n]
                                    .clone() if measured else None)
        del last_hidden
    tied_heads = {emb: model.get_submodule(head) for head, emb in (tied or {}).items()}
    final_layers = FinalLayers(linears, measurement, group_size, damp, grid, compensate, device)
    with usage.phase("learn"):
        bits, learned = allocate(model, linears, measurement, budget, group_size, allocation, held_teacher, cost_fn,
                                 o.rounds, progress, device, importance=o.importance, min_bits=o.min_bits,
                                 tied_heads=tied_heads,
                                 delta_fn=final_layers.delta)

    def quantize_one(name, h=None, tensors=None):
        w = linears[name].weight
        if tensors is None:
            tensors = quantize_layer(w, h if compensate else None, bits[name], measurement[name]["h_diag"],
                                     group_size, damp, grid)
        block = 0
        if name in rotated:
            signs, block = rotated[name]
            tensors = {**tensors, "rot_signs": pack_signs(signs).to(w.device)}
        replace(name, linears[name], tensors, block)

    def quantize_block(index, block, hessians):
        for local, h in hessians.items():
            name = f"{prefix}.{index}.{local}"
            if name in linears:
                quantize_one(name, h)
        usage.note(f"quantize block {index}")

    with usage.phase("quantize"):
        for name in [n for n in linears if not n.startswith(prefix + ".")]:  # embeddings, head: from float stats
            quantize_one(name, tensors=final_layers.tensors(name, bits[name]))
        if len(linears) > sum(n.startswith(prefix + ".") for n in linears):
            usage.note("quantize embedding and head")
        if reuse:  # the layers as the learning quantized them, with the measured (float-input) statistics
            for name in [n for n in linears if n.startswith(prefix + ".")]:
                quantize_one(name, tensors=final_layers.tensors(name, bits[name]))
            usage.note("quantize blocks (reused)")
        else:  # GPTQ's order: each block with E[x x^T] of the quantized blocks before it
            run_blocks(model, ids, device, quantize_block, progress=progress, diag_only=not compensate)
    if o.tune_epochs:
        with usage.phase("tune"):
            # (the reused layers are the kept learning round's: its held-out cost is the untuned one)
            untuned = learned.get("best_cost") if reuse else None
            learned.update(tune_grids(model, train_teacher, held_teacher, cost_fn, device, epochs=o.tune_epochs,
                                      lr=o.tune_lr, progress=progress, untuned_cost=untuned))
    with usage.phase("report cost"):
        learned["report_cost"] = blockwise.cost(model, report_ids, report_teacher, cost_fn, device, backward=False)
    return {"allocation": allocation, "compensate": compensate, "rotation_block": rotation_block, "grid": grid,
            **learned}

