"""MM-LLaMA as an lmms-eval model (`pip install "mm-llama[eval]"`), so that published benchmarks run in one command:

    python -m lmms_eval --model mm_llama --model_args pretrained=FOLDER,imagebind=IMAGEBIND_FOLDER --tasks pope

lmms-eval finds the model through the `lmms_eval.models` entry point (setup.cfg), which names `manifest` below.
This module imports nothing from lmms-eval or torch at import time; `mm_llama.lmms_eval.model` holds the model and
`mm_llama.lmms_eval.cache` the on-disk embedding cache (which needs no lmms-eval).
"""

from __future__ import annotations

MODEL_ID = "mm_llama"
MODEL_CLASS_PATH = "mm_llama.lmms_eval.model.MMLlamaLMM"


def manifest():
    """The `lmms_eval.models` entry point's payload: a `ModelManifest` naming `MMLlamaLMM` (a "simple" model: it takes
    the task's prompt text and media, and applies MM-LLaMA's own chat template)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "manifest"]
