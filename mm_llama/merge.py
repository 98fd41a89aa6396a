"""Checkpoint conversion between training stages, with PEFT doing the LoRA arithmetic.

- Stage-2 output (a PEFT adapter folder: LoRA on the language model's q_proj/v_proj, the projector saved whole via
  `modules_to_save`, `base_model_name_or_path` = the stage-1 folder, processor files alongside)
  -> one merged `MMLlamaForCausalLM` folder (`merge_and_unload`), loadable with `AutoModelForCausalLM` and with
  `trust_remote_code=True` where `mm_llama` is not installed.
- Stage-1 output (a full `MMLlamaForCausalLM` folder + processor) -> the stage-2 starting point: a fresh LoRA adapter
  folder over it (LoRA B = 0, so it computes exactly the stage-1 model) with the projector as a trainable module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers import AutoModelForCausalLM

from .loading import (LORA_DEFAULTS, is_adapter_folder, load_processor, load_stage2_model, lora_config,
                      resolve_base_model)

ConversionMode = Literal["auto", "merge", "stage2-start"]


def _copy_processor(source_dirs: Sequence[str | Path], output_dir: Path) -> None:
    """Saves the processor of the first folder that has one into `output_dir`."""
    errors = []
    for source in source_dirs:
        try:
            load_processor(source).save_pretrained(str(output_dir))
            return
        except (FileNotFoundError, OSError) as err:
            errors.append(str(err))
    raise FileNotFoundError(
        "No processor found next to the checkpoint or its base model: " + " | ".join(errors)
    )


def merge_lora_checkpoint(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    push_to_hub: str | None = None,
    private: bool = True,
) -> Path:
    """Stage-2 output -> one merged `MMLlamaForCausalLM` folder (safetensors + remote code + processor).

    Args:
        adapter_dir: stage-2 output folder.
        output_dir: where the merged model goes (created; must not be the adapter folder).
        base_model: stage-1 folder, when the one recorded in the adapter config is not available here.
        dtype: dtype to merge and save in (default: the base checkpoint's). Merging is done unquantised even when
            stage 2 trained a 4-bit QLoRA, so the merged weights are exact.
        push_to_hub: optional Hub repo id to upload the merged folder to.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if output_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"Write the merged model to a new folder, not into the adapter folder {adapter_dir}.")
    load_kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    model = load_stage2_model(adapter_dir, base_model=base_model, merge=True, **load_kwargs)
    leftovers = [name for name, _ in model.named_parameters() if "lora_" in name or "modules_to_save" in name]
    if leftovers:  # would mean PEFT did not unwrap a layer; the folder would not load as MMLlamaForCausalLM
        raise RuntimeError(f"Merging left PEFT parameters behind: {leftovers[:5]}")
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    _copy_processor([adapter_dir, resolve_base_model(adapter_dir, base_model)], output_dir)
    if push_to_hub:
        push_folder_to_hub(output_dir, push_to_hub, private=private, message="Upload merged MM-LLaMA model")
    return output_dir


def init_stage2_from_stage1(
    stage1_dir: str | Path,
    output_dir: str | Path,
    *,
    lora_r: int = LORA_DEFAULTS.r,
    lora_alpha: float = LORA_DEFAULTS.alpha,
    lora_dropout: float = LORA_DEFAULTS.dropout,
    target_modules: Sequence[str] = LORA_DEFAULTS.target_modules,
) -> Path:
    """Stage-1 output -> the stage-2 starting point: a PEFT adapter folder over the stage-1 model with freshly
    initialised LoRA (B = 0, so the model still computes exactly the stage-1 function) on the language model's
    q_proj/v_proj and the projector as a fully trained module (`modules_to_save`), plus the processor.

    Stage 2 resumes from it with `PeftModel.from_pretrained(stage1_model, output_dir, is_trainable=True)`.
    """
    from peft import get_peft_model

    stage1_dir, output_dir = Path(stage1_dir), Path(output_dir)
    if not (stage1_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{stage1_dir} has no config.json: pass a stage-1 output folder (a saved MMLlamaForCausalLM)."
        )
    base = AutoModelForCausalLM.from_pretrained(str(stage1_dir), dtype="auto")
    model = get_peft_model(base, lora_config(base, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                             target_modules=target_modules))
    # Recorded as an absolute path, so the adapter finds its base from any working directory.
    model.peft_config["default"].base_model_name_or_path = str(stage1_dir.resolve())
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    _copy_processor([stage1_dir], output_dir)
    return output_dir


def convert_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    mode: ConversionMode = "auto",
    base_model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    push_to_hub: str | None = None,
    private: bool = True,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
) -> tuple[str, Path]:
    """Dispatches on the input folder: a stage-2 adapter is merged (`merge_lora_checkpoint` with base_model, dtype,
    push_to_hub, private), a stage-1 model becomes a stage-2 start (`init_stage2_from_stage1` with the LoRA options;
    unset ones are `LORA_DEFAULTS`). Options of the other mode are ignored. `dtype` may be a name ("bfloat16").

    Returns:
        (the mode that ran, the output folder)
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {input_dir} does not exist.")
    if mode == "auto":
        if is_adapter_folder(input_dir):
            mode = "merge"
        elif (input_dir / "config.json").is_file():
            mode = "stage2-start"
        else:
            raise ValueError(
                f"{input_dir} is neither a stage-2 output (adapter_config.json) nor a stage-1 output (config.json)."
            )
    if mode == "merge":
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return mode, merge_lora_checkpoint(input_dir, output_dir, base_model=base_model, dtype=dtype,
                                           push_to_hub=push_to_hub, private=private)
    if mode == "stage2-start":
        given = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
        return mode, init_stage2_from_stage1(input_dir, output_dir,
                                             **{name: value for name, value in given.items() if value is not None})
    raise ValueError(f"Unknown mode {mode!r}; use auto, merge or stage2-start.")


def push_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, message: str = "Upload") -> str:
    """Uploads a saved folder to the Hub (creating the repo); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return str(url)


__all__ = ["convert_checkpoint", "init_stage2_from_stage1", "merge_lora_checkpoint", "push_folder_to_hub"]
