"""Shared fixtures: a tiny LLaMA-style sentencepiece model and tiny model configs (built by `mm_llama.testing_utils`)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

# The tests' names for the shared builders of `mm_llama.testing_utils`.
from mm_llama.testing_utils import tiny_llama_config_kwargs  # noqa: F401
from mm_llama.testing_utils import train_tiny_tokenizer as train_tiny_sentencepiece

# CI installs every optional extra (and Chromium) and sets MM_LLAMA_REQUIRE_EXTRAS=1: a test of an extra then fails
# instead of skipping when a piece is missing, so that CI never passes by skipping.
EXTRAS_REQUIRED = os.environ.get("MM_LLAMA_REQUIRE_EXTRAS") == "1"


def need(module: str, install: str, module_level: bool = False):
    """Imports `module`, or skips the test (fails under MM_LLAMA_REQUIRE_EXTRAS=1) saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if EXTRAS_REQUIRED:
            pytest.fail(f"needs {module}: {install}", pytrace=False)
        pytest.skip(f"needs {module}: {install}", allow_module_level=module_level)


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> Path:
    """Path of a tiny LLaMA-like `tokenizer.model` (vocab 320), trained once per test session."""
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"))

