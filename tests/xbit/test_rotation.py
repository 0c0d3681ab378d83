"""The random-sign block Hadamard rotation: orthogonal, stored exactly, loaded back, and why it is there."""

import pytest
import torch
import torch.nn.functional as F

import xbit
from xbit import checkpoint, dispatch
from xbit.format import reference_matmul
from xbit.modules import XbitLinear
from xbit.rotation import block_size, pack_signs, random_signs, rotate, signs_bytes, unpack_signs, unrotate
from xbit.rtn import quantize_weight_rtn

from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("k, cap, want", [(576, 512, 64), (1536, 512, 512), (8960, 512, 256), (1536, 128, 128),
                                          (96, 512, 32), (77, 512, 1)])
def test_block_size_is_the_largest_power_of_two_dividing(k, cap, want):
    assert block_size(k, cap) == want


@pytest.mark.parametrize("k", [96, 576])
def test_rotation_is_orthogonal_and_keeps_the_layer_function(k):
    block = block_size(k)
    s = random_signs(k, "layer", 3)
    r = rotate(torch.eye(k, dtype=torch.float64), s, block)  # row i: R^T e_i = column i of R^T... any orthogonal
    torch.testing.assert_close(r @ r.t(), torch.eye(k, dtype=torch.float64))
    w, x = torch.randn(40, k, dtype=torch.float64), torch.randn(5, k, dtype=torch.float64)
    torch.testing.assert_close(F.linear(rotate(x, s, block), rotate(w, s, block)), F.linear(x, w))
    assert not torch.allclose(rotate(w, s, block), w)
    torch.testing.assert_close(unrotate(rotate(w, s, block), s, block), w)  # the stored W R back to W
    torch.testing.assert_close(F.linear(x, unrotate(rotate(w, s, block), s, block)), F.linear(x, w))


def test_signs_pack_and_unpack_exactly():
    s = random_signs(77, "q_proj", 0)
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.numel() == signs_bytes(77) == 10
    assert torch.equal(unpack_signs(packed, 77), s)
    assert not torch.equal(random_signs(77, "k_proj", 0), s)  # each layer draws its own signs


def test_rotated_layer_computes_the_original_product(monkeypatch):
    torch.manual_seed(0)
    k, block = 96, 32
    w, x = torch.randn(40, k), torch.randn(3, k)
    s = random_signs(k, "layer", 0)
    bits = torch.full((k,), 8, dtype=torch.uint8)
    t = quantize_weight_rtn(rotate(w, s, block), bits, torch.arange(k), 32)
    layer = XbitLinear.from_tensors({**t, "rot_signs": pack_signs(s)}, None, 32, rotation_block=block).float()
    fast = layer(x)  # whichever kernel dispatch picks
    monkeypatch.setattr(dispatch, "KERNELS", [dispatch.ReferenceKernel])
    got = layer(x)
    want = reference_matmul(rotate(x, s, block), t["qweight"], t["scales"], t["zeros"], t["perm"], t["bits"], 32)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fast, want, rtol=1e-3, atol=1e-3)
    assert (got - F.linear(x, w)).abs().max() < 0.05 * F.linear(x, w).abs().max()  # 8 bits: close to W x
    assert layer.stored_bytes() == sum(v.numel() * v.element_size() for v in t.values()) + signs_bytes(k)


def test_signs_follow_a_state_dict_loaded_after_first_use():
    k, block = 64, 64
    t = quantize_weight_rtn(torch.randn(8, k), torch.full((k,), 4, dtype=torch.uint8), torch.arange(k), 32)
    a = XbitLinear.from_tensors({**t, "rot_signs": pack_signs(random_signs(k, "a"))}, None, 32, block).float()
    b = XbitLinear.from_tensors({**t, "rot_signs": pack_signs(random_signs(k, "b"))}, None, 32, block).float()
    assert not torch.equal(a.signs(), b.signs())
    a.load_state_dict(b.state_dict())  # in place: same storage, new values
    assert torch.equal(a.signs(), b.signs())


def test_rotation_removes_the_outlier_error_at_three_bits():
    """A weight with a few huge columns fed by massive activation dimensions (what real LLM layers look like):
    3-bit rounding in the rotated basis has a much smaller output error than in the original basis."""
    torch.manual_seed(1)
    k, block = 256, 256
    w = torch.randn(128, k)
    w[:, :4] *= 20
    x = torch.randn(512, k)
    x[:, 4:8] *= 30
    bits, order = torch.full((k,), 3, dtype=torch.uint8), torch.arange(k)
    s = random_signs(k, "layer", 0)

    def output_error(wq_tensors, xin):
        t = wq_tensors
        y = reference_matmul(xin, t["qweight"], t["scales"], t["zeros"], t["perm"], t["bits"], 128)
        return (y - F.linear(x, w)).pow(2).mean().item()

    plain = output_error(quantize_weight_rtn(w, bits, order, 128), x)
    rotated = output_error(quantize_weight_rtn(rotate(w, s, block), bits, order, 128), rotate(x, s, block))
    assert rotated < 0.5 * plain


def test_xbit_checkpoint_with_rotation_loads_back_identically(tmp_path):
    from tests.tiny import WORDS

    texts = [" ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(400)) for i in range(4)]
    model, tok = tiny_llama(), tiny_tokenizer()
    model, qconfig, report = xbit.quantize(model, tok, method="xbit", bits=3.5, group_size=32, calib=texts,
                                           calib_samples=4, seq_len=64, rounds=1, progress=False, rotation_block=32)
    spec = qconfig["layers"]["model.layers.0.mlp.down_proj"]
    assert spec["rotation_block"] == 32 and "rotation_block" not in qconfig["layers"]["model.embed_tokens"]
    assert report["quantized_layer_bytes"] <= 3.5 * report["quantized_params"] / 8
    checkpoint.save(model, tok, tmp_path / "ck", qconfig, report)
    loaded = xbit.load(tmp_path / "ck", device="cpu", dtype=torch.float32)
    assert loaded.model.layers[1].self_attn.q_proj.rotation_block == 32
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    model.half().float()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k, block", [(96, 32), (576, 64), (1536, 512), (256, 128)])
def test_rotation_is_the_dense_sylvester_hadamard_product(k, block):
    """rotate/unrotate (two small products from 64 up) against the dense normalised Hadamard matrix, by its
    definition H_2n = H_2 (x) H_n."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    h = h / block**0.5
    s = random_signs(k, "layer", 1)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    want = ((x * s).reshape(2, 3, k // block, block) @ h).reshape(2, 3, k)
    torch.testing.assert_close(rotate(x, s, block), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unrotate(want, s, block), x, rtol=1e-12, atol=1e-12)


def test_rotation_first_used_under_inference_mode_still_backpropagates():
    s = random_signs(1024, "layer", 2)
    with torch.inference_mode():
        rotate(torch.randn(2, 1024, dtype=torch.float16), s, 512)  # fills the cache for float16
    x = torch.randn(2, 1024, dtype=torch.float16, requires_grad=True)
    rotate(x, s, 512).float().pow(2).sum().backward()
    torch.testing.assert_close(x.grad.float(), 2 * x.detach().float(), rtol=1e-2, atol=1e-2)  # R orthogonal
