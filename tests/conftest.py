"""Shared fixtures: a tiny LLaMA-style sentencepiece model trained here, and tiny model configs."""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path

import pytest

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


# Text with what a LLaMA tokenizer must survive: runs of spaces, newlines, tabs, non-ASCII, markers.
_CORPUS_LINES = [
    "What is shown in this image? A red circle on a blue background.",
    "Describe the video briefly.  A green square moves from left to right.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello there [/INST] Hi! How can I help?",
    "<<IMG>> <</IMG>> <<VID>> <</VID>> the quick brown fox jumps over the lazy dog",
    "Tabs\tand  double  spaces,\nnew lines\n\nand caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \u3053\u3093\u306b\u3061\u306f",
    "Which colour is the triangle? It is yellow. How many shapes are there? There are three shapes.",
]


def train_tiny_sentencepiece(output_dir: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """A BPE sentencepiece model configured like Meta's LLaMA tokenizer, trained on a small English corpus with the
    project's one tokenizer trainer (`mm_llama.demo.tiny_llama.train_tokenizer`); returns `tokenizer.model`'s
    path."""
    from mm_llama.demo.tiny_llama import train_tokenizer

    rng = random.Random(seed)
    words = " ".join(_CORPUS_LINES).split()
    lines = list(_CORPUS_LINES) * 20 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    return train_tokenizer(lines, output_dir, vocab_size=vocab_size)


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> Path:
    """Path of a tiny LLaMA-like `tokenizer.model` (vocab 320), trained once per test session."""
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"))


def tiny_llama_config_kwargs(vocab_size: int = 320) -> dict:
    """Keyword arguments of a tiny random-init `LlamaConfig` (2 layers, hidden 64)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
