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



# README's test command runs the suite in two worker processes (`-n 2 --dist loadfile`, pytest-xdist), a file per
# worker at a time. The two longest files go first, one to each worker, so that the short ones fill in around them
# instead of one of them starting last and running alone at the end.
LONGEST_FILES_FIRST = ("test_user_journey.py", "test_demo.py")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one PyTorch thread each (and in the processes the tests start), since threads that
    # wait on each other across busy cores made the tiny models' steps several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole and in order
