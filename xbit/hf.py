"""Transformers integration: `import xbit` registers the "xbit" quantization config and HfQuantizer, so
`AutoModelForCausalLM.from_pretrained(dir)` builds XbitLinear modules and loads the packed tensors."""

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checkpoint
from .arch import split_experts
from .format import FORMAT_VERSION
from .modules import XbitEmbedding, XbitLinear, XbitTiedHead


def set_submodule(model, name: str, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def layer_spec(m: XbitLinear) -> dict:
    spec = {"in": m.in_features, "out": m.out_features, "counts": m.counts, "group_size": m.group_size,
            "bias": m.bias is not None}
    if m.rotation_block:
        spec["rotation_block"] = m.rotation_block
    if isinstance(m, XbitEmbedding):
        spec["kind"] = "embedding"
        if m.embed_scale != 1.0:
            spec["embed_scale"] = m.embed_scale
    return spec


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise checkpoint.CheckpointError(f"quantization_config names {name}, which this model does not have "
                                         f"({type(model).__name__})") from None


def _build(name: str, old, spec: dict):
    """The empty xbit module that replaces `old` before the packed tensors load."""
    if spec.get("kind") == "embedding":
        if not isinstance(old, torch.nn.Embedding) or tuple(old.weight.shape) != (spec["out"], spec["in"]):
            raise checkpoint.CheckpointError(f"embedding {name} in quantization_config does not match the model")
        return XbitEmbedding(spec["out"], spec["in"], spec["counts"], spec["group_size"], dtype=old.weight.dtype,
                             device=old.weight.device, embed_scale=spec.get("embed_scale", 1.0))
    if not isinstance(old, torch.nn.Linear) or (old.in_features, old.out_features) != (spec["in"], spec["out"]):
        raise checkpoint.CheckpointError(f"layer {name} in quantization_config does not match the model")
    return XbitLinear(spec["in"], spec["out"], spec["counts"], spec["group_size"], bias=spec.get("bias", False),
                      dtype=old.weight.dtype, device=old.weight.device, rotation_block=spec.get("rotation_block", 0))


@register_quantization_config("xbit")
class XbitConfig(QuantizationConfigMixin):
    """quant_method "xbit": per-layer column counts per bit depth fix every tensor shape before loading."""

    def __init__(self, format_version: int = FORMAT_VERSION, layers: dict | None = None, method: str = "xbit",
                 **kwargs):
        self.quant_method = "xbit"
        self.format_version = format_version
        self.layers = layers or {}
        self.method = method
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@register_quantizer("xbit")
class XbitHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-quantized checkpoints load; quantize with `python -m xbit.quantize`

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        checkpoint.check_version(cfg.to_dict())
        if getattr(cfg, "split_experts", False):  # the checkpoint holds one linear per expert (xbit.moe)
            split_experts(model, empty=True)
        if not isinstance(cfg.layers, dict):
            raise checkpoint.CheckpointError("quantization_config: layers is not a JSON object")
        for name, spec in cfg.layers.items():
            checkpoint.check_spec(name, spec)
            set_submodule(model, name, _build(name, _submodule(model, name), spec))
        for head, table in (getattr(cfg, "tied", None) or {}).items():  # one stored table serves both
            emb = _submodule(model, table)
            if not isinstance(emb, XbitEmbedding):
                raise checkpoint.CheckpointError(f"{head} is tied to {table}, which is not a quantized embedding")
            set_submodule(model, head, XbitTiedHead(emb))
        expected = {k: (tuple(v.shape), None) for k, v in model.state_dict().items()}
        expected.update(checkpoint.expected_xbit_tensors(cfg.layers))
        tied = set()
        if getattr(model.config, "tie_word_embeddings", False):
            tied = {k for k in expected if k.startswith("lm_head.")}
        self._files = checkpoint.validate(checkpoint_files, {k: v for k, v in expected.items() if k not in tied})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # the headers said nothing about the values: out-of-range bits or perm entries would fail (or read outside
        # a buffer) at the first forward, non-finite scales give NaN logits silently
        checkpoint.check_model_values(model, getattr(self, "_files", None))
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False
