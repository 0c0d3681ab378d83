"""Incoherence processing: a random-sign block Hadamard rotation of a linear layer's input features.

y = W x = (W R)(R^T x) with R = diag(s) B: s random signs, B block-diagonal with normalised Hadamard blocks of
size `block` (the largest power of two dividing in_features, at most `max_block`). The rotated weight W R has no
outlier columns, and the rotated input R^T x no massive activation dimension, so every group's grid fits its
values far better at 2-3 bits (QuIP#, QuaRot). The layer is quantized as W R; at run time its input goes through
R^T first. Stored cost: the signs, one bit per input feature.

B is symmetric, so R^T v = B (s * v) for a column vector, and the rows of W R are R^T applied to the rows of W:
one function, `rotate`, serves both.
"""

import functools
import zlib

import torch

MAX_BLOCK = 512


def block_size(in_features: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two dividing in_features, at most max_block."""
    b = 1
    while in_features % (2 * b) == 0 and 2 * b <= max_block:
        b *= 2
    return b


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)  # a normal tensor even when first asked for under inference mode (autograd saves it)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def _hadamard_product(y: torch.Tensor, block: int) -> torch.Tensor:
    """y [..., block] times the normalised Sylvester Hadamard matrix H_block. From 128 up, as two small products:
    H_ab = H_a (x) H_b, so each block viewed as an [a, b] matrix Y becomes H_a Y H_b, (a + b) instead of a * b
    multiply-adds per value (a block of 512: 48 instead of 512; a rotated 1536-wide input cost more than the layer's
    own product, now a fifth of it)."""
    if block < 128:
        return y @ _hadamard(block, y.dtype, y.device)
    a = 1 << (block.bit_length() - 1) // 2
    b = block // a
    z = y.reshape(*y.shape[:-1], a, b) @ _hadamard(b, y.dtype, y.device)
    return torch.matmul(_hadamard(a, y.dtype, y.device), z).reshape(y.shape)  # (broadcast: 5x the transposed form)


class _TimesHadamard(torch.autograd.Function):
    """y -> y H. H is symmetric, so the gradient is g H, the same product (autograd's own backward of the
    broadcast product above is 10x slower than its forward)."""

    @staticmethod
    def forward(ctx, y, block):
        ctx.block = block
        return _hadamard_product(y, block)

    @staticmethod
    def backward(ctx, grad):
        return _hadamard_product(grad, ctx.block), None


def _times_hadamard(y: torch.Tensor, block: int) -> torch.Tensor:
    return _TimesHadamard.apply(y, block) if y.requires_grad else _hadamard_product(y, block)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R^T x along the last dimension of x; signs: +-1 [in] in x's dtype (or any float dtype)."""
    k = x.shape[-1]
    y = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], k // block, block)
    return _times_hadamard(y, block).reshape(x.shape)


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R x along the last dimension of x, the inverse of `rotate`: the rows of a stored W R back to the rows of W."""
    k = x.shape[-1]
    return _times_hadamard(x.reshape(*x.shape[:-1], k // block, block), block).reshape(x.shape) * signs.to(x.dtype)


def random_signs(in_features: int, key: str, seed: int = 0) -> torch.Tensor:
    """+-1 float32 [in], reproducible from a key (xbit uses the decoder block's path) and the seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randint(0, 2, (in_features,), generator=gen).float() * 2 - 1


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 [in] -> uint8 [ceil(in/8)], bit i%8 of byte i//8 set where the sign is negative."""
    neg = (signs < 0).to(torch.uint8)
    pad = (-neg.numel()) % 8
    neg = torch.cat([neg, neg.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=neg.device)
    return (neg * weights).sum(1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [ceil(in/8)] -> +-1 float32 [in]."""
    shifts = torch.arange(8, device=packed.device)
    neg = (packed.long()[:, None] >> shifts) & 1
    return 1.0 - 2.0 * neg.reshape(-1)[:in_features].float()


def signs_bytes(in_features: int) -> int:
    return -(-in_features // 8)


def rotate_linear(linear: torch.nn.Linear, signs: torch.Tensor, block: int):
    """Turns a float nn.Linear into the same function computed in the rotated basis: weight W R, input R^T x (a
    forward pre-hook, so every statistic and gradient hook sees the rotated input). Returns the hook's handle."""
    w, s = linear.weight.data, signs.to(linear.weight.device)
    linear.weight.data = rotate(w.float(), s, block).to(w.dtype)
    return linear.register_forward_pre_hook(lambda m, args: (rotate(args[0], s, block), *args[1:]))
