"""Two-stage training on the HF Trainer: argument dataclasses, stage set-up, `MMLlamaTrainer` and the run."""

from .arguments import DataArguments, LoraArguments, MMLlamaTrainingArguments, ModelArguments, parse_args
from .data import prepare_datasets
from .run import build_trainer, train
from .setup import freeze_for_stage1, load_stage_model, optimizer_param_groups
from .trainer import TRAINABLE_WEIGHTS_NAME, MMLlamaTrainer

__all__ = [
    "DataArguments",
    "LoraArguments",
    "MMLlamaTrainer",
    "MMLlamaTrainingArguments",
    "ModelArguments",
    "TRAINABLE_WEIGHTS_NAME",
    "build_trainer",
    "freeze_for_stage1",
    "load_stage_model",
    "optimizer_param_groups",
    "parse_args",
    "prepare_datasets",
    "train",
]
