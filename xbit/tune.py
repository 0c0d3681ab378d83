"""End-to-end tuning of the grids: after quantization, the codes stay fixed and every group's scale and zero are
trained by Adam against the task cost (default KL(original || quantized) on the calibration tokens).

GPTQ-style compensation fixes each layer's error against its own output only; the tuning sees the whole network, so
the grids of early layers learn to serve the later ones. Only the float16 scales and zeros change: the bytes, the
format and the kernels stay as they are. The held-out tokens pick the epoch (the untuned grids included), so the
kept result is never worse on them than no tuning, and the tuning stops at the first epoch that does not lower
their cost.

Parametrisation: scale = scale0 * exp(r * a) and zero = zero0 + c (in code steps), a = c = 0 at the start, so one
learning rate suits every layer whatever its weights' magnitude. r = 2^-(b - 3) for a group of b > 3 bits (1 up to 3
bits): a relative change of the scale moves a group's outer levels by about 2^(b-1) code steps, so without it a
step that is small at 2-3 bits moves a 6-bit grid by whole steps (Adam takes steps of about the learning rate
whatever the gradient's size; r is its step size per group). SmolLM2, regime (a) at the GPTQ 3-bit size (~6 bits
per weight), held-out cost by epoch: without r 0.0157 untuned, 0.0202-0.0219 after the first (dropped); with r
0.0157, 0.0142, 0.0140 (perplexity 25.98 -> 25.85). At ~3.2 bits (regime (b)) the tuning gains the same with or
without it (-18%).

Memory: one block on the device at a time (xbit.blockwise); the float model is not kept, only its final hidden
states on the calibration and held-out sequences with the float head (xbit.blockwise.Teacher). A block's layers
dequantize once in its forward and once in its recomputation for the backward; an embedding table (and the head it
serves) once per step, its gradient gathered on the expanded table and passed to its grid at the step's end. A
table of more than blockwise.BIG_TABLE weights (a 128k-vocabulary head: 525M) is never expanded whole: a lookup
dequantizes the rows it reads, a product goes a chunk of output rows at a time with each chunk's weight recomputed
in the backward pass instead of kept (several 2.1 GB temporaries per use became 64 MB ones).
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import blockwise
from .blockwise import Teacher
from .format import dequantize_unpacked, unpack_layer
from .modules import XbitEmbedding, XbitLinear, XbitTiedHead
from .rotation import unpack_signs, unrotate


TUNE_LR = 3e-3  # Adam on log-scale and zero shift
DEFAULT_TUNE_EPOCHS = 2  # SmolLM2 at the GPTQ 3-bit size: held-out KL 0.292 -> 0.231 -> 0.223 (docs/BENCHMARKS.md)
# calibration sequences the tuning trains on (the first ones; they are random windows); None: all of them. At 128
# sequences, SmolLM2 regime (b) at gptq:3: 32 of them tune in 337 s instead of 947 s, at +2.5% / +1.3% perplexity
# (docs/BENCHMARKS.md), so the subset is an option (--tune-samples 32), not the default
DEFAULT_TUNE_SAMPLES = None


SCALE_RATE_BITS = 3  # deeper groups move their log-scale half as fast per extra bit (module docstring)
KEPT_CODES_BYTES = 2 << 30  # unpacked codes (a byte per weight) kept for the whole tuning up to this much; the
# layers beyond are unpacked again at each use (same numbers): an 8B model's 8 GB of codes would sit in host memory


class TunableGrid:
    """One quantized table (XbitLinear or XbitEmbedding) as a differentiable function of its scales and zeros."""

    def __init__(self, module: XbitLinear, keep_codes: bool = True):
        self.module = module
        codes, self.group, self.cols = unpack_layer(module.qweight, module.perm, module.bits, module.group_size)
        self.kept = codes if keep_codes else None
        self.scale0, self.zero0 = module.scales.float(), module.zeros.float()
        depth = torch.zeros(self.scale0.shape[0], device=self.scale0.device)
        depth[self.group] = module.bits[self.cols].float()
        self.rate = (2.0 ** -(depth - SCALE_RATE_BITS).clamp(min=0))[:, None]  # per group [groups, 1]
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)
        self.shift = torch.zeros_like(self.zero0, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.log_scale, self.shift]

    def weight(self, device=None, rows=None) -> torch.Tensor:
        """The dequantized table [out, in], original column order (0-bit columns are zero), computed on `device`
        (default: where the grid lives; the trained parameters stay there, their copies carry the gradient). `rows`
        (a slice or an index tensor of output rows): only those rows."""
        d = self.scale0.device if device is None else device
        r = slice(None) if rows is None else rows
        scale = self.scale0[:, r].to(d) * (self.log_scale[:, r].to(d) * self.rate.to(d)).exp()
        zero = self.zero0[:, r].to(d) + self.shift[:, r].to(d)
        m = self.module
        codes = self.kept[r] if self.kept is not None else unpack_layer(m.qweight[:, r], m.perm, m.bits,
                                                                         m.group_size)[0]
        return dequantize_unpacked(codes.to(d), self.group.to(d), self.cols.to(d), scale, zero, m.in_features)

    def big(self) -> bool:
        return blockwise.big(self.module.out_features, self.module.in_features)

    def write_back(self):
        with torch.no_grad():
            self.module.scales.copy_((self.scale0 * (self.log_scale * self.rate).exp()).half())
            self.module.zeros.copy_((self.zero0 + self.shift).half())


def _weight(g: TunableGrid, device, signs: torch.Tensor | None = None, block: int = 0, rows=None) -> torch.Tensor:
    """The layer's float weight in the original basis (a rotated layer's W R turned back into W, so that the
    layers reading one input share it instead of each keeping its own rotated copy for the backward pass)."""
    w = g.weight(device, rows)
    return unrotate(w, signs.to(device), block) if block else w


def _product(x: torch.Tensor, g: TunableGrid, signs: torch.Tensor | None = None, block: int = 0) -> torch.Tensor:
    """x @ W^T for the layer of grid g (a big table a chunk of rows at a time: xbit.blockwise.rows_product)."""
    m = g.module
    return blockwise.rows_product(x, lambda rows: _weight(g, x.device, signs, block, rows), m.out_features,
                                  m.in_features)


class Tables:
    """The expanded embedding tables of a step: each dequantized once, as a leaf that gathers the gradient of every
    lookup and head product using it (the head runs once per sequence), passed on to its grid by `backward`."""

    def __init__(self):
        self.expanded = {}

    def get(self, g: TunableGrid, device) -> torch.Tensor:
        if g not in self.expanded:
            grad = torch.is_grad_enabled()
            with torch.no_grad():
                self.expanded[g] = g.weight(device).requires_grad_(grad)
        return self.expanded[g]

    def backward(self):
        """Adds each table's gathered gradient to its grid's parameters, and forgets the tables."""
        for g, w in self.expanded.items():
            if w.grad is not None:
                with torch.enable_grad():
                    torch.autograd.backward(g.weight(w.device), w.grad)
        self.forget()

    def forget(self):
        self.expanded.clear()


def _lookup(g: TunableGrid, tables: Tables, ids: torch.Tensor) -> torch.Tensor:
    """An XbitEmbedding's lookup from its TunableGrid, scaled as the module scales it (a big table dequantizes only
    the rows it reads)."""
    if g.big():
        read, where = ids.unique(return_inverse=True)
        rows = F.embedding(where, g.weight(ids.device, read)).to(g.module.dtype_probe.dtype)
    else:
        rows = F.embedding(ids, tables.get(g, ids.device)).to(g.module.dtype_probe.dtype)
    return rows * torch.tensor(g.module.embed_scale, dtype=rows.dtype) if g.module.embed_scale != 1.0 else rows


def _differentiable_forwards(model, grids: dict, tables: Tables):
    """Instance forwards that compute every quantized layer from its TunableGrid (restored by the caller); the
    embedding tables come from `tables`."""
    patched = []
    for module in model.modules():
        if isinstance(module, XbitEmbedding) and module in grids:
            g = grids[module]
            module.forward = lambda ids, g=g: _lookup(g, tables, ids)
        elif isinstance(module, XbitTiedHead) and module.embedding in grids:
            g = grids[module.embedding]
            module.forward = lambda x, g=g: (_product(x, g) if g.big() else
                                             F.linear(x, tables.get(g, x.device).to(x.dtype)))
        elif isinstance(module, XbitLinear) and module in grids:
            # the signs unpacked afresh: the module's cached copy may come from an inference_mode pass
            signs = unpack_signs(module.rot_signs, module.in_features) if module.rotation_block else None

            def forward(x, g=grids[module], m=module, signs=signs):
                y = _product(x, g, signs, m.rotation_block)
                return y if m.bias is None else y + m.bias.to(x.dtype)
            module.forward = forward
        else:
            continue
        patched.append(module)
    return patched


def tune_grids(model, train: Teacher, held: Teacher, cost_fn, device, epochs: int = 2, lr: float = TUNE_LR,
               batch_size: int = 4, progress: bool = True, untuned_cost: float | None = None) -> dict:
    """Trains the scales and zeros of every XbitLinear/XbitEmbedding in `model` in place, against the float
    model's outputs that the teachers hold (xbit.blockwise.Teacher: `train` on the calibration sequences, `held`
    on the held-out ones that choose the epoch). One block on the device at a time. `untuned_cost`: the held-out
    cost of the model as it is, when the caller has measured it already. Returns the report: held-out cost per
    epoch (epoch 0 = untuned) and the epoch kept."""
    grids, kept = {}, 0
    for m in model.modules():
        if isinstance(m, XbitLinear):
            kept += m.in_features * m.out_features
            grids[m] = TunableGrid(m, keep_codes=kept <= KEPT_CODES_BYTES)
    params = [p for g in grids.values() for p in g.params()]
    for p in model.parameters():
        p.requires_grad_(False)
    tables = Tables()
    patched = _differentiable_forwards(model, grids, tables)
    try:
        def held_out_cost():
            with torch.no_grad():
                c = blockwise.cost(model, held.ids, held, cost_fn, device, batch_size, backward=False)
            tables.forget()
            return c

        costs = [held_out_cost() if untuned_cost is None else untuned_cost]
        best = (costs[0], [p.detach().clone() for p in params])
        opt = torch.optim.Adam(params, lr=lr)
        steps = epochs * -(-train.ids.shape[0] // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(0)
        bar = tqdm(total=steps, desc="tuning grids", disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(train.ids.shape[0], generator=gen)
            for i in range(0, order.numel(), batch_size):
                batch = train.subset(order[i : i + batch_size])
                opt.zero_grad()
                loss = blockwise.cost(model, batch.ids, batch, cost_fn, device, batch_size)
                tables.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(cost=f"{loss:.4f}")
            costs.append(held_out_cost())
            if costs[-1] >= best[0]:
                break  # an epoch that did not help: stop, keep the best so far
            best = (costs[-1], [p.detach().clone() for p in params])
        bar.close()
        with torch.no_grad():
            for p, kept in zip(params, best[1]):
                p.copy_(kept)
        for g in grids.values():
            g.write_back()
    finally:
        for m in patched:
            del m.forward
    return {"tune_costs": costs, "tune_kept_epoch": costs.index(best[0])}
