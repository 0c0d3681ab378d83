"""Learning the inter-layer allocation against the end-to-end task cost.

Each quantizable layer l gets a gate t_l on its quantization error: y = W x + t_l * (Q - W) x. The task cost C(t)
(default: KL(original || quantized) of next-token distributions on held-out tokens) is zero at t = 0 with zero
gradient, so near the current allocation C ~ sum_l a_l * t_l^2 * E_l, where E_l is the layer's proxy error
(sum_j E[x_j^2] ||w_j - q_j||^2). Backpropagation gives g_l = dC/dt_l at t = 1, hence the sensitivity
a_l = g_l / (2 E_l). The joint Lagrangian solve (xbit.allocate) then re-allocates every column of every layer
with those weights; a few rounds of measure-gradient-resolve (a Gauss-Newton step on the budgets) keep the
allocation with the lowest measured cost. Q is what the final quantizer makes of the layer (GPTQ-compensated by
default): scoring plain rounding instead favoured allocations that compensation then made worse than uniform.
"""

import importlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import blockwise
from .arch import adapter_for


def kl_cost(logits, ref_logits, ids):
    """KL(original || quantized) per predicted token, averaged."""
    ref = ref_logits.float().log_softmax(-1)
    return F.kl_div(logits.float().log_softmax(-1), ref, log_target=True, reduction="none").sum(-1).mean()


def ce_cost(logits, ref_logits, ids):
    """Cross-entropy of the task text (the model's own next-token loss)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def resolve_cost(spec: str):
    """'kl', 'ce' or 'module:function' (a callable (logits, ref_logits, ids) -> scalar, 0 when identical; called
    with one sequence at a time, logits [1, T, vocab], and averaged over the sequences)."""
    if spec == "kl":
        return kl_cost
    if spec == "ce":
        return ce_cost
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import cost {spec}: {e}") from None
    raise ValueError(f"unknown cost {spec!r}: use kl, ce or module:function")


class ErrorGates:
    """Each layer computes with W + t_l * (Q_l - W_l), t a differentiable vector (one matmul, as the layer's own: an
    added t_l * (Q_l - W_l) x doubled the forward and backward matmuls).

    An embedding adds t_l * (Q_l - W_l)[ids] to its lookup (only the rows it reads); a head tied to an embedding
    (`tied_heads`: embedding name -> head module) shares that embedding's gate, since one table serves both.
    `scale_of(embedding)`: the factor the embedding applies to its lookups (xbit.arch), which its error gets too."""

    def __init__(self, linears: dict, deltas: dict, tied_heads: dict | None = None, scale_of=None):
        """deltas: name -> Q - W, or a function making its rows, rows -> (Q - W)[rows] (called when the layer
        first runs, with every row; the result is kept until release(), so only the layers of the block on the
        device need theirs expanded). A big table (more than blockwise.BIG_TABLE weights) is never expanded
        whole: a lookup makes the rows it reads, a product a chunk of rows at a time (blockwise.rows_product)."""
        self.t = torch.ones(len(linears), requires_grad=True)
        self.handles, self.patched, self.deltas, self.ready = [], [], deltas, {}
        self.scale_of = scale_of or (lambda embedding: 1.0)
        for i, (name, module) in enumerate(linears.items()):
            for user in [module] + ([tied_heads[name]] if tied_heads and name in tied_heads else []):
                if isinstance(user, nn.Embedding):
                    self.handles.append(user.register_forward_hook(self._lookup_hook(i, name)))
                else:
                    user.forward = self._gated_linear(i, name, user)
                    self.patched.append(user)

    def delta(self, name: str, device, rows=None) -> torch.Tensor:
        """(Q - W)[rows] of a layer (rows None: all, kept until release)."""
        d = self.deltas[name]
        if rows is not None:
            return (d(rows) if callable(d) else d[rows]).to(device)
        if name not in self.ready:
            self.ready[name] = (d(slice(None)) if callable(d) else d).to(device)
        return self.ready[name]

    def release(self, prefix: str):
        """Drops the expanded errors of the layers whose names start with prefix."""
        for name in [n for n in self.ready if n.startswith(prefix)]:
            del self.ready[name]

    def _lookup_hook(self, i, name):
        def hook(module, inputs, output):
            ids = inputs[0]
            if blockwise.big(*module.weight.shape):  # only the rows read
                read, ids = ids.unique(return_inverse=True)
                d = self.delta(name, output.device, read)
            else:
                d = self.delta(name, output.device)
            err = F.embedding(ids, d.to(output.dtype)) * torch.tensor(self.scale_of(module), dtype=output.dtype)
            return output + self.t[i].to(output.dtype) * err
        return hook

    def _gated_linear(self, i, name, module):
        def forward(x):
            big = blockwise.big(*module.weight.shape)

            def weight_rows(rows):  # W + t * (Q - W), the rows asked for
                d = self.delta(name, x.device, rows if big else None)
                return module.weight[rows].to(x.dtype) + self.t[i].to(x.dtype) * (d if big else d[rows]).to(x.dtype)
            y = blockwise.rows_product(x, weight_rows, module.out_features, module.in_features)
            return y if module.bias is None else y + module.bias.to(x.dtype)
        return forward

    def remove(self):
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m.forward


def cost_and_gradient(model, linears, deltas, teacher, cost_fn, device, batch_size: int, tied_heads=None):
    """Task cost of the model with errors `deltas` against the teacher (xbit.blockwise.Teacher), and dC/dt_l at
    t = 1 for every layer; one block on the device at a time."""
    gates = ErrorGates(linears, deltas, tied_heads, scale_of=adapter_for(model).scale_of)
    blocks = adapter_for(model).blocks
    try:
        total = blockwise.cost(model, teacher.ids, teacher, cost_fn, device, batch_size,
                               on_block=lambda i, block: lambda: gates.release(f"{blocks}.{i}."))
    finally:
        gates.remove()
    return total, gates.t.grad.detach().double()


def learn_allocation(model, problem, solve, budget, linears, teacher, cost_fn, delta_fn, device, rounds: int = 4,
                     batch_size: int = 4, progress: bool = True, initial_weights=None, tied_heads=None, start=None,
                     fee: float = 0.0):
    """Trust-region rounds of (allocate, measure cost and gradients, update sensitivities). Returns (bits, history).

    delta_fn(name, bits) -> Q - W of that layer as the final quantizer makes it (with error compensation, when
    the run compensates: the cost must score the errors the checkpoint will have), or a function making it.
    `start`: an allocation scored in round 0 instead of the solve (xbit passes the uniform one, so the result is
    never worse than uniform on the held-out cost, and the first gradient is taken where the quantizer behaves as
    measured).

    Every later round re-solves with the sensitivities measured at the best allocation so far, anchored to it:
    each byte moved is charged `fee` times the byte price (Problem.price; `fee` is the first learned round's, 0
    a free step). A round that lowers the cost is kept and halves the fee; one that does not is dropped and halves
    the distance of the fee to 1 (a smaller step from the same point). The free Gauss-Newton step overshoots where
    the proxy errors stop predicting the measured ones: on SmolLM2 at the GPTQ 2-bit size every free step was
    worse than uniform, and the step at fee 0.875 was 9% better."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = torch.ones(len(problem.names), dtype=torch.float64) if initial_weights is None else initial_weights
    best, history, proposal = None, [], weights
    for r in tqdm(range(rounds), desc="learning allocation", disable=not progress):
        from_start = r == 0 and start is not None
        if r == 0:
            bits = start if from_start else solve(problem, budget, weights)
        else:
            bits = solve(problem, budget, proposal, anchor=best[1], fee=fee)
        deltas = {n: delta_fn(n, bits[n]) for n in problem.names}
        cost, grad = cost_and_gradient(model, linears, deltas, teacher, cost_fn, device, batch_size, tied_heads)
        moved = 0 if r == 0 else sum((bits[n] != best[1][n]).sum().item() for n in problem.names)
        history.append({"round": r, "allocation": "start" if from_start else "learned", "cost": cost,
                        "fee": None if r == 0 else fee, "moved": moved / problem.err.shape[0],
                        "bytes": problem.exact_bytes(torch.cat(list(bits.values())))})
        if best is not None and cost >= best[0]:
            fee = (1 + fee) / 2
            continue
        if r > 0:
            fee = fee / 2
        weights = proposal
        best = (cost, bits, weights.clone())
        proxy = torch.tensor([problem.err[problem.layer_of == i].gather(1, bits[n].long()[:, None].cpu()).sum().item()
                              for i, n in enumerate(problem.names)], dtype=torch.float64)
        sens = (grad / (2 * proxy.clamp(min=1e-30))).clamp(min=0)
        floor = sens[sens > 0].median() * 1e-3 if (sens > 0).any() else 1.0
        sens = sens.clamp(min=floor)
        # the measured sensitivities replace the weights, damped: geometric mean with the previous ones
        proposal = (weights * sens * (weights.mean() / sens.mean())).sqrt()
    sensitivities = dict(zip(problem.names, best[2].tolist()))
    return best[1], {"rounds": history, "best_cost": best[0], "sensitivities": sensitivities}
