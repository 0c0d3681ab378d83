"""eval.compare on a tiny model: JSON, table and PNG plots, equal bytes across methods, resume without recompute."""

import json

import pytest

from tests.eval.test_tasks import fake_corpus
import xbit
from tests.tiny import WORDS, tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("XBIT_CACHE", str(fake_corpus(tmp_path / "cache", n_moby=400)))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[(i * 13) % len(WORDS)] for i in range(700)))
    return tiny_model_dir, text


def _argv(model, text, out, tasks="xbit_lastword_sotu,xbit_nextsent_moby"):
    return ["--model", str(model), "--methods", "rtn", "gptq", "--targets", "gptq:3", "gptq:4", "6.5",
            "--out", str(out), "--texts", str(text), "--ctx", "32", "--max-tokens", "256", "--tasks", tasks,
            "--limit", "3", "--group-size", "128", "--batch-size", "4", "--no-progress",
            "--calib-samples", "4", "--calib-seq-len", "64"]


def test_compare_writes_results_and_resumes(setup, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("matplotlib")
    from eval import compare

    model, text = setup
    out = tmp_path / "run"
    assert compare.main(_argv(model, text, out)) == 0
    res = json.loads((out / "results.json").read_text())
    cells = {c["key"]: c for c in res["cells"]}
    assert cells["reference"]["status"] == "ok"
    for target in ("gptq:3", "gptq:4", "6.5"):
        rtn = cells[f"rtn@{target}"]
        assert rtn["status"] == "ok"
        if not target.startswith("gptq:"):  # at gptq:B a uniform baseline is that B-bit quantization itself
            assert rtn["file_bytes"] <= res["targets"][target]
        assert rtn["ppl"]["text.txt"]["protocol"] == "plain"
        assert set(rtn["tasks"]) == {"xbit_lastword_sotu", "xbit_nextsent_moby"}
        assert "acc" in rtn["tasks"]["xbit_lastword_sotu"] and "acc_norm" in rtn["tasks"]["xbit_nextsent_moby"]
        assert cells[f"gptq@{target}"]["status"] == "ok"  # a method that fails fails the test
    # gptq:B is the file of a standard GPTQ B-bit g128 checkpoint; the uniform baselines are B-bit there
    assert res["targets"]["gptq:3"] == xbit.quantize.match_size(tiny_llama(), "gptq:3")
    assert cells["rtn@gptq:3"]["code_bits"] == 3 and cells["rtn@gptq:4"]["code_bits"] == 4
    assert cells["gptq@gptq:3"]["code_bits"] == 3
    table = (out / "results.md").read_text()
    assert "| rtn | gptq:3 |" in table and "ppl text.txt" in table and "plain ctx=32" in table
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert "quality_vs_size.png" in names
    assert any(n.startswith("allocation_rtn") for n in names) and any(n.startswith("bits_hist_rtn") for n in names)
    for p in pngs:
        assert p.read_bytes()[:8] == PNG
    assert "| method |" in capsys.readouterr().out

    # second run: every finished cell is reused, nothing is quantized or evaluated again
    def boom(*a, **k):
        raise AssertionError("recomputed a finished cell")

    monkeypatch.setattr(compare, "run_cell", boom)
    assert compare.main(_argv(model, text, out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in again["cells"]] == [c["key"] for c in res["cells"]]
    assert again["cells"][1]["ppl"] == res["cells"][1]["ppl"]


def test_changed_settings_recompute_and_picollm_protocol(setup, tmp_path):
    from eval import compare

    model, text = setup
    out = tmp_path / "run"
    argv = ["--model", str(model), "--methods", "rtn", "--targets", "gptq:2", "--out", str(out), "--texts",
            str(text), "--protocol", "picollm", "--n-seq", "3", "--seq-len", "64", "--tasks", "none",
            "--no-progress"]
    assert compare.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    ppl = res["cells"][1]["ppl"]["text.txt"]
    assert ppl["protocol"] == "picollm" and ppl["n_seq"] == 3 and ppl["tokens"] == 3 * 32
    assert "picollm 3x64" in (out / "results.md").read_text()


def test_bad_target_is_one_line_error(setup, tmp_path, capsys):
    from eval import compare

    model, text = setup
    rc = compare.main(["--model", str(model), "--targets", "gptq:x", "--out", str(tmp_path / "o"),
                       "--texts", str(text), "--tasks", "none"])
    assert rc == 2
    assert "cannot read target" in capsys.readouterr().err
