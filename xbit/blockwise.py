"""The model's cost and its gradient with one decoder block on the compute device at a time.

The learning rounds (gradient of the cost w.r.t. every layer's error gate) and the grid tuning (w.r.t. every scale
and zero) both need a backward pass through the whole network. Instead of keeping the network and its activations
on the device, `cost` runs it as a chain: the embedding (as the model computes it, recorded at block 0's input),
then each block in turn, its input kept on the host; the tail (final norm, head, cost) one sequence at a time, so
at most one sequence's [tokens x vocabulary] logits exist at once; then the blocks again in reverse, each one's
forward recomputed from its saved input and backpropagated (activation checkpointing at block granularity: the
same gradients as one autograd graph, for a second forward pass).

The teacher (`Teacher`) is the float model's final-norm hidden states on the same sequences with the float head
weight: reference logits are recomputed per sequence, never stored for all tokens, and no copy of the model is
kept.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .arch import adapter_for, logit_softcapping
from .calibrate import _block_output, block_inputs, decoder_layers, final_norm, on_device


# weights (256 MB in float32): a bigger layer's weight (a 128k-vocabulary head has 525M, SmolLM2's table 28M, a
# Llama-3-8B MLP projection 59M) is made CHUNK weights at a time
BIG_TABLE = 1 << 26
CHUNK = 1 << 24


def big(out_features: int, in_features: int) -> bool:
    """A table never expanded whole (more than BIG_TABLE weights): lookups make the rows they read, products go a
    chunk of rows at a time (rows_product)."""
    return out_features * in_features > BIG_TABLE


def rows_product(x: torch.Tensor, weight_rows, out_features: int, in_features: int) -> torch.Tensor:
    """x @ W^T, W made by weight_rows(rows) -> W[rows] (a slice of output rows; differentiable in whatever W is
    made of: error gates, grid parameters). A big W (more than BIG_TABLE weights) goes CHUNK weights' rows at a
    time, each chunk's weight made again in the backward pass instead of kept (activation checkpointing), so that
    it never exists whole: 64 MB at a time instead of several 2.1 GB copies."""
    if not big(out_features, in_features):
        return F.linear(x, weight_rows(slice(None)).to(x.dtype))
    step = max(1, CHUNK // in_features)

    def part(x, r0):
        return F.linear(x, weight_rows(slice(r0, r0 + step)).to(x.dtype))
    return torch.cat([checkpoint(part, x, r0, use_reentrant=False) if torch.is_grad_enabled() else part(x, r0)
                      for r0 in range(0, out_features, step)], dim=-1)


def _head(model):
    return model.get_submodule(adapter_for(model).head)


def _logits(model, head_fn, normed: torch.Tensor) -> torch.Tensor:
    logits = head_fn(normed)
    cap = logit_softcapping(model)
    return cap * torch.tanh(logits / cap) if cap else logits


class Teacher:
    """Reference logits of the float model on fixed sequences: their final-norm hidden states [n, T, H] (float32,
    on the host) and the float head (weight and bias as they are before any quantization)."""

    def __init__(self, model, ids: torch.Tensor, device, batch_size: int = 4, normed: torch.Tensor | None = None):
        head = _head(model)
        self.weight, self.bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        self.ids = ids
        self.normed = normed if normed is not None else final_hidden(model, ids, device, batch_size)

    def subset(self, index: torch.Tensor) -> "Teacher":
        """The teacher of sequences ids[index] (sharing the head)."""
        sub = object.__new__(Teacher)
        sub.weight, sub.bias, sub.ids, sub.normed = self.weight, self.bias, self.ids[index], self.normed[index]
        return sub

    def logits(self, model, i: int, device) -> torch.Tensor:
        """[1, T, vocab] reference logits of sequence i."""
        w = self.weight.to(device)
        b = None if self.bias is None else self.bias.to(device)
        return _logits(model, lambda x: F.linear(x, w.to(x.dtype), b), self.normed[i : i + 1].to(device))


@torch.no_grad()
def final_hidden(model, ids: torch.Tensor, device, batch_size: int = 4) -> torch.Tensor:
    """The final norm's output [n, T, H] on ids (float32, host), one block on the device at a time."""
    hidden, kwargs = block_inputs(model, ids, device, batch_size)
    for i, block in enumerate(decoder_layers(model)):
        with on_device(block, device):
            hidden = [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs[i])]
    return normed(model, hidden, device)


@torch.no_grad()
def normed(model, hidden: list[torch.Tensor], device) -> torch.Tensor:
    """The final norm of the last block's outputs (one tensor per batch) -> [n, T, H] float32 on the host."""
    with on_device(final_norm(model), device) as norm:
        return torch.cat([norm(h.to(device)).float().cpu() for h in hidden])


def cost(model, ids: torch.Tensor, teacher: Teacher, cost_fn, device, batch_size: int = 4,
         backward: bool = True, on_block=None) -> float:
    """The average of cost_fn(logits, reference logits, ids) over the sequences of `ids` (the teacher's, in the
    same order), the cost called one sequence at a time ([1, T, vocab] logits). With `backward`, its gradient
    accumulates into every leaf tensor requiring grad that the forward uses (error gates, grid parameters).
    on_block(index, block) -> callable or None: called with the block on the device before it runs (both passes);
    what it returns is called when the block leaves (e.g. removing hooks)."""
    n, layers, head = ids.shape[0], decoder_layers(model), _head(model)
    with torch.set_grad_enabled(backward):  # (an embedding with a gate or trained grid joins the graph here)
        first, kwargs = block_inputs(model, ids, device, batch_size)
    saved, hidden = [], [h.detach() for h in first]

    def visit(i, fn):
        with on_device(layers[i], device) as block:
            done = on_block(i, block) if on_block else None
            try:
                return fn(block)
            finally:
                if done:
                    done()

    with torch.no_grad():
        for i in range(len(layers)):
            if backward:
                saved.append([h.cpu() for h in hidden])  # block inputs wait on the host
            hidden = visit(i, lambda block: [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs[i])])
    total, grads = 0.0, []
    with on_device(final_norm(model), device) as norm, on_device(head, device):
        for b, h in enumerate(hidden):
            h = h.detach().requires_grad_(backward)
            for s in range(h.shape[0]):  # one sequence's logits at a time
                k = b * batch_size + s
                with torch.set_grad_enabled(backward):
                    logits = _logits(model, head, norm(h[s : s + 1]))
                    c = cost_fn(logits, teacher.logits(model, k, device).to(logits.dtype), ids[k : k + 1].to(device))
                    c = c / n
                if backward:
                    c.backward()
                total += c.item()
            grads.append(h.grad)
    if not backward:
        return total

    def back(block, i):
        for b, h in enumerate(saved[i]):
            h = h.to(device).requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.backward(_block_output(block(h, **kwargs[i][b])), grads[b])
            grads[b] = h.grad

    for i in reversed(range(len(layers))):
        visit(i, lambda block: back(block, i))
    if any(f.requires_grad for f in first):
        torch.autograd.backward([f for f in first], grads)
    return total
