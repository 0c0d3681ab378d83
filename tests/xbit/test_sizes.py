"""Byte counts against independent oracles: files that safetensors itself writes, and layouts counted by hand."""

import os
import random

import pytest
import torch
from safetensors.torch import save_file

import xbit
from xbit import checkpoint
from xbit.quantize import UsageError, match_size
from xbit.sizes import gptq_checkpoint_bytes, safetensors_header_bound, safetensors_header_bytes

from tests.tiny import tiny_llama

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32, torch.float32,
          torch.int64, torch.bool]


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Names with dots, digits and non-ASCII letters; shapes of 0..3 dimensions, empty ones included."""
    rng = random.Random(seed)
    out = {}
    for _ in range(rng.randint(0, 40)):
        name = "".join(rng.choice("ab.XY_09é") for _ in range(rng.randint(1, 30)))
        shape = [rng.choice([0, 1, 3, 17, 64, 300, 1000]) for _ in range(rng.randint(0, 3))]
        if torch.Size(shape).numel() > 100_000:  # keep the files small; the offsets still reach 6-7 digits
            shape = shape[:1]
        out[name] = torch.zeros(shape, dtype=rng.choice(DTYPES))
    return out


def data_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_header_bytes_are_what_safetensors_writes(tmp_path, seed, metadata):
    tensors = random_tensors(seed)
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata=metadata)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    assert safetensors_header_bytes(entries, metadata) == os.path.getsize(path) - data_bytes(tensors)


@pytest.mark.parametrize("seed", range(4))
def test_header_bound_holds_for_any_split_into_shards(tmp_path, seed):
    tensors = random_tensors(100 + seed)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    total, max_shard = data_bytes(tensors), 60_000
    shards = checkpoint._shards(dict(random.Random(seed).sample(sorted(tensors.items()), len(tensors))), max_shard)
    headers = 0
    for i, shard in enumerate(shards):
        save_file(shard, tmp_path / f"{i}.safetensors", metadata={"format": "pt"})
        headers += os.path.getsize(tmp_path / f"{i}.safetensors") - data_bytes(shard)
    assert headers <= safetensors_header_bound(entries, total, max_shard)


# tiny_llama: hidden 64, intermediate 160, 2 layers, 4 heads, 2 kv heads of 16 (k/v out 32), vocabulary 128.
# Per layer (in K -> out N): q 64->64, k 64->32, v 64->32, o 64->64, gate 64->160, up 64->160, down 160->64.
# GPTQ per linear: qweight int32 [K*b/32, N], qzeros int32 [ceil(K/G), N*b/32], scales fp16 [ceil(K/G), N],
# g_idx int32 [K]; the rest float16: embedding 128*64*2 = 16384, norms 2 layers * 2 * 64*2 + final 64*2 = 640.
FLOAT_BYTES = 16384 + 640
GPTQ_3BIT_G32 = 2 * (
    # qweight: K*3/32 words * N * 4 bytes
    6 * 64 * 4 + 6 * 32 * 4 + 6 * 32 * 4 + 6 * 64 * 4 + 6 * 160 * 4 + 6 * 160 * 4 + 15 * 64 * 4
    # qzeros: ceil(K/32) groups (2, or 5 for down) * N*3/32 words * 4
    + 2 * 6 * 4 + 2 * 3 * 4 + 2 * 3 * 4 + 2 * 6 * 4 + 2 * 15 * 4 + 2 * 15 * 4 + 5 * 6 * 4
    # scales: groups * N * 2
    + 2 * 64 * 2 + 2 * 32 * 2 + 2 * 32 * 2 + 2 * 64 * 2 + 2 * 160 * 2 + 2 * 160 * 2 + 5 * 64 * 2
    # g_idx: K * 4
    + 6 * 64 * 4 + 160 * 4
) + FLOAT_BYTES
GPTQ_4BIT_G128 = 2 * (
    # qweight: K*4/32 * N * 4 = K*N/2
    64 * 64 // 2 + 64 * 32 // 2 + 64 * 32 // 2 + 64 * 64 // 2 + 64 * 160 // 2 + 64 * 160 // 2 + 160 * 64 // 2
    # qzeros: ceil(K/128) groups (1, or 2 for down) * N*4/32 words * 4
    + 64 // 2 + 32 // 2 + 32 // 2 + 64 // 2 + 160 // 2 + 160 // 2 + 2 * 64 // 2
    # scales
    + 64 * 2 + 32 * 2 + 32 * 2 + 64 * 2 + 160 * 2 + 160 * 2 + 2 * 64 * 2
    # g_idx
    + 6 * 64 * 4 + 160 * 4
) + FLOAT_BYTES
# an untied head in float16 (128*64*2) and the attention biases q, k, v, o in float16 ((64+32+32+64)*2 per layer)
UNTIED_WITH_BIAS = 128 * 64 * 2 + 2 * (64 + 32 + 32 + 64) * 2


def gptq_tensors(model, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Zero tensors with the names, shapes and dtypes of a GPTQModel checkpoint of tiny_llama (only sizes matter)."""
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or name.removesuffix(".weight") in linears:
            continue  # a tied head shares the embedding's storage; quantized weights are replaced below
        seen.add(t.data_ptr())
        out[name] = torch.zeros(t.shape, dtype=torch.float16)
    for name, m in linears.items():
        k, n = m.in_features, m.out_features
        groups = -(-k // group)
        out[f"{name}.qweight"] = torch.zeros(k * bits // 32, n, dtype=torch.int32)
        out[f"{name}.qzeros"] = torch.zeros(groups, n * bits // 32, dtype=torch.int32)
        out[f"{name}.scales"] = torch.zeros(groups, n, dtype=torch.float16)
        out[f"{name}.g_idx"] = torch.zeros(k, dtype=torch.int32)
    return out


@pytest.mark.parametrize("bits, group, by_hand", [(3, 32, GPTQ_3BIT_G32), (4, 128, GPTQ_4BIT_G128)])
@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_gptq_bytes_are_the_layout_counted_by_hand_and_the_file_on_disk(tmp_path, bits, group, by_hand, tie, bias):
    model = tiny_llama(tie=tie, bias=bias)
    tensors = gptq_tensors(model, bits, group)
    assert data_bytes(tensors) == by_hand + (0 if tie else UNTIED_WITH_BIAS)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert gptq_checkpoint_bytes(model, bits, group) == os.path.getsize(tmp_path / "model.safetensors")
    assert match_size(model, f"gptq:{bits}:{group}") == os.path.getsize(tmp_path / "model.safetensors")


def test_gptq_refuses_a_layer_its_words_cannot_pack():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(UsageError, match="does not fit GPTQ's layout"):
        match_size(LlamaForCausalLM(cfg), "gptq:4")


@pytest.mark.parametrize("spec", ["gptq:3:0", "gptq:3:abc", "gptq:9", "gptq:5", "foo:3", "gptq", "gptq:3:32:1"])
def test_malformed_match_is_one_usage_error(spec):
    with pytest.raises(UsageError, match="expected gptq:BITS or gptq:BITS:GROUP"):
        match_size(tiny_llama(), spec)


def test_size_target_counts_the_headers_and_save_returns_the_files_on_disk(tmp_path):
    model, qc, rep = xbit.quantize(tiny_llama(), None, method="rtn", code_bits=3, group_size=32, progress=False)
    written = checkpoint.save(model, None, tmp_path / "three", qc, rep)
    on_disk = os.path.getsize(tmp_path / "three" / "model.safetensors")
    assert written == on_disk == rep["file_bytes"] > rep["checkpoint_bytes"]
    # exactly the 3-bit files fit; one byte less is only enough for 2 bits
    _, _, rep = xbit.quantize(tiny_llama(), None, method="rtn", size=on_disk, group_size=32, progress=False)
    assert rep["code_bits"] == 3 and rep["file_bytes"] == on_disk
    _, _, rep = xbit.quantize(tiny_llama(), None, method="rtn", size=on_disk - 1, group_size=32, progress=False)
    assert rep["code_bits"] == 2 and rep["file_bytes"] < on_disk
