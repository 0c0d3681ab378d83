"""xbit: learned mixed-precision (0-8 bits per column) quantization of language models.

`import xbit` registers the "xbit" quantization method with transformers.
"""

from . import hf  # noqa: F401  (registers the HfQuantizer)
from . import quantize  # noqa: F401  (callable module: xbit.quantize(model, ...) quantizes in memory)
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


__all__ = ["FORMAT_VERSION", "XbitLinear", "load", "quantize"]
