"""Argument dataclasses of a training run and the YAML + command-line parser.

A recipe is a YAML file whose keys are the fields of `ModelArguments`, `DataArguments`, `LoraArguments` and
`MMLlamaTrainingArguments` (a `transformers.TrainingArguments`); `--key value` on the command line overrides it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Sequence

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..loading import LORA_DEFAULTS

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    """Which model a stage starts from and how it is loaded."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Stage 1: a LLaMA(-2-chat) HF folder (or an MM-LLaMA folder to continue). "
                          "Stage 2: the stage-1 output folder."},
    )
    stage: Literal[1, 2] = field(
        default=1, metadata={"help": "1: train the projector, LLM frozen. 2: LoRA on the LLM + projector."}
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder with a saved MMLlamaProcessor, or with LLaMA's tokenizer.model. "
                          "Default: model_name_or_path."},
    )
    projector_path: str | None = field(
        default=None, metadata={"help": "Stage 1: initial projector weights (.safetensors/.bin state dict)."}
    )
    projector_type: Literal["linear", "mlp2x_gelu"] = field(
        default="linear", metadata={"help": "Stage 1 from a LLaMA folder: the projector to create."}
    )
    projector_bias: bool = field(
        default=True,
        metadata={"help": "Stage 1 from a LLaMA folder: give the projector's linear layers a bias (the original "
                          "MM-LLaMA's projector has none)."},
    )
    projector_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on the projector output while training (the original: 0.1 in stage 1, 0 in stage "
                          "2). Default: 0 for a new projector, the checkpoint's value otherwise."},
    )
    media_embed_dim: int = field(default=1024, metadata={"help": "Stage 1: media embedding size (ImageBind: 1024)."})
    tokens_per_media: int = field(default=1, metadata={"help": "Stage 1: placeholder tokens per media item."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "dtype of the frozen weights."}
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."}
    )
    upcast_trainable_params: bool = field(
        default=True,
        metadata={"help": "Keep trained parameters (projector, LoRA) in float32 so that the optimizer updates are "
                          "not rounded to bf16; autocast (bf16: true) still runs the matmuls in bf16."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Stage 2 QLoRA: load the LLM in 4 bit (bitsandbytes)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants."})
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "dtype of the 4-bit layers' matmuls."}
    )

    def __post_init__(self):
        if self.load_in_4bit and self.stage != 2:
            raise ValueError("load_in_4bit (QLoRA) needs stage: 2; stage 1 trains the projector of a frozen LLM.")


@dataclass
class DataArguments:
    """Built datasets (`datasets.load_from_disk` folders) and how conversations become training sequences."""

    dataset_paths: list[str] | None = field(
        default=None, metadata={"help": "One or more built dataset folders (DatasetDict with train/validation)."}
    )
    dataset_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Mixing probabilities, one per dataset (datasets.interleave_datasets, every dataset seen "
                          "entirely); omit to concatenate the datasets."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default="validation", metadata={"help": "Split to evaluate on; skipped for datasets that lack it."}
    )
    max_seq_len: int = field(default=512, metadata={"help": "Longest sequence in tokens."})
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Round each padded batch's length up to a multiple of this (e.g. 64): fewer distinct "
                          "shapes, so GPU kernels chosen per shape are reused (BENCHMARKS.md). Not used with packing, "
                          "whose rows are max_seq_len long already."},
    )
    truncation: Literal["drop", "truncate"] = field(
        default="truncate",
        metadata={"help": "Longer conversations: 'truncate' (never inside a media placeholder) or 'drop'."},
    )
    prompt_loss_weight: float = field(
        default=0.0, metadata={"help": "Loss weight of prompt tokens relative to answer tokens (0: answers only)."}
    )
    train_on: Literal["all", "last"] = field(default="all", metadata={"help": "Train on all answers or the last."})
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free packing: several whole conversations per training row of max_seq_len tokens, "
                          "attention kept within each conversation (position_ids restart, no attention mask). "
                          "per_device_train_batch_size then counts packed rows. Needs train_sampling_strategy: random."},
    )
    packing_method: Literal["best_fit_decreasing", "greedy"] = field(
        default="best_fit_decreasing",
        metadata={"help": "How conversations are grouped into rows: fullest rows (best_fit_decreasing) or dataset "
                          "order (greedy)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation rows."})

    def __post_init__(self):
        if self.dataset_weights is not None:
            if self.dataset_paths is None or len(self.dataset_weights) != len(self.dataset_paths):
                raise ValueError(
                    f"dataset_weights has {len(self.dataset_weights)} values but dataset_paths has "
                    f"{len(self.dataset_paths or [])}: give one weight per dataset, or omit dataset_weights."
                )
            if any(weight < 0 for weight in self.dataset_weights) or sum(self.dataset_weights) <= 0:
                raise ValueError(f"dataset_weights must be >= 0 with a positive sum, got {self.dataset_weights}.")
        if self.prompt_loss_weight < 0:
            raise ValueError(f"prompt_loss_weight must be >= 0, got {self.prompt_loss_weight}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens or null, got "
                             f"{self.pad_to_multiple_of}.")


@dataclass
class LoraArguments:
    """Stage 2's LoRA adapter (PEFT). The projector is always trained fully through `modules_to_save`."""

    # The defaults are mm_llama.loading.LORA_DEFAULTS, shared with merging and the benchmarks.
    lora_r: int = field(default=LORA_DEFAULTS.r, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=LORA_DEFAULTS.alpha,
                              metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=LORA_DEFAULTS.dropout, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_DEFAULTS.target_modules),
        metadata={"help": "Language-model linear layers that get adapters, by name: q_proj, k_proj, v_proj, o_proj, "
                          "gate_proj, up_proj, down_proj, lm_head (the output head). A name that matches no layer is "
                          "an error."},
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(default=LORA_DEFAULTS.bias,
                                                           metadata={"help": "Train biases?"})


@dataclass
class MMLlamaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus MM-LLaMA's options; defaults changed where training on our datasets needs it."""

    projector_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Separate learning rate for the projector (its own optimizer parameter groups); "
                          "default: learning_rate. LLaVA-1.5's LoRA recipe uses 2e-5 with LoRA at 2e-4."},
    )
    save_trainable_only: bool = field(
        default=True,
        metadata={"help": "Stage 1: checkpoints hold only the trained parameters (trainable_weights.safetensors), "
                          "not the frozen LLM; the final output is the full model either way."},
    )
    # The collator reads the raw columns (messages, media_types, ...), which the model's forward does not name.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay false: the collator needs the dataset's raw columns."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Logging integrations; TensorBoard logs go to output_dir/runs."}
    )
    loss_chunk_size: int | None = field(
        default=1024,
        metadata={"help": "Compute the loss this many trained positions at a time, never holding all [tokens, vocab] "
                          "logits (same loss and gradients; Liger-Kernel's fused loss on CUDA when installed). "
                          "null: the full logits."},
    )
    use_liger_loss: bool = field(
        default=True, metadata={"help": "Use Liger-Kernel's fused linear cross-entropy on CUDA when it is installed."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be a positive number of positions or null, got "
                             f"{self.loss_chunk_size}.")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be false for MM-LLaMA training: the collator tokenizes the dataset's "
                "`messages` / `media_types` columns, which the model's forward does not take. Remove the key."
            )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, MMLlamaTrainingArguments)
RESUME_LATEST = ("true", "latest", "last")


class UnknownKeyError(ValueError):
    """A recipe key or `--key` flag that is no argument; the message is one line with a did-you-mean suggestion."""


def recipe_parser() -> HfArgumentParser:
    """The parser of every recipe key (ModelArguments, DataArguments, LoraArguments, TrainingArguments)."""
    return HfArgumentParser(ARGUMENT_CLASSES)


def _key_names(parser: HfArgumentParser) -> set[str]:
    """Every key the parser knows: dataclass fields, their `no_*` complements and flag aliases (without dashes)."""
    names = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    for action in parser._actions:
        names.add(action.dest)
        names.update(option.lstrip("-") for option in action.option_strings if option.startswith("--"))
    return names


def _check_keys(keys: Sequence[str], known: set[str], where: str) -> None:
    """Raises UnknownKeyError for the first unknown key, suggesting the closest known one."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (mm-llama train --help_keys lists every key)"
            raise UnknownKeyError(f"{where}unknown key {key!r}{hint}")


def load_recipe(path: str | Path) -> dict:
    """Reads a YAML recipe into a flat dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} not found. Pass a YAML file such as recipes/stage1.yaml.")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of argument names to values.")
    return recipe


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, MMLlamaTrainingArguments]:
    """Parses `[recipe.yaml] [--key value ...]` into the four argument objects.

    The YAML values become the parser's defaults, so any `--key value` given after the file wins. A key that is not
    an argument, in the YAML or on the command line, is an `UnknownKeyError` naming it with the closest known key.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser()
    known = _key_names(parser)
    recipe_path = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe_path, argv = argv[0], argv[1:]
        recipe = load_recipe(recipe_path)
        _check_keys(list(recipe), known, f"{recipe_path}: ")
        # argparse runs string defaults through the argument's type, so YAML's "2e-4" (a string to PyYAML) works.
        parser.set_defaults(**recipe)
        # A value in the recipe satisfies an argument that is otherwise required on the command line.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
    _check_keys([token[2:].split("=", 1)[0] for token in argv if token.startswith("--")], known, "")
    model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    return model_args, data_args, lora_args, training_args


__all__ = [
    "ModelArguments",
    "DataArguments",
    "LoraArguments",
    "MMLlamaTrainingArguments",
    "ARGUMENT_CLASSES",
    "RESUME_LATEST",
    "UnknownKeyError",
    "load_recipe",
    "parse_args",
    "recipe_parser",
]
