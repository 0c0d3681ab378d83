"""Checkpoints: bit-exact round trip, from_pretrained, clear errors on damaged folders, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import xbit
from xbit import checkpoint
from xbit.checkpoint import CheckpointError

from tests.tiny import tiny_llama, tiny_tokenizer


def quantized_tiny(tie=True, bias=False, bits=3, group_size=32):
    model = tiny_llama(tie=tie, bias=bias)
    return xbit.quantize(model, None, method="rtn", code_bits=bits, group_size=group_size, progress=False)


@pytest.fixture
def saved(tmp_path):
    model, qconfig, report = quantized_tiny()
    out = tmp_path / "ck"
    checkpoint.save(model, tiny_tokenizer(), out, qconfig, report)
    return model, out


def test_save_load_bit_exact_and_same_generation(saved):
    model, out = saved
    loaded = xbit.load(out, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, xbit.XbitLinear)
    ref = checkpoint.state_dict_to_store(model, torch.float16)
    got = checkpoint.state_dict_to_store(loaded, torch.float16)
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    # the in-memory model carries float32 norms/embeddings; compare generation with the same stored precision
    model.half().float()
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    a = model.generate(ids, max_new_tokens=12, do_sample=False)
    b = loaded.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


def test_from_pretrained_after_import(saved):
    from transformers import AutoModelForCausalLM

    _, out = saved
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert m.config.quantization_config.quant_method == "xbit"
    assert sum(isinstance(x, xbit.XbitLinear) for x in m.modules()) == 14


def test_tied_embeddings_stored_once_and_untied_twice(tmp_path):
    model, qc, rep = quantized_tiny(tie=True)
    assert checkpoint.save(model, None, tmp_path / "a", qc, rep) > 0
    tied = load_file(tmp_path / "a" / "model.safetensors")
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    model, qc, rep = quantized_tiny(tie=False, bias=True)
    checkpoint.save(model, None, tmp_path / "b", qc, rep)
    untied = load_file(tmp_path / "b" / "model.safetensors")
    assert "lm_head.weight" in untied and "model.layers.0.self_attn.q_proj.bias" in untied
    loaded = xbit.load(tmp_path / "b", device="cpu", dtype=torch.float32)
    bias = untied["model.layers.0.self_attn.q_proj.bias"]
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias.half(), bias)


# rtn 3-bit, groups of 32, on tiny_llama (hidden 64, intermediate 160, 2 layers, k/v out 32, vocabulary 128), counted
# by hand in the xbit layout: per linear (in K -> out N) qweight int32 [ceil(K/32)*3, N], scales and zeros fp16
# [ceil(K/32), N], perm int16 [K], bits uint8 [K]; the tied embedding and the norms in float16.
XBIT_3BIT_G32_BY_HAND = 2 * (
    2 * (2 * 3 * 64 * 4 + 2 * 2 * 64 * 2 + 64 * 2 + 64)  # q, o: 64 -> 64
    + 2 * (2 * 3 * 32 * 4 + 2 * 2 * 32 * 2 + 64 * 2 + 64)  # k, v: 64 -> 32
    + 2 * (2 * 3 * 160 * 4 + 2 * 2 * 160 * 2 + 64 * 2 + 64)  # gate, up: 64 -> 160
    + (5 * 3 * 64 * 4 + 2 * 5 * 64 * 2 + 160 * 2 + 160)  # down: 160 -> 64
) + 128 * 64 * 2 + (2 * 2 + 1) * 64 * 2


@pytest.mark.parametrize("max_shard_bytes", [checkpoint.MAX_SHARD_BYTES, 20_000])
def test_sizes_are_the_files_on_disk_and_the_layout_counted_by_hand(tmp_path, max_shard_bytes):
    model, qc, rep = quantized_tiny()
    assert rep["checkpoint_bytes"] == XBIT_3BIT_G32_BY_HAND
    written = checkpoint.save(model, None, tmp_path / "c", qc, rep, max_shard_bytes=max_shard_bytes)
    files = sorted((tmp_path / "c").glob("*.safetensors"))
    assert (len(files) > 1) == (max_shard_bytes < XBIT_3BIT_G32_BY_HAND)  # one header per shard
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    assert written == sum(f.stat().st_size for f in files) == XBIT_3BIT_G32_BY_HAND + headers
    if len(files) == 1:  # the report predicts the default (one-file) checkpoint exactly
        assert rep["file_bytes"] == written


def _rewrite(out, fn):
    path = out / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


NAME = "model.layers.1.mlp.up_proj.qweight"


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop(NAME), f"tensor {NAME} is missing"),
    (lambda t: t.__setitem__(NAME, t[NAME][:-1]), f"tensor {NAME} has shape"),
    (lambda t: t.__setitem__(NAME, t[NAME].to(torch.int64)), f"tensor {NAME} has dtype"),
])
def test_damaged_checkpoint_names_the_tensor(saved, damage, message):
    _, out = saved
    _rewrite(out, damage)
    with pytest.raises(CheckpointError, match=message):
        xbit.load(out, device="cpu")


def test_truncated_file_names_the_tensor(saved):
    _, out = saved
    path = out / "model.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    last = max(json.loads(path.read_bytes()[8:8 + header_len]).items(),
               key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)[0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"tensor {last} is truncated"):
        xbit.load(out, device="cpu")


def test_other_format_version_is_refused(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        xbit.load(out, device="cpu")


def test_pickle_files_are_never_loaded(saved):
    _, out = saved
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        xbit.load(out, device="cpu")


def test_interrupted_save_leaves_no_output_folder(tmp_path, monkeypatch):
    model, qc, rep = quantized_tiny()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, tiny_tokenizer(), tmp_path / "out", qc, rep)
    assert list(tmp_path.iterdir()) == []


def test_sharded_save_loads(tmp_path):
    model, qc, rep = quantized_tiny()
    checkpoint.save(model, None, tmp_path / "s", qc, rep, max_shard_bytes=20_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    loaded = xbit.load(tmp_path / "s", device="cpu", dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    model.half().float()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
