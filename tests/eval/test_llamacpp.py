"""eval.llamacpp without llama.cpp: a GGUF file's metadata bytes against the format's byte layout counted by hand,
and the one-line errors when the tools are not built."""

import numpy as np
import pytest

from tests.eval.test_compare import setup  # noqa: F401 (fixture)

gguf = pytest.importorskip("gguf")


def _kv_bytes_by_hand(key: str, value) -> int:
    """GGUF v3 key-value: u64 key length, key, u32 value type, value (string: u64 length + bytes; array: u32 item
    type, u64 count, items)."""
    head = 8 + len(key.encode()) + 4
    if isinstance(value, str):
        return head + 8 + len(value.encode())
    if isinstance(value, list):
        return head + 4 + 8 + sum(8 + len(v.encode()) for v in value)
    return head + 4  # uint32


def test_budget_is_the_file_less_its_metadata(tmp_path):
    from eval import llamacpp

    vocab = [f"tok{i}" * (1 + i % 7) for i in range(3000)]
    meta = {"general.name": "a test model", "tokenizer.ggml.tokens": vocab, "llama.block_count": 3}
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")  # also writes general.architecture
    w.add_name(meta["general.name"])
    w.add_token_list(vocab)
    w.add_block_count(3)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((64, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((16,)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta["general.architecture"] = "llama"
    expected = sum(_kv_bytes_by_hand(k, v) for k, v in meta.items())
    assert llamacpp.metadata_bytes(path) == expected
    size = path.stat().st_size
    assert llamacpp.budget_bytes(path) == size - expected
    # what is left holds at least the tensors' own bytes
    assert llamacpp.budget_bytes(path) >= 64 * 32 * 4 + 16 * 2


def test_missing_tools_and_bad_type_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from eval import llamacpp
    from eval.assets import AssetError

    monkeypatch.setenv("XBIT_CACHE", str(tmp_path / "cache"))
    assert llamacpp.main(["path"]) == 2
    assert "python -m eval.llamacpp build" in capsys.readouterr().err
    with pytest.raises(AssetError, match="unknown llama.cpp type"):
        llamacpp.make(tmp_path, "Q9_Z", tmp_path / "w")


def test_compare_gguf_target_without_llamacpp(setup, tmp_path, capsys):  # noqa: F811
    from eval import compare

    model, text = setup  # the fixture points XBIT_CACHE at a fake corpus without llama.cpp
    rc = compare.main(["--model", str(model), "--methods", "llamacpp", "xbit", "--targets", "gguf:Q2_K",
                       "--out", str(tmp_path / "o"), "--texts", str(text), "--tasks", "none",
                       "--calib-samples", "2", "--calib-seq-len", "32", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "llama-imatrix not found" in err[-1] and "eval.llamacpp build" in err[-1]


def test_compare_llamacpp_only_at_gguf_targets(setup, tmp_path):  # noqa: F811
    import json

    from eval import compare

    model, text = setup
    out = tmp_path / "o"
    assert compare.main(["--model", str(model), "--methods", "llamacpp", "--targets", "6.5", "--no-reference",
                         "--out", str(out), "--texts", str(text), "--tasks", "none", "--no-progress"]) == 0
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["status"] == "skipped" and "gguf:TYPE" in cell["message"]
