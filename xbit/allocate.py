"""Bit allocation: per-column bit depths inside each weight, and the budgets across weights.

Intra-layer model (DESIGN.md): the output error of a layer is sum_j E[x_j^2] * ||w_j - q_j||^2. For every column
and every depth 0..8 the real quantization error is measured (`column_errors`). Across layers each layer's error
is weighted by a sensitivity a_l, learned from the gradient of the end-to-end cost (see xbit.learn). With those
weights the whole allocation is one Lagrangian problem: every column picks the depth minimising
a_l * err_j(b) + lam * bits_j(b), and `lam` is bisected until the exact checkpoint bytes meet the budget.
"""

import torch

from .format import MAX_BITS, layer_bytes
from .grid import round_to_grid

SCALE_ZERO_BITS = 32  # float16 scale + float16 zero per row per group


ERROR_CHUNK_ELEMENTS = 1 << 22  # weights per batched grid fit (the mse fit holds 21 candidates of each)


def column_errors(weight: torch.Tensor, h_diag: torch.Tensor, group_size: int, grid: str = "minmax",
                  device=None) -> torch.Tensor:
    """err [in, 9]: E[x_j^2] * ||w_j - q_b(w_j)||^2 for b = 0..8, groups of consecutive original columns.

    Every (row, group) pair is one independent grid fit, so the whole-group part of the table is fitted as one
    batch of rows [out * groups, group_size], in chunks of ERROR_CHUNK_ELEMENTS weights (a 262k-row embedding
    table needs no more memory than a small layer); a partial last group is a second batch. The chunks are
    computed on `device` (default: the weight's), the table [in, 9] is returned there."""
    device = weight.device if device is None else torch.device(device)
    w = weight.detach()
    out, k = w.shape
    err = torch.empty(k, MAX_BITS + 1, device=device)
    err[:, 0] = sum(r.to(device).float().pow(2).sum(0) for r in w.split(max(1, ERROR_CHUNK_ELEMENTS // k)))
    whole = k - k % group_size
    parts = [(w[:, :whole].reshape(-1, group_size), slice(0, whole))] if whole else []
    if whole < k:
        parts.append((w[:, whole:], slice(whole, k)))
    for rows, cols in parts:
        step = max(1, ERROR_CHUNK_ELEMENTS // rows.shape[1])
        for b in range(1, MAX_BITS + 1):
            chunks = (r.to(device).float() for r in rows.split(step))
            sq = torch.cat([(c - round_to_grid(c, b, grid)).pow(2) for c in chunks])
            err[cols, b] = sq.reshape(out, -1).sum(0)
    return err * h_diag.to(device).float().clamp(min=0)[:, None]



def column_bit_cost(out_features: int, group_size: int) -> torch.Tensor:
    """Approximate stored bits of one column at depth b (codes plus its share of the group's scale and zero)."""
    b = torch.arange(MAX_BITS + 1, dtype=torch.float64)
    return out_features * (b + (b > 0) * SCALE_ZERO_BITS / group_size)


class Problem:
    """All candidate columns of all layers, ready for a joint Lagrangian solve."""

    def __init__(self, layers: dict, group_size: int, allowed=range(MAX_BITS + 1)):
        # layers: name -> (err [in, 9] on CPU, out_features)
        self.names = list(layers)
        self.group_size = group_size
        self.shapes = {n: (layers[n][1], layers[n][0].shape[0]) for n in self.names}
        self.err = torch.cat([layers[n][0].double().cpu() for n in self.names])
        self.cost = torch.cat([column_bit_cost(layers[n][1], group_size).expand(layers[n][0].shape[0], -1)
                               for n in self.names])
        self.layer_of = torch.cat([torch.full((layers[n][0].shape[0],), i) for i, n in enumerate(self.names)])
        self.mask = torch.full((MAX_BITS + 1,), float("inf"), dtype=torch.float64)
        self.mask[list(allowed)] = 0.0

    def price(self, anchor: torch.Tensor | None = None, fee: float = 0.0) -> torch.Tensor:
        """cost, plus `fee` times every byte a column moves away from `anchor` (flat depths), so at a given lam an
        upgrade must gain (1 + fee) times its price and a downgrade frees only (1 - fee) of it. fee 0 is the free
        solve; at fee >= 1 no column leaves its anchor (the learning's trust region)."""
        if anchor is None or fee <= 0:
            return self.cost
        return self.cost + fee * (self.cost - self.cost.gather(1, anchor.long()[:, None])).abs()

    def choose(self, lam: float, weights: torch.Tensor, price: torch.Tensor | None = None) -> torch.Tensor:
        """Per-column depth minimising a_l * err + lam * price (default: cost; ties go to fewer bits)."""
        price = self.cost if price is None else price
        obj = self.err * weights[self.layer_of][:, None] + lam * price + self.mask
        return obj.argmin(dim=1)

    def split(self, bits: torch.Tensor) -> dict:
        out, i = {}, 0
        for n in self.names:
            k = self.shapes[n][1]
            out[n] = bits[i : i + k].to(torch.uint8)
            i += k
        return out

    def exact_bytes(self, bits: torch.Tensor) -> int:
        total = 0
        for n, b in self.split(bits).items():
            out, k = self.shapes[n]
            total += layer_bytes(out, k, torch.bincount(b.long(), minlength=MAX_BITS + 1).tolist(), self.group_size)
        return total


def solve(problem: Problem, budget_bytes: int, weights: torch.Tensor | None = None, iters: int = 60,
          anchor: dict | None = None, fee: float = 0.0) -> dict:
    """Per-column depths of every layer with exact stored bytes <= budget_bytes, as close to it as lam allows.

    Bisection on lam in log space; the result is then filled greedily, one column upgrade at a time by the best
    error drop per byte, while it still fits (so the result lands just under the budget). `anchor` (depths per
    layer) and `fee`: moves away from the anchor cost extra (Problem.price), so the result stays near it.
    """
    weights = torch.ones(len(problem.names), dtype=torch.float64) if weights is None else weights.double()
    flat_anchor = None if anchor is None else torch.cat([anchor[n].long().cpu() for n in problem.names])
    if flat_anchor is not None and fee >= 1 and problem.exact_bytes(flat_anchor) <= budget_bytes:
        return problem.split(flat_anchor)  # no move can pay its fee
    price = problem.price(flat_anchor, fee)  # (once: it does not depend on lam)
    lo, hi = 1e-30, 1e30
    best = problem.choose(hi, weights)
    if problem.exact_bytes(best) > budget_bytes:
        raise ValueError(f"budget of {budget_bytes} bytes is below the smallest allocation "
                         f"({problem.exact_bytes(best)} bytes)")
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        bits = problem.choose(mid, weights, price)
        if problem.exact_bytes(bits) <= budget_bytes:
            best, hi = bits, mid
        else:
            lo = mid
    return problem.split(_fill(problem, best, budget_bytes, weights))


def _fill(problem: Problem, bits: torch.Tensor, budget: int, weights: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Spend the bytes left under the budget: single-step upgrades in order of error drop per bit, each taken
    if the exact bytes of its layer (padding and groups included) still fit."""
    bits = bits.clone()
    counts = {n: torch.bincount(b.long(), minlength=MAX_BITS + 1).tolist() for n, b in problem.split(bits).items()}
    layer_size = {n: layer_bytes(*problem.shapes[n], counts[n], problem.group_size) for n in problem.names}
    slack = budget - sum(layer_size.values())
    rows = torch.arange(bits.numel())
    for _ in range(passes):
        up = (bits + 1).clamp(max=MAX_BITS)
        gain = (problem.err[rows, bits] - problem.err[rows, up]) * weights[problem.layer_of]
        extra = problem.cost[rows, up] - problem.cost[rows, bits]
        ok = (up > bits) & (problem.mask[up] == 0) & (gain > 0) & (extra <= slack * 8 + 1e-9)
        cand = ok.nonzero().flatten()
        cand = cand[torch.argsort(gain[cand] / extra[cand], descending=True)].tolist()
        changed = False
        for j in cand:
            name = problem.names[int(problem.layer_of[j])]
            c = counts[name]
            b = int(bits[j])
            c[b] -= 1
            c[b + 1] += 1
            new = layer_bytes(*problem.shapes[name], c, problem.group_size)
            if new - layer_size[name] <= slack:
                slack -= new - layer_size[name]
                layer_size[name] = new
                bits[j] = b + 1
                changed = True
            else:
                c[b] += 1
                c[b + 1] -= 1
        if not changed:
            break
    return bits


def uniform_fraction(problem: Problem, budget_bytes: int, h_diags: dict) -> dict:
    """The ablation: every column of every layer at the same depth, the fraction that fits at depth+1 given to
    the columns with the largest E[x_j^2] (act order), with the same exact-bytes budget."""
    for b in range(MAX_BITS, -1, -1):
        bits = torch.full((problem.err.shape[0],), b, dtype=torch.long)
        if problem.exact_bytes(bits) <= budget_bytes:
            break
    if b == MAX_BITS:
        return problem.split(bits)
    h = torch.cat([h_diags[n].double().cpu() / h_diags[n].double().mean().clamp(min=1e-30) for n in problem.names])
    order = torch.argsort(h, descending=True)
    lo, hi = 0, order.numel()
    while lo < hi:  # largest count of upgraded columns that fits
        mid = (lo + hi + 1) // 2
        trial = bits.clone()
        trial[order[:mid]] = b + 1
        if problem.exact_bytes(trial) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    bits[order[:lo]] = b + 1
    return problem.split(bits)
