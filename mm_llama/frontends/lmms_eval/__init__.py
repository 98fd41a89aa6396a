"""MM-LLaMA as an lmms-eval model (`pip install "mm-llama[eval]"`), so that published benchmarks run in one command:

    python -m lmms_eval --model mm_llama --model_args pretrained=FOLDER,imagebind=IMAGEBIND_FOLDER --tasks pope

lmms-eval finds the model through the `lmms_eval.models` entry point (setup.cfg), which names `manifest` below.
This module imports nothing from lmms-eval or torch at import time; `mm_llama.frontends.lmms_eval.model` holds the model and
`mm_llama.frontends.lmms_eval.cache` the on-disk embedding cache (which needs no lmms-eval).
"""

from __future__ import annotations

MODEL_ID = "mm_llama"
MODEL_CLASS_PATH = "mm_llama.frontends.lmms_eval.model.MMLlamaLMM"


def manifest():
    """The `lmms_eval.models` entry point's payload: a `ModelManifest` naming `MMLlamaLMM` (a "simple" model: it takes
    the task's prompt text and media, and applies MM-LLaMA's own chat template).

    lmms-eval 0.7.3 calls it while `lmms_eval.models` builds its registry, which is all that `--model mm_llama` needs.
    Its `models` command, however, lists the `AVAILABLE_SIMPLE_MODELS` / `AVAILABLE_CHAT_TEMPLATE_MODELS` tables,
    which only the built-in models and the deprecated `LMMS_EVAL_PLUGINS` path fill in; the model is added to the
    first one here, with its full class path, as that path adds a plugin model.
    """
    import importlib

    from lmms_eval.models.registry_v2 import ModelManifest

    listed = getattr(importlib.import_module("lmms_eval.models"), "AVAILABLE_SIMPLE_MODELS", None)
    if isinstance(listed, dict):
        listed.setdefault(MODEL_ID, MODEL_CLASS_PATH)
    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "manifest"]
