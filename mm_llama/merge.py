"""Checkpoint conversion between training stages, with PEFT doing the LoRA arithmetic.

- Stage-2 output (a PEFT adapter folder: LoRA on the language model's q_proj/v_proj, the projector saved whole via
  `modules_to_save`, `base_model_name_or_path` = the stage-1 folder, processor files alongside)
  -> one merged `MMLlamaForCausalLM` folder (`merge_and_unload`), loadable with `AutoModelForCausalLM` and with
  `trust_remote_code=True` where `mm_llama` is not installed.
- Stage-1 output (a full `MMLlamaForCausalLM` folder + processor) -> the stage-2 starting point: a fresh LoRA adapter
  folder over it (LoRA B = 0, so it computes exactly the stage-1 model) with the projector as a trainable module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import AutoModelForCausalLM

from .inference import is_adapter_folder, load_processor

# Only the language model's attention projections: the ImageBind vision tower has q_proj/v_proj layers too, and a
# plain ["q_proj", "v_proj"] list would put LoRA on it as well. PEFT full-matches a string target as a regex.
LANGUAGE_MODEL_LORA_TARGETS = r"language_model\..*\.(q_proj|v_proj)"

ConversionMode = Literal["auto", "merge", "stage2-start"]


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


def load_stage2_model(
    adapter_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    merge: bool = True,
    **load_kwargs: Any,
) -> torch.nn.Module:
    """Loads the stage-1 base model and applies a stage-2 adapter.

    Args:
        adapter_dir: the stage-2 output folder.
        base_model: stage-1 folder, overriding the adapter config's `base_model_name_or_path`.
        merge: fold the LoRA weights into the base weights (`merge_and_unload`) and return a plain
            `MMLlamaForCausalLM`; otherwise return the `PeftModel` (e.g. over a 4-bit base).
        **load_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (dtype, quantization_config, device_map).
    """
    from peft import PeftModel

    base_path = resolve_base_model(adapter_dir, base_model)
    base = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if merge:
        # The projector's `modules_to_save` copy replaces the stage-1 projector; LoRA deltas are added to q/v_proj.
        model = model.merge_and_unload()
    return model.eval()


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
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] = LANGUAGE_MODEL_LORA_TARGETS,
) -> Path:
    """Stage-1 output -> the stage-2 starting point: a PEFT adapter folder over the stage-1 model with freshly
    initialised LoRA (B = 0, so the model still computes exactly the stage-1 function) on the language model's
    q_proj/v_proj and the projector as a fully trained module (`modules_to_save`), plus the processor.

    Stage 2 resumes from it with `PeftModel.from_pretrained(stage1_model, output_dir, is_trainable=True)`.
    """
    from peft import LoraConfig, get_peft_model

    stage1_dir, output_dir = Path(stage1_dir), Path(output_dir)
    if not (stage1_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{stage1_dir} has no config.json: pass a stage-1 output folder (a saved MMLlamaForCausalLM)."
        )
    base = AutoModelForCausalLM.from_pretrained(str(stage1_dir), dtype="auto")
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        modules_to_save=["projector"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
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
    **kwargs: Any,
) -> tuple[str, Path]:
    """Dispatches on the input folder: a stage-2 adapter is merged, a stage-1 model becomes a stage-2 start.

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
        return mode, merge_lora_checkpoint(input_dir, output_dir, **kwargs)
    if mode == "stage2-start":
        return mode, init_stage2_from_stage1(input_dir, output_dir, **kwargs)
    raise ValueError(f"Unknown mode {mode!r}; use auto, merge or stage2-start.")


def push_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, message: str = "Upload") -> str:
    """Uploads a saved folder to the Hub (creating the repo); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return str(url)


__all__ = [
    "LANGUAGE_MODEL_LORA_TARGETS",
    "convert_checkpoint",
    "init_stage2_from_stage1",
    "load_stage2_model",
    "merge_lora_checkpoint",
    "push_folder_to_hub",
    "read_adapter_config",
    "resolve_base_model",
]
