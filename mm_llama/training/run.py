"""A training run from parsed arguments: what `mm-llama train` (and scripts/train.py) runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from transformers import set_seed
from transformers.trainer_utils import TrainOutput

from ..data.collator import MMLlamaDataCollator
from ..data.packing import PackingCollator
from .arguments import RESUME_LATEST, DataArguments, LoraArguments, MMLlamaTrainingArguments, ModelArguments, parse_args
from .data import check_datasets, prepare_datasets
from .distributed_checks import check_distributed_compatibility
from .setup import load_stage_model
from .trainer import MMLlamaTrainer

logger = logging.getLogger(__name__)


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: MMLlamaTrainingArguments,
) -> MMLlamaTrainer:
    """Model + processor for the stage, datasets, collator and trainer, ready for `.train()`."""
    check_distributed_compatibility(model_args, training_args, data_args)  # before loading anything
    set_seed(training_args.seed)
    evaluates = training_args.eval_strategy != "no"
    check_datasets(data_args, evaluates and bool(data_args.eval_split))  # before minutes of model loading
    model, processor = load_stage_model(
        model_args,
        lora_args,
        gradient_checkpointing=bool(training_args.activation_checkpointing),
        gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
    )
    train_dataset, eval_dataset = prepare_datasets(data_args, processor, seed=training_args.seed)
    if eval_dataset is None and evaluates:
        raise ValueError(f"eval_strategy is {training_args.eval_strategy!r} but eval_split is not set; set "
                         "eval_split: validation, or eval_strategy: 'no'.")
    collator = MMLlamaDataCollator(
        processor,
        max_seq_len=data_args.max_seq_len,
        truncation=data_args.truncation,
        prompt_loss_weight=data_args.prompt_loss_weight,
        train_on=data_args.train_on,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
    if data_args.packing:
        # flash_attention_2 keeps sequences apart in a multi-row batch only through cu_seq_lens kwargs.
        collator = PackingCollator(collator,
                                   flash_attention_kwargs=model_args.attn_implementation == "flash_attention_2")
    return MMLlamaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )


def resume_argument(value: str | None) -> str | bool | None:
    """`resume_from_checkpoint`: a checkpoint folder, or true/latest/last for the newest one in output_dir."""
    if value is not None and str(value).lower() in RESUME_LATEST:
        return True
    return value


def check_output_dir(output_dir: str | Path, resume: str | bool | None) -> None:
    """Checks the output folder and the resume request before any model is loaded: a new run must not mix its
    checkpoints into an earlier run's, and a resume needs a checkpoint to resume from."""
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} is a file; choose a folder.")
    checkpoints = sorted(path.name for path in output.glob("checkpoint-*")) if output.is_dir() else []
    if resume is None and checkpoints:
        raise ValueError(
            f"{output} already holds checkpoints of an earlier run ({', '.join(checkpoints[-3:])}); continue it with "
            "--resume_from_checkpoint latest, or choose another output_dir."
        )
    if resume is True and not checkpoints:
        raise ValueError(f"--resume_from_checkpoint latest: {output} holds no checkpoint-* folder to resume from.")
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise FileNotFoundError(f"Checkpoint {resume} to resume from does not exist.")


def train(argv: Sequence[str] | None = None) -> TrainOutput:
    """Parses `[recipe.yaml] [--key value ...]`, trains, and saves the stage's final output to output_dir:
    stage 1 a full `MMLlamaForCausalLM` folder, stage 2 the PEFT adapter (LoRA + projector); both with the
    processor."""
    model_args, data_args, lora_args, training_args = parse_args(argv)
    logging.basicConfig(level=training_args.get_process_log_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resume = resume_argument(training_args.resume_from_checkpoint)
    check_output_dir(training_args.output_dir, resume)
    trainer = build_trainer(model_args, data_args, lora_args, training_args)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    return result


__all__ = ["build_trainer", "check_output_dir", "resume_argument", "train"]
