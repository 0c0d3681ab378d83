"""Checkpoints: bit-exact round trip, from_pretrained, clear errors on damaged folders, atomic writes."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import xbit
from xbit import checkpoint
from xbit.checkpoint import CheckpointError
from xbit.modules import XbitTiedHead

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


# ---------------------------------------------------------------- values checked at load (issue 20)

LAYER = "model.layers.1.mlp.up_proj"  # 64 -> 160, 3 bits, groups of 32: bits/perm [64], scales/zeros [2, 160]


def _set(name, index, value):
    def damage(t):
        t[name] = t[name].clone()
        t[name][index] = value
    return damage


def _copy_entry(name, src, dst):
    def damage(t):
        t[name] = t[name].clone()
        t[name][dst] = t[name][src]
    return damage


@pytest.mark.parametrize("damage, message", [
    (_set(f"{LAYER}.bits", 5, 9), rf"tensor {LAYER}\.bits: column 5 has 9 bits \(0\.\.8 allowed\)"),
    (_set(f"{LAYER}.bits", 5, 4), rf"tensor {LAYER}\.bits: columns per bit depth .* quantization_config"),
    (_copy_entry(f"{LAYER}.perm", 3, 4), rf"tensor {LAYER}\.perm: column \d+ appears more than once"),
    (_set(f"{LAYER}.perm", 0, -1), rf"tensor {LAYER}\.perm: entry 0 is -1 \(must be 0\.\.63\)"),
    (_set(f"{LAYER}.perm", 9, 64), rf"tensor {LAYER}\.perm: entry 9 is 64 \(must be 0\.\.63\)"),
    (_set(f"{LAYER}.scales", (1, 7), float("nan")), rf"tensor {LAYER}\.scales: nan at \[1, 7\]"),
    (_set(f"{LAYER}.zeros", (0, 3), float("inf")), rf"tensor {LAYER}\.zeros: inf at \[0, 3\]"),
])
def test_invalid_values_name_the_file_and_tensor(saved, damage, message):
    """Out-of-range bits, a perm that is not a permutation and non-finite scales or zeros used to load and fail
    at the first forward (or give NaN logits silently)."""
    _, out = saved
    _rewrite(out, damage)
    with pytest.raises(CheckpointError, match="^model.safetensors: " + message):
        xbit.load(out, device="cpu")


def test_each_bit_depth_must_be_one_segment():
    """bits[perm] must hold one run per depth (the layout the shapes were computed from)."""
    from xbit.rtn import quantize_weight_rtn

    bits = torch.tensor([2, 3] * 32, dtype=torch.uint8)
    perm = torch.argsort(bits.long(), stable=True)
    layer = xbit.XbitLinear.from_tensors(quantize_weight_rtn(torch.randn(8, 64), bits, perm, 32), None, 32)
    checkpoint.check_values("l", layer)
    layer.perm[[0, 40]] = layer.perm[[40, 0]].clone()  # storage order 3, 2 x 31, 3 x 8, 2, 3 x 23: 5 runs
    with pytest.raises(CheckpointError, match=r"^tensor l\.perm: bits\[perm\] forms 5 runs for 2 bit depths"):
        checkpoint.check_values("l", layer)


def _with_quantized_embedding():
    """quantized_tiny with its tied embedding table quantized too (an XbitEmbedding, the head an XbitTiedHead)."""
    from xbit.hf import layer_spec, set_submodule
    from xbit.modules import XbitEmbedding, XbitTiedHead
    from xbit.rtn import quantize_weight_rtn

    model, qc, rep = quantized_tiny()
    w = model.model.embed_tokens.weight.detach()
    bits = torch.full((w.shape[1],), 4, dtype=torch.uint8)
    emb = XbitEmbedding.from_tensors(quantize_weight_rtn(w, bits, torch.arange(w.shape[1]), 32), 32,
                                     dtype=w.dtype)
    set_submodule(model, "model.embed_tokens", emb)
    set_submodule(model, "lm_head", XbitTiedHead(emb))
    qc["layers"]["model.embed_tokens"] = layer_spec(emb)
    qc["tied"] = {"lm_head": "model.embed_tokens"}
    model.config.tie_word_embeddings = False
    return model, qc, rep


def test_quantized_embedding_values_are_checked(tmp_path):
    model, qc, rep = _with_quantized_embedding()
    checkpoint.save(model, None, tmp_path / "e", qc, rep)
    assert isinstance(xbit.load(tmp_path / "e", device="cpu").lm_head, XbitTiedHead)
    _rewrite(tmp_path / "e", _set("model.embed_tokens.scales", (1, 100), float("nan")))
    with pytest.raises(CheckpointError, match=r"^model.safetensors: tensor model.embed_tokens.scales: nan at"):
        xbit.load(tmp_path / "e", device="cpu")


def test_expert_values_are_checked(tmp_path):
    from tests.families import family_model

    model, qc, rep = xbit.quantize(family_model("mixtral"), None, method="rtn", code_bits=4, group_size=32,
                                   progress=False)
    checkpoint.save(model, None, tmp_path / "m", qc, rep)
    name = "model.layers.0.mlp.experts.2.down_proj.perm"
    _rewrite(tmp_path / "m", _set(name, 0, -5))
    with pytest.raises(CheckpointError, match=rf"^model.safetensors: tensor {name}: entry 0 is -5"):
        xbit.load(tmp_path / "m", device="cpu")


def _rewrite_header(path, edit):
    """Replace the safetensors header of `path` by edit(header bytes), keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(raw[8:8 + n])
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])


def _edit_json(fn):
    def edit(raw):
        h = json.loads(raw)
        return json.dumps(fn(h)).encode()
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.replace(b'"format"', b'"\xff\xfeformat"'), r"corrupt safetensors header \(.*utf-8"),
    (_edit_json(lambda h: list(h)), r"corrupt safetensors header \(not a JSON object\)"),
    (_edit_json(lambda h: {**h, NAME: {k: v for k, v in h[NAME].items() if k != "data_offsets"}}),
     rf"tensor {NAME} has a damaged header entry \(no data_offsets\)"),
    (_edit_json(lambda h: {**h, NAME: "x"}), rf"tensor {NAME} has a damaged header entry \(not a JSON object\)"),
    (_edit_json(lambda h: {**h, NAME: {**h[NAME], "shape": [-1, 3]}}),
     rf"tensor {NAME} has a damaged header entry \(shape \[-1, 3\]"),
    (_edit_json(lambda h: {**h, NAME: {**h[NAME], "data_offsets": h[NAME]["data_offsets"][::-1]}}),
     rf"tensor {NAME} has a damaged header entry \(data_offsets"),
    (_edit_json(lambda h: {**h, NAME: {**h[NAME], "data_offsets": [h[NAME]["data_offsets"][0],
                                                                   h[NAME]["data_offsets"][1] - 4]}}),
     rf"tensor {NAME} has a damaged header entry \(\d+ bytes of data, its shape and dtype need \d+\)"),
])
def test_damaged_header_names_the_file(saved, edit, message):
    """Invalid UTF-8 in the header used to give a bare UnicodeDecodeError; other damage a KeyError or TypeError."""
    _, out = saved
    _rewrite_header(out / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="^model.safetensors: " + message):
        xbit.load(out, device="cpu")


# ---------------------------------------------------------------- save: stale temporary folders, permissions


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_save_removes_stale_temporary_folders_of_dead_runs_only(tmp_path):
    model, qc, rep = quantized_tiny()
    dead = tmp_path / (checkpoint.tmp_prefix("out", _dead_pid()) + "abc123")  # an interrupted (killed) save
    live = tmp_path / (checkpoint.tmp_prefix("out", os.getppid()) + "def456")  # a concurrent save, still running
    other = tmp_path / (checkpoint.tmp_prefix("other", _dead_pid()) + "ghi789")  # another output's: not ours
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    checkpoint.save(model, None, tmp_path / "out", qc, rep)
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_saved_folder_and_files_follow_the_umask(tmp_path):
    model, qc, rep = quantized_tiny()
    old = os.umask(0o027)
    try:
        checkpoint.save(model, tiny_tokenizer(), tmp_path / "p", qc, rep)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o750  # mkdtemp's 0o700 before
    files = list((tmp_path / "p").iterdir())
    assert {"model.safetensors", "config.json"} <= {f.name for f in files}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o640 for f in files}


def test_overwrite_swaps_the_new_checkpoint_in_and_keeps_the_old_one_if_that_fails(tmp_path, monkeypatch):
    model, qc, rep = quantized_tiny()
    out = tmp_path / "out"
    checkpoint.save(model, None, out, qc, rep)
    before = (out / "model.safetensors").read_bytes()
    (out / "marker.txt").write_text("old")
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):  # the new folder cannot be renamed into place (disk full, say)
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated failure")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(model, None, out, qc, rep, overwrite=True)
    monkeypatch.undo()
    assert (out / "marker.txt").read_text() == "old" and (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    checkpoint.save(model, None, out, qc, rep, overwrite=True)  # and without the failure: replaced, nothing left
    assert not (out / "marker.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _edit_layer(key, value):
    def edit(qc):
        qc["layers"][LAYER][key] = value
    return edit


def _rename_layer(qc):
    qc["layers"]["model.layers.9.mlp.up_proj"] = qc["layers"].pop(LAYER)


@pytest.mark.parametrize("edit, message", [
    (_edit_layer("group_size", 0), rf"layer {LAYER}: group_size is 0, expected a positive integer"),
    (_edit_layer("in", -64), rf"layer {LAYER}: in is -64"),
    (_edit_layer("counts", [0, 0, 0, 64]), rf"layer {LAYER}: counts is \[0, 0, 0, 64\], expected 9 column counts"),
    (_edit_layer("counts", [0, 0, 0, 60, 0, 0, 0, 0, 0]), rf"layer {LAYER}: counts add up to 60 columns, the "
                                                            "layer has 64"),
    (_edit_layer("rotation_block", 3), rf"layer {LAYER}: rotation_block is 3"),
    (_rename_layer, r"names model.layers.9.mlp.up_proj, which this model does not have"),
    (lambda qc: qc.update(layers=[1, 2]), r"layers is not a JSON object"),
])
def test_damaged_quantization_config_is_one_checkpoint_error(saved, edit, message):
    """group_size 0 used to be a ZeroDivisionError, a layer the model lacks an AttributeError."""
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        xbit.load(out, device="cpu")
