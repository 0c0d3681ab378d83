"""Calibration: real text through the model one decoder block at a time, collecting E[x x^T] per linear input.

Only one decoder block sits on the compute device at a time, computing in float32 (`on_device`); the rest of the
model stays where it was loaded (CPU, or offloaded by accelerate), the blocks in their stored dtype. Each block's
outputs, computed with the block already quantized, become the next block's inputs, as in GPTQ.
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import adapter_for
from . import dispatch
from .modules import XbitLinear
from .rotation import rotate


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


def decoder_layers_path(model) -> str:
    return adapter_for(model).blocks


def decoder_layers(model) -> nn.ModuleList:
    return model.get_submodule(decoder_layers_path(model))


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for one decoder block and records what the model feeds it: the hidden states (block 0 only) and
    the keyword arguments, which differ per block in some families (Gemma's sliding and global attention layers
    get their own masks and rotary tables). Passes the hidden states on unchanged; the last one stops the model."""

    DROPPED = ("past_key_values", "past_key_value", "cache", "use_cache")

    def __init__(self, index: int, last: bool, inputs: list, kwargs: list):
        super().__init__()
        self.index, self.last, self.inputs, self.kwargs = index, last, inputs, kwargs

    def forward(self, hidden, *args, **kwargs):
        if self.index == 0:
            self.inputs.append(hidden if torch.is_grad_enabled() else hidden.detach())
        self.kwargs[self.index].append({k: v for k, v in kwargs.items() if k not in self.DROPPED})
        if self.last:
            raise _Stop
        return hidden


COMPUTE_DTYPE = torch.float32  # every phase computes in float32, whatever the model's stored dtype


def float_outside_blocks(model):
    """Every parameter outside the decoder blocks in float32 (embedding lookups, column errors, the teacher's head
    and logits at full precision; small next to the blocks). The blocks keep the dtype they were loaded in (bf16 or
    fp16 checkpoints stay half the host memory of float32) and compute in float32 one at a time (on_device)."""
    inside = {id(p) for p in decoder_layers(model).parameters()}
    for p in model.parameters():
        if id(p) not in inside and p.is_floating_point():
            p.data = p.data.to(COMPUTE_DTYPE)


@contextmanager
def on_device(module: nn.Module, device, dtype: torch.dtype | None = COMPUTE_DTYPE):
    """The module on the compute device with its floating-point parameters in `dtype` (None: as stored), while
    inside. On leaving, each parameter goes back to its device in its stored dtype (exact: a bf16 value round-trips
    through float32), and what was added meanwhile (quantized layers) goes to the module's home device as it is."""
    stored = {id(p): (p.device, p.dtype) for p in module.parameters()}
    home = next(module.parameters(), next(module.buffers(), torch.empty(0))).device
    for p in module.parameters():
        p.data = p.data.to(device, dtype if dtype and p.is_floating_point() else p.dtype)
    module.to(device)  # (buffers)
    try:
        yield module
    finally:
        for p in module.parameters():
            if id(p) in stored:
                p.data = p.data.to(*stored[id(p)])
        module.to(home)


def block_inputs(model, ids: torch.Tensor, device, batch_size: int = 8):
    """Hidden states entering block 0 for each calibration batch, and for every block the keyword arguments it
    gets for each batch ([block][batch]). Under grad mode the hidden states keep their graph (xbit.blockwise
    backpropagates into the embedding through them)."""
    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    for child in parent.children():  # embeddings and rotary tables go to the compute device; blocks stay home
        if child is not layers:
            child.to(device)
    blocks = list(layers)
    inputs, kwargs = [], [[] for _ in blocks]
    for i in range(len(blocks)):
        layers[i] = _Recorder(i, i == len(blocks) - 1, inputs, kwargs)
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(ids[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    return inputs, kwargs


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
        self.total = tokens.item()  # tokens seen over all processes
        return self.h / max(self.total, 1.0)


EXPERT_PRIOR_TOKENS = 256  # pseudo-tokens of the sibling experts' statistics mixed into each expert's own


def pool_experts(means: dict, tokens: dict) -> dict:
    """E[x x^T] of MoE experts shrunk towards their siblings' (the same projection of the block's other experts):
    (n H + n0 H_siblings) / (n + n0), n0 = EXPERT_PRIOR_TOKENS. An expert the router sent few or no calibration
    tokens thus gets the statistics of the inputs experts do see instead of zeros (which would give its columns
    0 bits, or a singular GPTQ Hessian); one that saw many tokens keeps its own. Other layers pass unchanged."""
    groups = {}
    for name in means:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
            groups.setdefault((*parts[:-2], parts[-1]), []).append(name)
    out = dict(means)
    for names in groups.values():
        total = sum(tokens[n] for n in names)
        if total == 0:
            continue
        pooled = sum(means[n] * tokens[n] for n in names) / total
        for n in names:
            out[n] = (means[n] * tokens[n] + pooled * EXPERT_PRIOR_TOKENS) / (tokens[n] + EXPERT_PRIOR_TOKENS)
    return out


@torch.no_grad()
def run_blocks(model, ids: torch.Tensor, device, quantize_block, batch_size: int = 8, progress: bool = True,
               diag_only: bool = False, read_only: bool = False):
    """Calls quantize_block(index, block, {linear name: E[x x^T]}) for every decoder block in order.

    `quantize_block` replaces the block's linears (in place); the block is then rerun to feed the next one. With
    `read_only` (it only reads the statistics, as the measurement does) the outputs of the pass that collected them
    feed the next block instead. Returns the hidden states leaving the last block (one tensor per calibration batch
    of this process).
    """
    layers = decoder_layers(model)
    hidden, kwargs = block_inputs(model, _shard(ids), device, batch_size)  # this process's share of the batches
    for i in tqdm(range(len(layers)), desc="blocks", disable=not progress or world()[0] != 0):
        block = layers[i]
        with on_device(block, device):
            linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            shared = {}
            hooks = {n: HessianHook(m, diag_only, shared) for n, m in linears.items()}
            outputs = []
            for h, kw in zip(hidden, kwargs[i]):
                y = _block_output(block(h, **kw))
                if read_only:
                    outputs.append(y)
            quantize_block(i, block, pool_experts({n: hook.mean() for n, hook in hooks.items()},
                                                  {n: hook.total for n, hook in hooks.items()}))
            if not read_only:
                with dense_xbit_layers(block):
                    outputs = [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs[i])]
            hidden = outputs
    return hidden


@contextmanager
def dense_xbit_layers(block):
    """While the block reruns on the calibration batches, its XbitLinear layers multiply by their dequantized weight
    (the reference math, expanded once per layer) instead of running the packed kernel per batch: the same numbers
    as the GPTQ reference's fake-quantized weights, at dense speed on thousands of tokens."""
    patched = []
    for m in block.modules():
        if isinstance(m, XbitLinear):
            w = dispatch.dequantize(m)

            def forward(x, m=m, w=w):
                if m.rotation_block:
                    x = rotate(x, m.signs(), m.rotation_block)
                return F.linear(x, w.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))
            m.forward = forward
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def final_norm(model) -> nn.Module:
    """The normalisation between the last decoder block and the output head."""
    return model.get_submodule(adapter_for(model).final_norm)


@torch.no_grad()
def head_hessian(model, hidden: list[torch.Tensor], device) -> torch.Tensor:
    """E[x x^T] of the output head's input: the final norm of the hidden states that run_blocks returned."""
    h, tokens = 0.0, 0
    with on_device(final_norm(model), device) as norm:
        for x in hidden:
            y = norm(x.to(device)).reshape(-1, x.shape[-1]).float()
            h = h + y.t() @ y
            tokens += y.shape[0]
    total = torch.tensor([float(tokens)], dtype=torch.float64, device=h.device)
    _sum_over_processes(h, total)
    return h / total.clamp(min=1).item()
