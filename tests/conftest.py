"""Shared fixtures: the embedded assets are prepared once per session (cheap when cached)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from utils.modeling import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def llama_tokenizer():
    from utils.modeling import load_tokenizer

    return load_tokenizer("llama-3.2")


@pytest.fixture(scope="session")
def embedded_model():
    from utils.modeling import load_model

    return load_model("embedded", device="cpu")
