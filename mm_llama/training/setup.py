"""Stage set-up: load the model and processor, freeze (stage 1) or add LoRA / QLoRA (stage 2), parameter groups."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.configuration_mm_llama import MMLlamaConfig
from ..loading import PROJECTOR_MODULE, load_processor, lora_config, quantization_config
from ..model.modeling_mm_llama import MMLlamaForCausalLM
from ..model.processing_mm_llama import MMLlamaProcessor
from .arguments import LoraArguments, ModelArguments

logger = logging.getLogger(__name__)



def _model_type(path: str | Path) -> str | None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")


def freeze_for_stage1(model: MMLlamaForCausalLM) -> MMLlamaForCausalLM:
    """Freezes everything but the projector (stage 1)."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    return model


def upcast_trainable(model: nn.Module) -> None:
    """Puts trainable half-precision parameters in float32, so optimizer updates are not rounded to bf16/fp16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def set_projector_dropout(model: MMLlamaForCausalLM, probability: float | None) -> None:
    """Sets the projector's output dropout (and the config that is saved with it); None leaves it as loaded."""
    if probability is None:
        return
    model.config.projector_dropout = probability
    model.projector.dropout.p = probability


def load_stage_model(
    model_args: ModelArguments,
    lora_args: LoraArguments | None = None,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, MMLlamaProcessor]:
    """Loads the starting model of a stage and makes exactly the stage's parameters trainable.

    Stage 1: `MMLlamaForCausalLM.from_text_pretrained` on a LLaMA folder (or `from_pretrained` on an MM-LLaMA
    folder), everything frozen but the projector. Stage 2: the stage-1 folder, optionally in 4 bit, wrapped in a
    PEFT LoRA model whose `modules_to_save` is the projector.
    Returns (model, processor).
    """
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is not set: give the LLaMA folder (stage 1) or the stage-1 output "
                         "folder (stage 2) in the recipe or with --model_name_or_path.")
    path = model_args.model_name_or_path
    if not Path(path).exists():
        raise FileNotFoundError(f"model_name_or_path {path} does not exist; pass a local model folder.")
    if model_args.stage == 1:
        model = _load_stage1_model(model_args, gradient_checkpointing)
    else:
        model = load_stage2_model(model_args, lora_args, gradient_checkpointing, gradient_checkpointing_kwargs)

    processor_path = model_args.processor_name_or_path or path
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    processor = load_processor(processor_path, base.config.tokens_per_media)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Stage %d: %d trainable parameters of %d (%.3f%%).", model_args.stage, trainable, total,
                100 * trainable / max(total, 1))
    return model, processor


def _load_stage1_model(model_args: ModelArguments, gradient_checkpointing: bool) -> MMLlamaForCausalLM:
    """Stage 1's model: an MM-LLaMA folder as saved, or a new projector over a LLaMA folder; all but the projector
    frozen."""
    path, dtype = model_args.model_name_or_path, model_args.dtype  # dtype: a name, taken as is by from_pretrained
    if _model_type(path) == MMLlamaConfig.model_type:
        model = MMLlamaForCausalLM.from_pretrained(path, dtype=dtype,
                                                   attn_implementation=model_args.attn_implementation)
        if model_args.projector_path:
            model.load_projector(model_args.projector_path)
        set_projector_dropout(model, model_args.projector_dropout)
    else:
        model = MMLlamaForCausalLM.from_text_pretrained(
            path,
            dtype=None if dtype == "auto" else dtype,
            attn_implementation=model_args.attn_implementation,
            projector_path=model_args.projector_path,
            projector_type=model_args.projector_type,
            projector_bias=model_args.projector_bias,
            projector_dropout=model_args.projector_dropout or 0.0,
            media_embed_dim=model_args.media_embed_dim,
            tokens_per_media=model_args.tokens_per_media,
        )
    freeze_for_stage1(model)
    if model_args.upcast_trainable_params:
        upcast_trainable(model)
    if gradient_checkpointing:
        # The frozen token embeddings give outputs without grad; checkpointed blocks need an input that has one.
        model.enable_input_require_grads()
    return model


def load_stage2_model(model_args: ModelArguments, lora_args: LoraArguments | None, gradient_checkpointing: bool,
                       gradient_checkpointing_kwargs: dict[str, Any] | None) -> nn.Module:
    """Stage 2's model: the stage-1 folder, optionally in 4 bit, in a PEFT LoRA model that trains the projector in
    full (`modules_to_save`). Public for the GPU benchmark, which measures exactly what training sets up."""
    path = model_args.model_name_or_path
    if _model_type(path) != MMLlamaConfig.model_type:
        raise ValueError(
            f"Stage 2 starts from a stage-1 output (an MM-LLaMA folder), but {path} is not one "
            f"(config model_type {_model_type(path)!r}). Run stage 1 first and pass its output_dir."
        )
    if lora_args is None:
        raise ValueError("Stage 2 needs LoRA arguments.")
    from peft import get_peft_model, prepare_model_for_kbit_training

    load_kwargs: dict[str, Any] = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation}
    if model_args.load_in_4bit:
        load_kwargs["quantization_config"] = quantization_config(
            compute_dtype=model_args.bnb_4bit_compute_dtype, quant_type=model_args.bnb_4bit_quant_type,
            double_quant=model_args.bnb_4bit_use_double_quant)
    model = MMLlamaForCausalLM.from_pretrained(path, **load_kwargs)
    set_projector_dropout(model, model_args.projector_dropout)
    if model_args.load_in_4bit:
        # Freezes the base, upcasts the non-quantized weights to fp32 and, with checkpointing, makes the
        # embedding outputs require grad.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(
        model, r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules, bias=lora_args.lora_bias))
    if model_args.upcast_trainable_params:
        upcast_trainable(model)
    return model


def is_projector_parameter(name: str) -> bool:
    """Whether a parameter name (plain or PEFT-wrapped model) belongs to the projector."""
    return f"{PROJECTOR_MODULE}." in name and not name.startswith("vision_tower")


def optimizer_param_groups(
    model: nn.Module,
    weight_decay: float,
    decay_parameter_names: set[str] | list[str],
    projector_learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters split by (projector or not) x (weight decay or not).

    The projector groups get `projector_learning_rate` when given (LLaVA-1.5 LoRA: 2e-5 for the projector, 2e-4 for
    LoRA); the others take the optimizer's default learning rate. Non-projector groups come first so that the Trainer's logged `learning_rate` is the main one. Empty
    groups are left out.
    """
    decay = set(decay_parameter_names)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((is_projector_parameter(name), name in decay), []).append(param)
    result = []
    for is_projector in (False, True):
        for decays in (True, False):
            params = groups.get((is_projector, decays))
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
            if is_projector and projector_learning_rate is not None:
                group["lr"] = projector_learning_rate
            result.append(group)
    return result


__all__ = [
    "freeze_for_stage1",
    "is_projector_parameter",
    "load_stage_model",
    "optimizer_param_groups",
    "set_projector_dropout",
    "upcast_trainable",
]
