"""Shared fixtures."""

import os

# Triton reads TRITON_INTERPRET when it is first imported, and any test (lm-eval, torch) may import it first:
# set it for the whole session. CPU tensors still go to Triton only where a test also sets XBIT_TRITON_CPU=1.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny import tiny_llama, tiny_tokenizer  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """Which kernel paths this machine ran (CI logs say what was tested, and what skipped for want of it); printed
    at the end, where `pytest -q` still shows it."""
    import cpu_fallback

    ok, why = cpu_fallback.available()
    paths = ", ".join(cpu_fallback.supported_isas()) if ok else f"none ({why})"
    terminalreporter.write_line(f"xbit CPU kernel paths on this machine: {paths}; default "
                                f"{cpu_fallback.best_isa() if ok else '-'}")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A float tiny Llama + tokenizer saved as a Hugging Face folder."""
    model, tok = tiny_llama(), tiny_tokenizer()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
