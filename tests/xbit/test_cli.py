"""`python -m xbit.quantize`: a real run on a tiny model, and every error path: one line, exit 2, nothing written."""

import json
import subprocess
import sys

import pytest

from xbit.quantize import main, match_size

from tests.tiny import tiny_llama


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_writes_checkpoint_and_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 4,
                              "--group-size", 32, "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0
    assert "checkpoint bytes" in stdout and "bits/weight (quantized layers)" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "xbit"
    report = json.loads((out / "xbit_report.json").read_text())
    assert report["code_bits"] == 4
    # 4-bit codes + fp16 scale and zero per 32 columns = 5 bits, plus the per-column bits/perm bytes
    assert 5.0 < report["bits_per_weight_layers"] < 5.5


def test_bits_means_stored_bits_per_weight_for_uniform_methods_too(tiny_model_dir, tmp_path, capsys):
    """--bits 5.4 for rtn g32: 4-bit codes take 4 + 32/32 (scale and zero) + per-column bytes, about 5.2 bits
    per weight, so 4 is the widest code width within 5.4 bits; 5.1 bits only fits 3-bit codes."""
    for bits, width in ((5.4, 4), (5.1, 3)):
        code, stdout, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--bits", bits,
                                  "--group-size", 32, "--out", tmp_path / str(bits), "--no-progress")
        report = json.loads((tmp_path / str(bits) / "xbit_report.json").read_text())
        assert code == 0 and report["code_bits"] == width and report["bits_per_weight_layers"] <= bits
        assert f"target {bits} bits/weight" in stdout


def test_size_target_picks_widest_uniform_width_that_fits(tiny_model_dir, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--group-size", 32,
                         "--out", tmp_path / "a", "--no-progress")
    assert code == 0
    three = json.loads((tmp_path / "a" / "xbit_report.json").read_text())["file_bytes"]
    code, _, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--size", three + 10,
                         "--group-size", 32, "--out", tmp_path / "b", "--no-progress")
    report = json.loads((tmp_path / "b" / "xbit_report.json").read_text())
    assert code == 0 and report["code_bits"] == 3 and report["file_bytes"] <= three + 10


@pytest.mark.parametrize("args, message", [
    (["--bits", "3", "--method", "magic"], "unknown method"),
    (["--method", "rtn", "--code-bits", "9"], "integer code width"),
    (["--method", "gptq", "--code-bits", "0", "--calib", "CALIB"], "integer code width"),
    (["--method", "xbit", "--code-bits", "3", "--calib", "CALIB"], "--code-bits is for the uniform methods"),
    (["--method", "rtn", "--bits", "inf"], "a number in (0, 16)"),
    (["--method", "rtn", "--bits", "1.0"], "below the smallest checkpoint a uniform method can write"),
    (["--method", "rtn", "--size", "10B"], "below the smallest checkpoint"),
    (["--method", "rtn", "--size", "10GB"], "not below the float checkpoint"),
    (["--method", "xbit", "--bits", "0.01", "--calib", "CALIB"], "below the smallest checkpoint"),
    (["--method", "xbit", "--size", "10GB", "--calib", "CALIB"], "not below the float checkpoint"),
    (["--method", "xbit", "--match", "gptq:9", "--calib", "CALIB"], "expected gptq:BITS"),
    (["--method", "rtn", "--match", "gptq:3:0"], "expected gptq:BITS"),
    (["--method", "rtn", "--match", "gptq:3:abc"], "expected gptq:BITS"),
    (["--method", "rtn", "--match", "foo:3"], "expected gptq:BITS"),
    (["--size", "12 parsecs"], "cannot read size"),
    (["--bits", "3", "--group-size", "0"], "--group-size must be positive"),
    (["--bits", "3", "--calib", "/no/such/file.txt"], "not found"),
    (["--bits", "3", "--calib", "CALIB", "--cost", "nosuchmodule:fn"], "cannot import cost"),
    (["--method", "xbit", "--bits", "3", "--tune-epochs", "-1"], "--tune-epochs must be >= 0"),
    (["--method", "xbit", "--bits", "3", "--tune-lr", "0"], "--tune-lr positive"),
    (["--method", "xbit", "--bits", "3", "--tune-samples", "0"], "--tune-samples must be >= 1"),
    (["--method", "rtn", "--code-bits", "3", "--device", "tpu9"], "expected cpu, cuda or cuda:N"),
    (["--method", "rtn", "--code-bits", "3", "--device", "meta"], "expected cpu, cuda or cuda:N"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the of and to"] * 200))
    args = [str(calib) if a == "CALIB" else a for a in args]
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--out", out, "--no-progress", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]


def test_unreachable_model_and_existing_output(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tmp_path / "missing-model", "--method", "rtn", "--code-bits", 3,
                           "--no-progress")
    assert code == 2 and "cannot load model" in err and len(err.strip().splitlines()) == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out", busy,
                           "--no-progress")
    assert code == 2 and "exists and is not empty" in err
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out", busy,
                           "--overwrite", "--no-progress")
    assert code == 2 and "replaces only an xbit checkpoint" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out",
                           busy / "keep.txt" / "q", "--no-progress")
    assert code == 2 and "is a file, not a folder" in err


def test_missing_target_is_a_usage_error_without_traceback(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "xbit.quantize", "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "one of the arguments --bits --size --match --code-bits is required" in proc.stderr


def test_xbit_cli_matches_gptq_size_exactly_and_reports(tiny_model_dir, tmp_path, capsys):
    from tests.tiny import WORDS

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(6):
        (calib / f"{i}.txt").write_text(" ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(600)))
    code, _, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "gptq", "--match", "gptq:3:32",
                         "--calib", calib, "--calib-samples", 4, "--seq-len", 64, "--out", tmp_path / "g",
                         "--no-progress")
    assert code == 0  # a uniform baseline at gptq:B is that quantization itself
    gptq = json.loads((tmp_path / "g" / "xbit_report.json").read_text())
    assert gptq["code_bits"] == 3 and gptq["group_size"] == 32
    code, stdout, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "xbit", "--match", "gptq:3:32",
                              "--group-size", 32, "--calib", calib, "--calib-samples", 4, "--seq-len", 64,
                              "--rounds", 2, "--out", tmp_path / "x", "--no-progress")
    assert code == 0 and "learned allocation" in stdout
    report = json.loads((tmp_path / "x" / "xbit_report.json").read_text())
    on_disk = (tmp_path / "x" / "model.safetensors").stat().st_size
    assert on_disk == report["file_bytes"] <= report["target_bytes"] == match_size(tiny_llama(), "gptq:3:32")
    assert len(report["rounds"]) == 2 and "sensitivities" in report
    assert report["rounds"][0]["allocation"] == "start"  # the uniform allocation, scored first
    assert f"kept {report['best_cost']:.4f}" in stdout
    # the grid tuning ran by default: epoch 0 scores the grids as quantized, and the kept one is the best
    costs = report["tune_costs"]
    assert len(costs) == 3 and costs[report["tune_kept_epoch"]] == min(costs)
    assert f"kept epoch {report['tune_kept_epoch']}" in stdout
    # wall time per phase and peak memory: in the table and in the written report
    assert set(report["phase_seconds"]) >= {"load", "measure", "learn", "quantize", "tune"}
    assert all(v >= 0 for v in report["phase_seconds"].values())
    assert report["peak_host_rss_bytes"] >= max(report["peak_rss_after_phase"].values()) > 2**20
    assert "wall time by phase" in stdout and "peak host RSS" in stdout and report["peak_device_bytes"] is None


def test_out_is_checked_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`--out . --overwrite` used to empty the current folder; `--out FILE` failed only after quantizing."""
    here = tmp_path / "work"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out", ".",
                           "--overwrite", "--no-progress")
    assert code == 2 and "replaces only an xbit checkpoint" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out",
                           "notes.txt", "--no-progress")
    assert code == 2 and "is a file, not a folder" in err
    assert [p.name for p in here.iterdir()] == ["notes.txt"]
    # the current folder an xbit checkpoint: still refused, it would delete the folder the run stands in
    code, _, _ = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out",
                         tmp_path / "ckpt", "--no-progress")
    assert code == 0
    monkeypatch.chdir(tmp_path / "ckpt")
    code, _, err = run_cli(capsys, "--model", tiny_model_dir, "--method", "rtn", "--code-bits", 3, "--out", ".",
                           "--overwrite", "--no-progress")
    assert code == 2 and "holds the current folder" in err
    assert (tmp_path / "ckpt" / "config.json").exists()
