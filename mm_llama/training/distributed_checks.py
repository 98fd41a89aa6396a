"""Recipe x launch-configuration combinations that cannot work, refused before anything is loaded.

`check_distributed_compatibility` reads how the run is launched (`accelerate launch --config_file ...` exports
ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_ZERO_STAGE / FSDP_ACTIVATION_CHECKPOINTING;
TrainingArguments' own `fsdp` / `fsdp_config` / `deepspeed` say the same from the recipe) and raises a ValueError
that names the conflict and the fix, instead of a failure deep inside the first step or the first checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCELERATE_CONFIGS = "recipes/accelerate_configs"


@dataclass
class LaunchSetup:
    """How the run is distributed."""

    fsdp: bool = False
    fsdp_activation_checkpointing: bool = False
    deepspeed_zero_stage: int | None = None  # None: no DeepSpeed


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _deepspeed_stage(config: Any) -> int | None:
    """ZeRO stage of TrainingArguments.deepspeed (a dict or a JSON file path); 0 when the config names none."""
    if config is None or config == "":
        return None
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            return 0  # TrainingArguments reports a missing file itself
        config = json.loads(path.read_text(encoding="utf-8"))
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def launch_setup(training_args: Any, environ: Mapping[str, str] | None = None) -> LaunchSetup:
    """The FSDP / DeepSpeed set-up of a run, from the accelerate launcher's environment and the TrainingArguments."""
    environ = os.environ if environ is None else environ
    fsdp_config = getattr(training_args, "fsdp_config", None)
    fsdp_config = fsdp_config if isinstance(fsdp_config, dict) else {}
    fsdp = _true(environ.get("ACCELERATE_USE_FSDP", "false")) or bool(getattr(training_args, "fsdp", None))
    checkpointing = _true(environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false")) or _true(
        fsdp_config.get("activation_checkpointing", fsdp_config.get("fsdp_activation_checkpointing", False)))
    stage = None
    if _true(environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    recipe_stage = _deepspeed_stage(getattr(training_args, "deepspeed", None))
    if recipe_stage is not None:
        stage = recipe_stage
    return LaunchSetup(fsdp=fsdp, fsdp_activation_checkpointing=fsdp and checkpointing, deepspeed_zero_stage=stage)


def check_distributed_compatibility(
    model_args: Any, training_args: Any, data_args: Any = None, environ: Mapping[str, str] | None = None
) -> LaunchSetup:
    """Raises ValueError for a recipe / launch combination that cannot train; returns the set-up otherwise.

    Refused:
      - QLoRA (load_in_4bit) under FSDP or DeepSpeed ZeRO-3: both shard parameters as flat tensors of one float
        dtype, but bitsandbytes stores 4-bit weights as uint8 unless `bnb_4bit_quant_storage` is set to that float
        dtype (which these recipes do not set);
      - activation checkpointing requested twice (the recipe's `activation_checkpointing` and the FSDP config's
        `fsdp_activation_checkpointing`): the layers would be wrapped twice;
      - packing (DataArguments.packing) with `train_sampling_strategy: group_by_length`: packed rows are all about
        max_seq_len long, so grouping them sorts nothing and costs a pass over the data.
    """
    setup = launch_setup(training_args, environ)
    four_bit = bool(getattr(model_args, "load_in_4bit", False))
    quant_storage = getattr(model_args, "bnb_4bit_quant_storage", None)
    storage_is_float = quant_storage not in (None, "uint8")
    if four_bit and not storage_is_float:
        if setup.fsdp:
            raise ValueError(
                "QLoRA (load_in_4bit: true) cannot run under FSDP with these recipes: FSDP shards parameters as flat "
                "float tensors, but the 4-bit weights are stored as uint8 (bnb_4bit_quant_storage). Launch with "
                f"{ACCELERATE_CONFIGS}/ddp.yaml (each GPU holds the ~4 GB 4-bit model) or deepspeed_zero2.yaml, or "
                "train stage 2 without load_in_4bit under fsdp.yaml."
            )
        if setup.deepspeed_zero_stage == 3:
            raise ValueError(
                "QLoRA (load_in_4bit: true) cannot run under DeepSpeed ZeRO-3 with these recipes: ZeRO-3 partitions "
                "parameters as float tensors, but the 4-bit weights are stored as uint8 (bnb_4bit_quant_storage). "
                f"Launch with {ACCELERATE_CONFIGS}/deepspeed_zero2.yaml or ddp.yaml instead."
            )
    if setup.fsdp_activation_checkpointing and getattr(training_args, "activation_checkpointing", False):
        raise ValueError(
            "Activation checkpointing is requested twice: by the recipe (activation_checkpointing: true) and by the "
            "FSDP config (fsdp_activation_checkpointing: true). Keep one: remove the recipe key, or set "
            f"fsdp_activation_checkpointing: false in {ACCELERATE_CONFIGS}/fsdp.yaml."
        )
    packing = data_args is not None and getattr(data_args, "packing", False)
    if packing and str(getattr(training_args, "train_sampling_strategy", "")) == "group_by_length":
        raise ValueError(
            "packing: true with train_sampling_strategy: group_by_length: packed rows all have about max_seq_len "
            "tokens, so length grouping has nothing to group. Set train_sampling_strategy: random."
        )
    return setup


__all__ = ["LaunchSetup", "check_distributed_compatibility", "launch_setup"]
