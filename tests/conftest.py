"""Shared fixtures."""

import pytest

from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A float tiny Llama + tokenizer saved as a Hugging Face folder."""
    model, tok = tiny_llama(), tiny_tokenizer()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
