"""Mixture-of-experts: fused expert tensors split into one small MLP of nn.Linear per expert.

transformers stores a Mixtral-style block's experts as two 3-D parameters (gate_up_proj [E, 2I, H], the gate rows
first, and down_proj [E, H, I]). Split, every expert's projections are ordinary linears: each gets its own
calibration statistics, bit allocation and XbitLinear, and the checkpoint names them
`...experts.{e}.gate_proj` / `up_proj` / `down_proj`.
"""

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act_fn, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block; forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) as
    transformers' fused experts module computes it: each token through its k experts, weighted and summed."""

    @classmethod
    def from_fused(cls, fused: nn.Module, empty: bool = False) -> "LinearExperts":
        gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
        fits = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
                and down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2])
        if not fits or hasattr(fused, "gate_up_proj_bias"):
            raise ValueError(f"{type(fused).__name__}: xbit splits experts stored as gate_up_proj [E, 2I, H] and "
                             "down_proj [E, H, I] only")
        experts, inter2, hidden = gate_up.shape
        inter = inter2 // 2
        device = "meta" if empty else gate_up.device
        out = cls(ExpertMLP(hidden, inter, fused.act_fn, gate_up.dtype, device) for _ in range(experts))
        if not empty:
            with torch.no_grad():
                for e, mlp in enumerate(out):
                    mlp.gate_proj.weight.copy_(gate_up[e, :inter])
                    mlp.up_proj.weight.copy_(gate_up[e, inter:])
                    mlp.down_proj.weight.copy_(down[e])
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out
