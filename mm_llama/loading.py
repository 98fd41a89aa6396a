"""The one place that loads: the processor, MM-LLaMA model folders (merged, stage-1 or stage-2 adapter, optionally in
4 bit), the ImageBind vision model, and the quantization and LoRA configs that training, merging and chat share.

Folder kinds:
  - a full `MMLlamaForCausalLM` folder (stage-1 output, or a merged stage-2 model): `config.json` + weights;
  - a stage-2 output: a PEFT adapter folder (`adapter_config.json`, LoRA + projector weights, no full weights) whose
    `base_model_name_or_path` is the stage-1 folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .model.processing_mm_llama import MMLlamaProcessor

LANGUAGE_MODEL_PREFIX = "language_model."
PROJECTOR_MODULE = "projector"
# Never quantized to 4 bit: the projector (trained in full, small and precision sensitive), the LM head (output
# precision) and the vision tower; bitsandbytes' 4-bit layers are meant for the LLM's big linear layers.
FOUR_BIT_SKIP_MODULES = [PROJECTOR_MODULE, "lm_head", "vision_tower"]
FULL_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> the first CUDA GPU when there is one, else CPU; otherwise `torch.device(device)`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device} was asked for but CUDA is not available here; use --device cpu.")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A floating dtype's name ("float32", "bfloat16", "float16") or a torch.dtype -> torch.dtype; `None` -> float32 on
    CPU (half-precision matmuls are slow or unsupported there), bfloat16 on GPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return resolved


# ---------------------------------------------------------------------------------------------------- configs


def quantization_config(compute_dtype: str | torch.dtype = "bfloat16", quant_type: str = "nf4",
                        double_quant: bool = True):
    """The bitsandbytes 4-bit config of QLoRA training and 4-bit inference: the language model's linear layers in
    `quant_type` (nf4 by default, double quantization), computing in `compute_dtype`; see FOUR_BIT_SKIP_MODULES."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=FOUR_BIT_SKIP_MODULES,
    )


def lora_target_names(model: nn.Module) -> list[str]:
    """Names of the language model's linear layers that LoRA can adapt (q_proj, ..., lm_head), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name.startswith(LANGUAGE_MODEL_PREFIX) and isinstance(module, nn.Linear)})


def lora_target_regex(model: nn.Module, target_modules: Sequence[str]) -> str:
    """A PEFT `target_modules` regex that adapts the language model's layers named `target_modules` (a layer name
    such as "q_proj" or "lm_head", or a dotted suffix such as "self_attn.q_proj") and nothing in the vision tower.

    Raises ValueError naming the valid layer names when a target matches no linear layer: PEFT itself would adapt
    nothing for it, silently.
    """
    linear_names = [name for name, module in model.named_modules()
                    if name.startswith(LANGUAGE_MODEL_PREFIX) and isinstance(module, nn.Linear)]
    unknown = sorted(target for target in set(target_modules)
                     if not any(name == LANGUAGE_MODEL_PREFIX + target or name.endswith("." + target)
                                for name in linear_names))
    if unknown:
        raise ValueError(
            f"lora_target_modules {unknown} match no linear layer of the language model; valid names: "
            f"{lora_target_names(model)}."
        )
    names = "|".join(re.escape(target) for target in sorted(set(target_modules)))
    # PEFT full-matches a string target: "language_model.lm_head", "language_model.model.layers.0.self_attn.q_proj".
    return rf"{re.escape(LANGUAGE_MODEL_PREFIX)}(?:.*\.)?({names})"


@dataclass(frozen=True)
class LoraDefaults:
    """Stage 2's LoRA as our recipes set it: the one definition that `lora_config`, training's `LoraArguments`, the
    stage-2 starting point (`mm-llama merge --mode stage2-start`) and the GPU benchmark read."""

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    bias: str = "none"


LORA_DEFAULTS = LoraDefaults()


def lora_config(model: nn.Module, r: int = LORA_DEFAULTS.r, alpha: float = LORA_DEFAULTS.alpha,
                dropout: float = LORA_DEFAULTS.dropout, target_modules: Sequence[str] = LORA_DEFAULTS.target_modules,
                bias: str = LORA_DEFAULTS.bias):
    """PEFT `LoraConfig` of stage 2: adapters on the language model's `target_modules` (checked against `model`), the
    projector trained in full (`modules_to_save`). Used by training and by the stage-2 starting point."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=lora_target_regex(model, target_modules),
        modules_to_save=[PROJECTOR_MODULE],
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------- processor


def load_processor(path: str | Path, tokens_per_media: int | None = None) -> MMLlamaProcessor:
    """The `MMLlamaProcessor` saved in `path` (training saves it in every output folder), or a new one over LLaMA's
    `tokenizer.model` in `path`; checks that it inserts `tokens_per_media` placeholders when that is given."""
    processor = MMLlamaProcessor.from_pretrained(str(path))
    if tokens_per_media is not None and processor.tokens_per_media != tokens_per_media:
        raise ValueError(
            f"The processor in {path} inserts {processor.tokens_per_media} placeholders per media item but the "
            f"model expects tokens_per_media={tokens_per_media}."
        )
    return processor


# ---------------------------------------------------------------------------------------------------- models


def is_adapter_folder(path: str | Path) -> bool:
    """True for a PEFT adapter folder (stage-2 output): `adapter_config.json` and no full model weights (a config
    copy next to the adapter does not make it a full model)."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not any((path / name).is_file() for name in FULL_WEIGHTS_FILES)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of a stage-2 output folder, as a dict."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {adapter_dir} is not a stage-2 (PEFT LoRA) output folder. A stage-2 run saves "
            "adapter_config.json and adapter_model.safetensors there."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_base_model(adapter_dir: str | Path, base_model: str | Path | None = None) -> str:
    """The stage-1 model a stage-2 adapter was trained on: `base_model` if given, else the adapter config's
    `base_model_name_or_path` (a relative path is tried from the working directory, then from the adapter folder)."""
    if base_model is not None:
        if not Path(base_model).is_dir():
            raise FileNotFoundError(f"Base model folder {base_model} does not exist; pass the stage-1 output folder.")
        return str(base_model)
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(
            f"{Path(adapter_dir) / 'adapter_config.json'} does not name its base model; pass --base_model STAGE1_DIR."
        )
    for candidate in (Path(recorded), Path(adapter_dir) / recorded):
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(
        f"{Path(adapter_dir) / 'adapter_config.json'} names base model {recorded!r}, which is not a folder here "
        "(it was probably trained on another machine). Pass --base_model STAGE1_DIR with the stage-1 output."
    )


def load_stage2_model(adapter_dir: str | Path, *, base_model: str | Path | None = None, merge: bool = True,
                      **load_kwargs: Any) -> nn.Module:
    """Loads the stage-1 base model and applies a stage-2 adapter.

    Args:
        adapter_dir: the stage-2 output folder.
        base_model: stage-1 folder, overriding the adapter config's `base_model_name_or_path`.
        merge: fold the LoRA weights into the base weights (`merge_and_unload`) and return a plain
            `MMLlamaForCausalLM`; otherwise return the `PeftModel` (e.g. over a 4-bit base).
        **load_kwargs: passed to `from_pretrained` (dtype, quantization_config, device_map).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_base_model(adapter_dir, base_model), **load_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if merge:
        # The projector's `modules_to_save` copy replaces the stage-1 projector; LoRA deltas are added to the weights.
        model = model.merge_and_unload()
    return model.eval()


def load_model(
    model_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    base_model: str | Path | None = None,
    processor_path: str | Path | None = None,
) -> tuple[nn.Module, MMLlamaProcessor]:
    """Loads an MM-LLaMA model and its processor for inference.

    Args:
        model_path: a full `MMLlamaForCausalLM` folder (stage-1 output or a merged stage-2 model), or a stage-2 PEFT
            adapter folder (its LoRA is merged on load, except in 4 bit where it stays unmerged).
        device: "cpu", "cuda", "cuda:1", or None/"auto".
        dtype: "float32" / "bfloat16" / "float16" (the compute dtype in 4 bit); None picks per device.
        load_in_4bit: quantise the language model's linear layers with bitsandbytes nf4 (double quantisation).
        base_model: for an adapter folder, the stage-1 folder to use instead of the one recorded in it.
        processor_path: folder holding the processor, when it is not saved with the model.
    Returns:
        (model in eval mode on `device`, processor)
    """
    from transformers import AutoModelForCausalLM

    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(f"Model folder {model_path} does not exist; pass a trained or merged MM-LLaMA folder.")
    adapter = is_adapter_folder(model_path)
    if not adapter and not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_path} has neither config.json (a full model) nor adapter_config.json (a stage-2 adapter)."
        )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    processor = load_processor(processor_path or model_path)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        load_kwargs["quantization_config"] = quantization_config(compute_dtype=torch_dtype)
        # Quantised weights are created on their device while loading; they cannot be moved afterwards.
        load_kwargs["device_map"] = {"": device}
    if adapter:
        model = load_stage2_model(model_path, base_model=base_model, merge=not load_in_4bit, **load_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **load_kwargs)
    if not load_in_4bit:
        model.to(device)
    return model.eval(), processor


IMAGEBIND_MODEL_TYPES = {"vision": "imagebind_vision_model", "audio": "imagebind_audio_model"}


def imagebind_folder(path: str | Path, modality: str = "vision") -> Path | None:
    """The folder of the ImageBind `modality` model ("vision" or "audio") in `path`: `path` itself (a
    `convert-imagebind --modality vision|audio` output) or `path/<modality>` (a `--modality all` output); None."""
    path = Path(path)
    for folder in (path, path / modality):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == (
                IMAGEBIND_MODEL_TYPES[modality]):
            return folder
    return None


def load_imagebind(path: str | Path, *, modality: str = "vision", device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None) -> nn.Module:
    """The converted ImageBind `modality` model in `path` (see `imagebind_folder`), in eval mode on `device` in `dtype`
    (None: float32 on CPU, bfloat16 on GPU)."""
    from .imagebind import ImageBindAudioModel, ImageBindVisionModel

    folder = imagebind_folder(path, modality)
    if folder is None:
        raise FileNotFoundError(
            f"{path} holds no ImageBind {modality} model (a config.json of model_type "
            f"{IMAGEBIND_MODEL_TYPES[modality]!r}, there or in {modality}/); convert Meta's checkpoint with "
            f"`mm-llama convert-imagebind --modality {modality}` (or all) and pass the output folder."
        )
    model_class = ImageBindVisionModel if modality == "vision" else ImageBindAudioModel
    device = resolve_device(device)
    return model_class.from_pretrained(str(folder), dtype=resolve_dtype(dtype, device)).to(device).eval()


__all__ = [
    "FOUR_BIT_SKIP_MODULES",
    "IMAGEBIND_MODEL_TYPES",
    "LANGUAGE_MODEL_PREFIX",
    "PROJECTOR_MODULE",
    "imagebind_folder",
    "is_adapter_folder",
    "load_imagebind",
    "load_model",
    "load_processor",
    "load_stage2_model",
    "LORA_DEFAULTS",
    "LoraDefaults",
    "lora_config",
    "lora_target_names",
    "lora_target_regex",
    "quantization_config",
    "read_adapter_config",
    "resolve_base_model",
    "resolve_device",
    "resolve_dtype",
]
