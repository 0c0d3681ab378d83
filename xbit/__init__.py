"""xbit: learned mixed-precision (0-8 bits per column) quantization of language models.

`import xbit` registers the "xbit" quantization method with transformers.
"""

from . import hf  # noqa: F401  (registers the HfQuantizer)
from .format import FORMAT_VERSION
from .modules import XbitLinear

__version__ = "0.1.0"


def load(path, device: str | None = None, dtype=None):
    """Load an xbit checkpoint folder as a transformers model (float32 activations on CPU, float16 on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    return model.eval()


def __getattr__(name):
    # `xbit.quantize` is a callable module (the Python API and `python -m xbit.quantize`); imported on first use
    # so that `python -m xbit.quantize` does not find it half-imported.
    if name == "quantize":
        import importlib

        return importlib.import_module(".quantize", __name__)
    raise AttributeError(f"module 'xbit' has no attribute {name!r}")


__all__ = ["FORMAT_VERSION", "XbitLinear", "load", "quantize"]
