"""Two-stage training on the HF Trainer: argument dataclasses, stage set-up, `MMLlamaTrainer` and the run.

The names below are imported on first use, so that the model set-up (`mm_llama.training.setup`) works without
`datasets` (the GPU benchmark runs where only torch, transformers and peft are installed).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_PUBLIC_NAMES = {
    "DataArguments": "arguments", "LoraArguments": "arguments", "MMLlamaTrainingArguments": "arguments",
    "ModelArguments": "arguments", "parse_args": "arguments",
    "prepare_datasets": "data",
    "build_trainer": "run", "train": "run",
    "freeze_for_stage1": "setup", "load_stage_model": "setup", "optimizer_param_groups": "setup",
    "TRAINABLE_WEIGHTS_NAME": "trainer", "MMLlamaTrainer": "trainer",
}  # fmt: skip


__getattr__ = lazy_getattr(__name__, _PUBLIC_NAMES)


__all__ = sorted(_PUBLIC_NAMES)
