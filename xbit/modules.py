"""XbitLinear: a quantized nn.Linear stored in the x-bit format; its forward goes through `xbit.dispatch`.
XbitEmbedding and XbitTiedHead: the same format for embedding tables (and a head tied to one)."""

import torch
from torch import nn

from . import dispatch
from .format import layer_shapes
from .rotation import unpack_signs


def _counts(bits: torch.Tensor) -> list[int]:
    """Columns per bit depth 0..8."""
    return torch.bincount(bits.long(), minlength=9).tolist()


class XbitLinear(nn.Module):
    """rotation_block > 0: the weight is stored in a rotated basis (xbit.rotation) and the input is rotated first."""

    def __init__(self, in_features: int, out_features: int, counts: list[int], group_size: int, bias: bool = False,
                 dtype=torch.float16, device=None, rotation_block: int = 0):
        super().__init__()
        if len(counts) != 9 or sum(counts) != in_features:
            raise ValueError(f"counts must give 9 column counts summing to in_features={in_features}, got {counts}")
        if rotation_block and (in_features % rotation_block or rotation_block & (rotation_block - 1)):
            raise ValueError(f"rotation block {rotation_block} must be a power of two dividing {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.counts, self.group_size, self.rotation_block = list(counts), group_size, rotation_block
        self._signs = (None, None)  # (key of rot_signs, its +-1 floats): unpacked on first use
        for name, (shape, tdtype) in layer_shapes(out_features, in_features, counts, group_size,
                                                  rotation_block).items():
            self.register_buffer(name, torch.zeros(shape, dtype=tdtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_tensors(cls, tensors: dict, bias: torch.Tensor | None, group_size: int,
                     rotation_block: int = 0) -> "XbitLinear":
        bits = tensors["bits"]
        dtype = bias.dtype if bias is not None else torch.float16
        m = cls(bits.numel(), tensors["scales"].shape[1], _counts(bits), group_size, bias=bias is not None,
                dtype=dtype, device=bits.device, rotation_block=rotation_block)
        m._copy_tensors(tensors)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def _copy_tensors(self, tensors: dict):
        for name, t in tensors.items():
            getattr(self, name).copy_(t)

    def _apply(self, fn, recurse=True):
        # model.float() / .half() must move the format tensors but never change their stored dtypes
        super()._apply(fn, recurse)
        for name in ("scales", "zeros"):
            buf = getattr(self, name)
            if buf.dtype != torch.float16:
                setattr(self, name, buf.to(torch.float16))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.matmul(x, self)

    def signs(self) -> torch.Tensor:
        """The input rotation's signs as +-1 float32 [in] (rotated layers only); unpacked again whenever rot_signs
        is replaced, moved or written in place (load_state_dict)."""
        key = (self.rot_signs.data_ptr(), self.rot_signs._version, self.rot_signs.device)
        if self._signs[0] != key:
            self._signs = (key, unpack_signs(self.rot_signs, self.in_features))
        return self._signs[1]

    def stored_bytes(self) -> int:
        names = layer_shapes(self.out_features, self.in_features, self.counts, self.group_size, self.rotation_block)
        n = sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names)
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        avg = sum(b * c for b, c in enumerate(self.counts)) / self.in_features
        rot = f", rotation_block={self.rotation_block}" if self.rotation_block else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, avg_code_bits={avg:.3f}, "
                f"group_size={self.group_size}{rot}")


class XbitEmbedding(XbitLinear):
    """A quantized nn.Embedding: the [num_embeddings, dim] table stored as an XbitLinear with out = vocabulary
    and in = dim (so one tied table also serves as the output head). A lookup dequantizes only the rows it needs
    and multiplies them by `embed_scale` (Gemma scales its lookups; a tied head uses the table unscaled)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, counts: list[int], group_size: int,
                 dtype=torch.float16, device=None, embed_scale: float = 1.0):
        super().__init__(embedding_dim, num_embeddings, counts, group_size, bias=False, device=device)
        self.num_embeddings, self.embedding_dim, self.embed_scale = num_embeddings, embedding_dim, embed_scale
        # follows model.to(dtype) / .half(), so lookups come out in the model's float dtype
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int, dtype=torch.float16,
                     embed_scale: float = 1.0) -> "XbitEmbedding":
        bits = tensors["bits"]
        m = cls(tensors["scales"].shape[1], bits.numel(), _counts(bits), group_size, dtype=dtype, device=bits.device,
                embed_scale=embed_scale)
        m._copy_tensors(tensors)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dispatch.dequantize(self, flat).to(self.dtype_probe.dtype)
        if self.embed_scale != 1.0:  # in the model's dtype, as the float embedding applies it
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        avg = sum(b * c for b, c in enumerate(self.counts)) / self.in_features
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, avg_code_bits={avg:.3f}, "
                f"group_size={self.group_size}{scale}")


class XbitTiedHead(nn.Module):
    """The output head of a model whose head and input embeddings share one table: a matmul with the
    XbitEmbedding's table. Holds no tensors of its own (the table is stored once, under the embedding)."""

    def __init__(self, embedding: XbitEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its tensors belong to the embedding
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.matmul(x, self.embedding)
