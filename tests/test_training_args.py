"""Recipe parsing: YAML + command-line overrides, unknown keys, the shipped recipes and accelerate configs."""

from pathlib import Path

import pytest
import yaml

from mm_llama.training import parse_args
from mm_llama.training.run import resume_argument

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(path: Path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_command_line_overrides_the_recipe(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"learning_rate": "2e-4", "lora_r": 8, "dataset_paths": ["a", "b"],
                                         "output_dir": str(tmp_path / "out"), "prompt_loss_weight": 0.05})
    model_args, data_args, lora_args, training_args = parse_args([recipe, "--learning_rate", "1e-4", "--lora_r", "4"])
    assert training_args.learning_rate == 1e-4 and lora_args.lora_r == 4
    assert data_args.dataset_paths == ["a", "b"] and data_args.prompt_loss_weight == 0.05
    _, _, lora_args, training_args = parse_args([recipe])
    assert training_args.learning_rate == 2e-4 and lora_args.lora_r == 8  # YAML's "2e-4" string becomes a float


def test_unknown_recipe_key_is_an_error_naming_it(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"learning_rate": 1e-4, "lerning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"lerning_rate") as error:
        parse_args([recipe])
    assert "r.yaml" in str(error.value)


def test_unknown_command_line_flag_is_an_error(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="lerning_rate"):
        parse_args([recipe, "--lerning_rate", "1e-3"])


def test_missing_recipe_and_invalid_values_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_args([str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="remove_unused_columns"):
        parse_args([write(tmp_path / "r.yaml", {"remove_unused_columns": True, "output_dir": str(tmp_path)})])
    with pytest.raises(ValueError, match="stage: 2"):
        parse_args([write(tmp_path / "q.yaml", {"load_in_4bit": True, "stage": 1, "output_dir": str(tmp_path)})])


def test_shipped_recipes_parse_with_their_values():
    overrides = ["--use_cpu", "true"]  # bf16 recipes are for GPUs; parsing them here needs use_cpu
    model, data, _, training = parse_args([str(RECIPES / "stage1.yaml"), *overrides])
    assert model.stage == 1 and data.max_seq_len == 512 and data.prompt_loss_weight == 0
    assert training.learning_rate == 2e-4 and training.lr_scheduler_type == "cosine" and training.warmup_steps > 0
    assert training.num_train_epochs == 3 and training.per_device_train_batch_size == 8
    assert training.gradient_accumulation_steps == 16 and training.bf16 and training.report_to == ["tensorboard"]

    model, data, lora, training = parse_args([str(RECIPES / "stage2.yaml"), *overrides])
    assert model.stage == 2 and not model.load_in_4bit and len(data.dataset_paths) == 2
    assert lora.lora_r == 64 and lora.lora_dropout == 0.05 and set(lora.lora_target_modules) == {"q_proj", "v_proj"}
    assert training.projector_learning_rate == 2e-5 and data.prompt_loss_weight == 0.05

    model, _, _, training = parse_args([str(RECIPES / "stage2_qlora.yaml"), *overrides])
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.bnb_4bit_use_double_quant
    assert training.optim.value.startswith("paged_adamw") and training.activation_checkpointing


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / "accelerate_configs" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"


def test_resume_argument():
    assert resume_argument("latest") is True and resume_argument("True") is True
    assert resume_argument("out/checkpoint-3") == "out/checkpoint-3" and resume_argument(None) is None


def test_lora_defaults_have_one_definition():
    """A recipe without LoRA keys, `lora_config` and the stage-2 starting point all take loading.LORA_DEFAULTS."""
    import inspect
    from dataclasses import astuple

    from mm_llama.loading import LORA_DEFAULTS, lora_config
    from mm_llama.merge import init_stage2_from_stage1
    from mm_llama.training import LoraArguments

    recipe = LoraArguments()
    assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout, tuple(recipe.lora_target_modules),
            recipe.lora_bias) == astuple(LORA_DEFAULTS)
    assert recipe.lora_target_modules is not LoraArguments().lora_target_modules  # each run its own list
    config = inspect.signature(lora_config).parameters
    assert tuple(config[name].default for name in ("r", "alpha", "dropout", "target_modules", "bias")) == astuple(
        LORA_DEFAULTS)
    start = inspect.signature(init_stage2_from_stage1).parameters
    assert tuple(start[name].default for name in ("lora_r", "lora_alpha", "lora_dropout", "target_modules")) == astuple(
        LORA_DEFAULTS)[:4]
