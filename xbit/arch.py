"""Architecture adapters: one declarative entry per model family saying where xbit finds what it needs.

Everything architecture-specific lives in ADAPTERS: the decoder blocks, the final norm, the input embedding
(and whether it scales its lookups, as Gemma's does), the output head, fused MoE experts (split into one small
MLP of nn.Linear per expert, so every expert is an ordinary quantization candidate with its own statistics) and
the linears inside a block that stay in float (MoE routers). The rest of xbit asks `adapter_for(model)`.

Quantization candidates: every nn.Linear inside the decoder blocks (routers excepted), plus, for xbit, the input
embedding and the output head (one candidate when they share one table). Anything outside the blocks (a vision
tower, a projector) stays as it is.
"""

from dataclasses import dataclass

from torch import nn


class UnsupportedModel(ValueError):
    """A model xbit has no adapter for; the message names what is missing."""


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: str  # the decoder blocks' nn.ModuleList
    final_norm: str  # the norm between the last block and the head
    embedding: str  # the input embedding table
    head: str = "lm_head"
    embed_scale: bool = False  # the embedding multiplies every lookup by its `embed_scale` (Gemma)
    experts: str | None = None  # fused experts module inside a block, split into LinearExperts (xbit.moe)
    keep_float: tuple[str, ...] = ()  # linears inside a block (names relative to it) never quantized

    def scale_of(self, embedding: nn.Module) -> float:
        """The factor the embedding applies to its lookups (1 for most families)."""
        return float(embedding.embed_scale) if self.embed_scale else 1.0


_LLAMA_LIKE = dict(blocks="model.layers", final_norm="model.norm", embedding="model.embed_tokens")
_GEMMA3_MM = dict(blocks="model.language_model.layers", final_norm="model.language_model.norm",
                  embedding="model.language_model.embed_tokens")

# keyed by config.model_type
ADAPTERS = {
    "llama": Adapter("Llama", **_LLAMA_LIKE),
    "qwen2": Adapter("Qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("Qwen3", **_LLAMA_LIKE),
    "mistral": Adapter("Mistral", **_LLAMA_LIKE),
    "phi3": Adapter("Phi-3", **_LLAMA_LIKE),
    "gemma": Adapter("Gemma", **_LLAMA_LIKE, embed_scale=True),
    "gemma2": Adapter("Gemma-2", **_LLAMA_LIKE, embed_scale=True),
    "gemma3_text": Adapter("Gemma-3", **_LLAMA_LIKE, embed_scale=True),
    "gemma3": Adapter("Gemma-3 multimodal (language model)", **_GEMMA3_MM, embed_scale=True),
    "mixtral": Adapter("Mixtral", **_LLAMA_LIKE, experts="mlp.experts", keep_float=("mlp.gate",)),
}


def _find(model, path: str, kind) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, kind) else None


def adapter_for(model) -> Adapter:
    """The family's adapter, checked against the model; an unknown family that is laid out like Llama (the
    common transformers layout) gets a generic adapter. Raises UnsupportedModel naming what is missing."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type) or Adapter(f"{model_type} (generic Llama-like layout)", **_LLAMA_LIKE)
    checks = [("decoder blocks", adapter.blocks, nn.ModuleList), ("final norm", adapter.final_norm, nn.Module),
              ("input embedding", adapter.embedding, nn.Module)]
    missing = [f"{what} at {path}" for what, path, kind in checks if _find(model, path, kind) is None]
    if missing:
        known = ", ".join(sorted(ADAPTERS))
        raise UnsupportedModel(f"model_type {model_type!r} is not supported by xbit (adapters: {known}); "
                               f"it has no {', no '.join(missing)}")
    return adapter


def decoder_blocks(model) -> nn.ModuleList:
    return model.get_submodule(adapter_for(model).blocks)


def block_linears(model, adapter: Adapter | None = None) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full name, except the adapter's keep_float ones."""
    adapter = adapter or adapter_for(model)
    out = {}
    for i, block in enumerate(model.get_submodule(adapter.blocks)):
        for local, m in block.named_modules():
            if isinstance(m, nn.Linear) and not any(local == k or local.startswith(k + ".")
                                                    for k in adapter.keep_float):
                out[f"{adapter.blocks}.{i}.{local}"] = m
    return out


def embedding_and_head(model, adapter: Adapter | None = None) -> tuple[dict, dict]:
    """The input embedding table and the output head as candidates: ({name: module}, tied), where tied maps the
    head's name to the embedding's when they share one table (then one candidate, stored once)."""
    adapter = adapter or adapter_for(model)
    emb = _find(model, adapter.embedding, nn.Embedding)
    head = _find(model, adapter.head, nn.Linear)
    out, tied = {}, {}
    if emb is not None:
        out[adapter.embedding] = emb
    if head is not None:
        if emb is not None and head.weight is emb.weight:
            tied[adapter.head] = adapter.embedding
        else:
            out[adapter.head] = head
    return out, tied


def split_experts(model, adapter: Adapter | None = None, empty: bool = False) -> bool:
    """Replace each block's fused experts by LinearExperts (same function, one nn.Linear per projection and
    expert). `empty`: shapes only (before a checkpoint's tensors load). Returns whether anything was split."""
    from .moe import LinearExperts

    adapter = adapter or adapter_for(model)
    if adapter.experts is None:
        return False
    done = False
    for block in model.get_submodule(adapter.blocks):
        fused = block.get_submodule(adapter.experts)
        if not isinstance(fused, LinearExperts):
            parent, _, child = adapter.experts.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, LinearExperts.from_fused(fused, empty))
            done = True
    return done


def logit_softcapping(model) -> float | None:
    """The cap c of logits -> c * tanh(logits / c) that some families' forward applies after the head (Gemma-2)."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return cap
