"""Recipes: recipes/original/* reproduce the original MM-LLaMA's settings value for value (its configs pretrain.py and
finetune.py, as stated in issue 11), the learning-rate schedule is checked by stepping a real optimizer, every recipe
parses, and the original recipes train end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from mm_llama.training import parse_args
from training_utils import MEDIA_DIM, dataset_dir, llama_dir, single_torch_thread  # noqa: F401  (fixtures)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# The original's settings (issue 11, from its mm_llama/configs/pretrain.py and finetune.py).
ORIGINAL = {
    1: dict(init_lr=2e-5, max_lr=2e-4, min_lr=2e-5, warmup_ratio=0.02, grad_clip=10.0, batch=8, accum=16, epochs=3,
            projector_dropout=0.1, val_interval=200, val_samples=40 * 30, ckpt_interval=200, steps=4600,
            prompt_loss_weight=0.0),
    2: dict(init_lr=5e-5, max_lr=5e-4, min_lr=1e-4, warmup_ratio=0.015, grad_clip=0.0, batch=2, accum=16, epochs=3,
            projector_dropout=0.0, val_interval=400, val_samples=40 * 30, ckpt_interval=400, steps=6805,
            prompt_loss_weight=0.05),
}


def parse_recipe(path: Path):
    """The recipe's arguments as on a GPU machine; `--use_cpu` only lets bf16 recipes parse on this CPU box."""
    return parse_args([str(path), "--use_cpu", "true"])


def original_recipe(stage: int):
    return parse_recipe(RECIPES / "original" / f"stage{stage}.yaml")


@pytest.mark.parametrize("stage", [1, 2])
def test_original_recipes_reproduce_every_value_of_the_original(stage):
    model_args, data_args, lora_args, args = original_recipe(stage)
    expected = ORIGINAL[stage]
    assert model_args.stage == stage
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay) == (0.9, 0.95, 1e-8, 0.0)
    assert args.max_grad_norm == expected["grad_clip"]  # 0 disables clipping in the Trainer
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (expected["batch"],
                                                                                   expected["accum"])
    assert args.num_train_epochs == expected["epochs"] and args.seed == 127
    assert model_args.projector_dropout == expected["projector_dropout"]
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == (
        "steps", expected["val_interval"], "steps", expected["ckpt_interval"])
    assert args.per_device_eval_batch_size * 40 == data_args.max_eval_samples == expected["val_samples"]
    assert (data_args.max_seq_len, data_args.truncation, data_args.train_on) == (512, "drop", "last")
    assert data_args.prompt_loss_weight == expected["prompt_loss_weight"]
    assert args.load_best_model_at_end and args.metric_for_best_model == "token_accuracy" and args.greater_is_better
    assert args.learning_rate == expected["max_lr"] and args.bf16
    if stage == 1:
        assert model_args.projector_type == "linear" and model_args.projector_bias is False
    else:
        assert lora_args.lora_r == 64 and lora_args.lora_alpha / lora_args.lora_r == 1.0
        assert lora_args.lora_dropout == 0.05 and sorted(lora_args.lora_target_modules) == ["q_proj", "v_proj"]
        assert args.projector_learning_rate is None  # LoRA and projector alike


@pytest.mark.parametrize("stage", [1, 2])
def test_original_learning_rate_schedule_on_a_real_optimizer(stage):
    _, _, _, args = original_recipe(stage)
    expected = ORIGINAL[stage]
    total = expected["steps"]
    warmup = args.get_warmup_steps(total)
    # The original takes int(ratio x steps); transformers rounds up: at most one warm-up step more.
    assert 0 <= warmup - int(expected["warmup_ratio"] * total) <= 1
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(expected["init_lr"])  # warm-up starts at init_lr ...
    assert rates[warmup - 1] == pytest.approx(expected["max_lr"])  # ... reaches max_lr at the end of the warm-up ...
    assert max(rates) == pytest.approx(expected["max_lr"])
    assert rates[-1] == pytest.approx(expected["min_lr"])  # ... and the cosine ends at min_lr
    assert all(a >= b - 1e-12 for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # monotone decay after warm-up
    assert min(rates[warmup:]) == pytest.approx(expected["min_lr"])


@pytest.mark.parametrize("recipe", sorted(str(path.relative_to(RECIPES)) for path in RECIPES.rglob("*.yaml")
                                          if "accelerate_configs" not in path.parts))
def test_every_recipe_parses(recipe):
    model_args, data_args, _, args = parse_recipe(RECIPES / recipe)
    assert model_args.stage in (1, 2) and data_args.dataset_paths and args.output_dir


PATH_KEYS = {"model_name_or_path", "dataset_paths", "output_dir", "projector_path"}


def test_our_recipes_say_where_they_differ_from_the_original():
    """Every key of our recipes whose value differs from the original's carries an "original: ..." comment (on its
    line or the comment lines just below it), and no comment claims the original's settings wholesale."""
    for name in ("stage1.yaml", "stage2.yaml", "stage2_qlora.yaml"):
        text = (RECIPES / name).read_text()
        assert "the original's hyper-parameters" not in text
        ours = parse_recipe(RECIPES / name)
        original = original_recipe(1 if name == "stage1.yaml" else 2)
        lines = text.splitlines()
        for number, line in enumerate(lines):
            key = line.split(":", 1)[0]
            if not line or line.startswith((" ", "#")) or key in PATH_KEYS:
                continue
            mine = next(getattr(args, key) for args in ours if hasattr(args, key))
            theirs = next(getattr(args, key) for args in original if hasattr(args, key))
            if mine != theirs:
                comment = " ".join([line] + [following for following in lines[number + 1:number + 3]
                                             if following.startswith(" ")])
                assert "original:" in comment, f"{name}: {key} = {mine!r} (original {theirs!r}) without a comment"


def test_tiny_end_to_end_run_of_the_original_recipes(llama_dir, dataset_dir, tmp_path):
    """recipes/original/stage1.yaml then stage2.yaml through scripts/train.py's entry point, overriding only paths,
    sizes and steps: answer-token metrics are logged, evaluation runs, and the best checkpoint is kept and loaded."""
    from mm_llama.training import train

    sizes = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--per_device_eval_batch_size", "4", "--max_eval_samples", "8", "--max_steps", "4",
             "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--media_embed_dim", str(MEDIA_DIM),
             "--dataloader_num_workers", "0", "--max_seq_len", "128", "--report_to", "none", "--use_cpu", "true",
             "--disable_tqdm", "true"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train([str(RECIPES / "original" / "stage1.yaml"), "--model_name_or_path", str(llama_dir),
           "--dataset_paths", str(dataset_dir), "--output_dir", str(stage1), *sizes])
    train([str(RECIPES / "original" / "stage2.yaml"), "--model_name_or_path", str(stage1),
           "--dataset_paths", str(dataset_dir), "--output_dir", str(stage2), *sizes])
    for output, stage in ((stage1, 1), (stage2, 2)):
        state = json.loads((output / "trainer_state.json").read_text())
        logs = [entry for entry in state["log_history"] if "loss" in entry]
        evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
        assert logs and all({"token_accuracy", "answer_loss"} <= set(entry) for entry in logs)
        assert len(evals) == 2 and all({"eval_token_accuracy", "eval_answer_loss"} <= set(e) for e in evals)
        best = max(evals, key=lambda entry: entry["eval_token_accuracy"])
        assert state["best_metric"] == pytest.approx(best["eval_token_accuracy"])
        assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
        assert Path(state["best_model_checkpoint"]).is_dir()
    config = json.loads((stage1 / "config.json").read_text())
    assert config["projector_bias"] is False and config["projector_dropout"] == 0.1
    assert json.loads((stage2 / "adapter_config.json").read_text())["lora_alpha"] == 64


def test_an_evaluating_recipe_without_a_validation_split_fails_before_the_model_loads(llama_dir, tmp_path,
                                                                                      monkeypatch):
    from datasets import Dataset, DatasetDict

    from mm_llama.training import build_trainer, run
    from training_utils import make_rows, stage1_args

    no_validation = tmp_path / "train_only"
    DatasetDict({"train": Dataset.from_list(make_rows(4))}).save_to_disk(str(no_validation))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset check")

    monkeypatch.setattr(run, "load_stage_model", must_not_load)
    args = stage1_args(llama_dir, [no_validation], tmp_path / "out", eval_strategy="steps", eval_steps=2)
    with pytest.raises(ValueError) as error:
        build_trainer(*parse_args(args))
    assert str(error.value) == (
        f"The recipe evaluates (eval_strategy is not 'no') but {no_validation} has no 'validation' split. Rebuild it "
        "with mm-llama build-datasets (its default --validation_ratio 0.05 makes one), or set eval_strategy: 'no'.")
    with pytest.raises(FileNotFoundError, match="missing"):
        build_trainer(*parse_args(stage1_args(llama_dir, [tmp_path / "missing"], tmp_path / "out")))


def test_a_dataset_without_a_validation_split_next_to_one_with_it_adds_no_eval_rows(llama_dir, tmp_path, caplog):
    """A small dataset whose validation ratio rounds to no row (the demo's two-media set at the tiny size) trains
    with the others; the evaluation pools the validation splits there are, and the log names the one without."""
    from datasets import Dataset, DatasetDict

    from mm_llama.training import build_trainer
    from training_utils import make_rows, stage1_args

    with_validation, train_only = tmp_path / "with_validation", tmp_path / "train_only"
    DatasetDict({"train": Dataset.from_list(make_rows(4)), "validation": Dataset.from_list(make_rows(3))}
                ).save_to_disk(str(with_validation))
    DatasetDict({"train": Dataset.from_list(make_rows(2))}).save_to_disk(str(train_only))
    args = stage1_args(llama_dir, [with_validation, train_only], tmp_path / "out", eval_strategy="steps", eval_steps=2)
    with caplog.at_level("WARNING", logger="mm_llama.training.data"):
        trainer = build_trainer(*parse_args(args))
    assert len(trainer.train_dataset) == 6 and len(trainer.eval_dataset) == 3
    assert f"{train_only} has none" in caplog.text


def test_pad_to_multiple_of_reaches_the_collator_and_bad_values_are_refused(llama_dir, dataset_dir, tmp_path):
    from mm_llama.training import build_trainer
    from training_utils import stage1_args

    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path / "out")
                                        + ["--pad_to_multiple_of", "64"]))
    assert trainer.data_collator.pad_to_multiple_of == 64
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 64 == 0
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive number of tokens or null, got 0"):
        parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path / "out") + ["--pad_to_multiple_of", "0"])
