"""Calibration: real text through the model one decoder block at a time, collecting E[x x^T] per linear input.

Only one decoder block sits on the compute device at a time; the rest of the model stays where it was loaded
(CPU, or offloaded by accelerate). Each block's outputs, computed with the block already quantized, become the
next block's inputs, as in GPTQ.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) joins the process group first:
    NCCL when CUDA is there, gloo on CPU. Calibration batches are then split across the processes and the
    statistics summed, so every process quantizes with the statistics of all of them."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(*tensors: torch.Tensor):
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def _shard(ids: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size > 1 and ids.shape[0] < size:
        raise ValueError(f"{ids.shape[0]} calibration samples cannot be split over {size} processes")
    return ids[rank::size]


def calibration_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens drawn at random (seeded) from the joined calibration texts."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need more than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def decoder_layers_path(model) -> str:
    for path in BLOCK_PATHS:
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise ValueError("cannot find the decoder blocks of this model (looked for model.layers and friends)")


def decoder_layers(model) -> nn.ModuleList:
    return model.get_submodule(decoder_layers_path(model))


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0 and records what the model feeds it."""

    def __init__(self, block):
        super().__init__()
        self.block, self.inputs, self.kwargs = block, [], []

    def forward(self, hidden, *args, **kwargs):
        self.inputs.append(hidden.detach())
        dropped = ("past_key_values", "past_key_value", "use_cache")
        self.kwargs.append({k: v for k, v in kwargs.items() if k not in dropped})
        raise _Stop


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, device, batch_size: int = 8):
    """Hidden states entering block 0 for each calibration batch, and the keyword arguments of each batch."""
    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    for child in parent.children():  # embeddings and rotary tables go to the compute device; blocks stay home
        if child is not layers:
            child.to(device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(ids[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = catcher.block
    return catcher.inputs, catcher.kwargs


class HessianHook:
    """Accumulates sum over tokens of x x^T for one linear (only its diagonal, sum x_j^2, when diag_only).

    Hooks given the same `shared` dict compute the product once for linears that read the same input tensor
    (q/k/v, gate/up): the last input and its product are kept there and reused while the input is that tensor.
    """

    def __init__(self, module: nn.Linear, diag_only: bool = False, shared: dict | None = None):
        k, dev = module.in_features, module.weight.device
        self.diag_only = diag_only
        self.h = torch.zeros(k, dtype=torch.float32, device=dev) if diag_only else torch.zeros(k, k, device=dev)
        self.tokens = 0
        self.shared = {} if shared is None else shared
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0].detach()
        if self.shared.get("x") is not x:
            flat = x.reshape(-1, x.shape[-1]).float()
            self.shared.update(x=x, sum=flat.pow(2).sum(0) if self.diag_only else flat.t() @ flat, n=flat.shape[0])
        self.h += self.shared["sum"]
        self.tokens += self.shared["n"]

    def mean(self) -> torch.Tensor:
        """E[x x^T] [in, in], or only its diagonal E[x_j^2] [in] when diag_only (over all processes)."""
        self.handle.remove()
        self.shared.clear()
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.h.device)
        _sum_over_processes(self.h, tokens)
        return self.h / tokens.clamp(min=1).item()


@torch.no_grad()
def run_blocks(model, ids: torch.Tensor, device, quantize_block, batch_size: int = 8, progress: bool = True,
               diag_only: bool = False):
    """Calls quantize_block(index, block, {linear name: E[x x^T]}) for every decoder block in order.

    `quantize_block` replaces the block's linears (in place); the block is then rerun to feed the next one.
    Returns the hidden states leaving the last block (one tensor per calibration batch of this process).
    """
    layers = decoder_layers(model)
    hidden, kwargs = block_inputs(model, _shard(ids), device, batch_size)  # this process's share of the batches
    for i in tqdm(range(len(layers)), desc="blocks", disable=not progress or world()[0] != 0):
        block = layers[i]
        home = next(block.parameters()).device
        block.to(device)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        shared = {}
        hooks = {n: HessianHook(m, diag_only, shared) for n, m in linears.items()}
        for h, kw in zip(hidden, kwargs):
            block(h, **kw)
        quantize_block(i, block, {n: hook.mean() for n, hook in hooks.items()})
        hidden = [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]
        block.to(home)
    return hidden


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm")


def final_norm(model) -> nn.Module:
    """The normalisation between the last decoder block and the output head."""
    parent = decoder_layers_path(model).rpartition(".")[0]
    base = model.get_submodule(parent) if parent else model
    for name in FINAL_NORMS:
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError("cannot find the final norm before the output head (looked for model.norm and friends); "
                     "keep the embeddings in float with --float-embeddings")


@torch.no_grad()
def head_hessian(model, hidden: list[torch.Tensor], device) -> torch.Tensor:
    """E[x x^T] of the output head's input: the final norm of the hidden states that run_blocks returned."""
    norm = final_norm(model)
    home = next(norm.parameters(), torch.empty(0)).device
    norm.to(device)
    h, tokens = 0.0, 0
    for x in hidden:
        y = norm(x.to(device)).reshape(-1, x.shape[-1]).float()
        h = h + y.t() @ y
        tokens += y.shape[0]
    norm.to(home)
    total = torch.tensor([float(tokens)], dtype=torch.float64, device=h.device)
    _sum_over_processes(h, total)
    return h / total.clamp(min=1).item()
