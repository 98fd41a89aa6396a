"""--resume_from_checkpoint continues exactly: a run stopped at step k and resumed ends with the weights of an
uninterrupted run (stage 1 with trainable-only checkpoints, stage 2 with LoRA dropout, so RNG state matters)."""

import pytest
import torch
from transformers import TrainerCallback

from mm_llama.training import TRAINABLE_WEIGHTS_NAME, build_trainer, parse_args
from training_utils import (  # noqa: F401  (fixtures)
    dataset_dir,
    llama_dir,
    single_torch_thread,
    stage1_args,
    stage1_dir,
    stage2_args,
)

TOTAL_STEPS, STOP_AT = 6, 3


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after `step` (its checkpoint is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def run_and_resume(make_args, tmp_path):
    common = dict(max_steps=TOTAL_STEPS, save_strategy="steps", save_steps=STOP_AT, lr_scheduler_type="cosine",
                  warmup_steps=2)
    straight = build_trainer(*parse_args(make_args(tmp_path / "straight", **common)))
    straight.train()

    interrupted = build_trainer(*parse_args(make_args(tmp_path / "resumed", **common)))
    interrupted.add_callback(StopAt(STOP_AT))
    interrupted.train()
    assert interrupted.state.global_step == STOP_AT
    checkpoint = tmp_path / "resumed" / f"checkpoint-{STOP_AT}"
    resumed = build_trainer(*parse_args(make_args(tmp_path / "resumed", resume_from_checkpoint=checkpoint, **common)))
    # A fresh model whose trained weights differ from the checkpoint's until it is loaded.
    assert any(not torch.equal(a, b) for a, b in zip(trainable_weights(resumed.model).values(),
                                                     trainable_weights(interrupted.model).values()))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == TOTAL_STEPS

    expected, got = trainable_weights(straight.model), trainable_weights(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    return checkpoint


def test_stage1_resume_gives_the_same_weights(llama_dir, dataset_dir, tmp_path):
    checkpoint = run_and_resume(lambda out, **kw: stage1_args(llama_dir, [dataset_dir], out, **kw), tmp_path)
    assert (checkpoint / TRAINABLE_WEIGHTS_NAME).is_file() and not (checkpoint / "model.safetensors").exists()


def test_stage2_resume_gives_the_same_weights(stage1_dir, dataset_dir, tmp_path):
    checkpoint = run_and_resume(
        lambda out, **kw: stage2_args(stage1_dir, [dataset_dir], out, lora_dropout=0.3, **kw), tmp_path)
    assert (checkpoint / "adapter_model.safetensors").is_file()


def test_resume_from_a_checkpoint_of_another_model_is_an_error(llama_dir, dataset_dir, stage1_dir, tmp_path):
    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path / "a", max_steps=1,
                                                    save_strategy="steps", save_steps=1)))
    trainer.train()
    from safetensors.torch import save_file

    save_file({"not.a.parameter": torch.zeros(1)}, str(tmp_path / "a" / "checkpoint-1" / TRAINABLE_WEIGHTS_NAME))
    other = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path / "a", max_steps=2)))
    with pytest.raises(ValueError, match="not.a.parameter"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
