"""Stage 1 (projector only), stage 2 (LoRA + projector), QLoRA on CPU, outputs and TensorBoard logs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from mm_llama import MMLlamaForCausalLM, MMLlamaProcessor
from mm_llama.training import TRAINABLE_WEIGHTS_NAME, build_trainer, parse_args, train
from training_utils import (  # noqa: F401  (fixtures)
    dataset_dir,
    llama_dir,
    named_weights,
    single_torch_thread,
    stage1_args,
    stage1_dir,
    stage2_args,
)


def test_stage1_trains_only_the_projector_and_lowers_the_loss(llama_dir, dataset_dir, tmp_path):
    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path / "out", max_steps=12,
                                                    learning_rate=1e-2, save_strategy="steps", save_steps=6)))
    before = named_weights(trainer.model)
    first = trainer.evaluate()
    trainer.train()
    last = trainer.evaluate()
    after = named_weights(trainer.model)

    changed = {name for name in before if not torch.equal(before[name], after[name])}
    projector = {name for name in before if name.startswith("projector.")}
    assert changed == projector
    assert last["eval_loss"] < first["eval_loss"] - 0.02
    assert last["eval_token_accuracy"] > first["eval_token_accuracy"]

    # Checkpoints hold the projector and the optimizer state, not the frozen LLM.
    checkpoint = tmp_path / "out" / "checkpoint-6"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()
    assert set(load_file(checkpoint / TRAINABLE_WEIGHTS_NAME)) == projector


def test_stage1_output_is_a_full_model_folder_with_the_processor(stage1_dir, llama_dir):
    model = AutoModelForCausalLM.from_pretrained(stage1_dir)
    assert isinstance(model, MMLlamaForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(stage1_dir), MMLlamaProcessor)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    for name, weight in llama.state_dict().items():
        torch.testing.assert_close(model.language_model.state_dict()[name], weight, rtol=0, atol=0)


def test_stage2_trains_lora_and_projector_and_leaves_the_base_unchanged(stage1_dir, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    trainer = build_trainer(*parse_args(stage2_args(stage1_dir, [dataset_dir], output_dir, max_steps=4,
                                                    prompt_loss_weight=0.05)))
    model = trainer.model
    before = named_weights(model)
    trainer.train()
    trainer.save_model()
    after = named_weights(model)

    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = {name for name in before if "lora_" in name}
    trained_projector = {name for name in before if "projector.modules_to_save" in name}
    assert lora and trained_projector
    assert changed == lora | trained_projector  # every LoRA and projector weight moved, nothing else did
    assert all("q_proj" in name or "v_proj" in name for name in lora)

    # The contract with the merge script: a PEFT folder on top of the stage-1 output, projector included.
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(stage1_dir)
    assert config["modules_to_save"] == ["projector"]
    assert any("projector" in key for key in load_file(output_dir / "adapter_model.safetensors"))
    assert isinstance(AutoProcessor.from_pretrained(output_dir), MMLlamaProcessor)

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(MMLlamaForCausalLM.from_pretrained(stage1_dir), output_dir).eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected)


def test_projector_learning_rate_gets_its_own_parameter_groups(stage1_dir, dataset_dir, tmp_path):
    trainer = build_trainer(*parse_args(stage2_args(stage1_dir, [dataset_dir], tmp_path, learning_rate=1e-3,
                                                    projector_learning_rate=2e-5, weight_decay=0.1)))
    optimizer = trainer.create_optimizer()
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        group_names = [names[id(param)] for param in group["params"]]
        is_projector = ["projector" in name for name in group_names]
        assert all(is_projector) or not any(is_projector)
        assert group["lr"] == (2e-5 if is_projector[0] else 1e-3)
        seen.update(group_names)
    trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert seen == trainable
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged learning_rate is LoRA's


def test_qlora_loads_the_llm_in_4bit_and_trains_on_cpu(stage1_dir, dataset_dir, tmp_path):
    import bitsandbytes as bnb

    args = stage2_args(stage1_dir, [dataset_dir], tmp_path, max_steps=3, load_in_4bit="true",
                       bnb_4bit_compute_dtype="float32", activation_checkpointing="true",
                       activation_checkpointing_kwargs='{"use_reentrant": false}')
    trainer = build_trainer(*parse_args(args))
    base = trainer.model.get_base_model()
    q_proj = base.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    assert isinstance(base.projector.modules_to_save["default"].layers[0], torch.nn.Linear)
    assert not isinstance(base.projector.modules_to_save["default"].layers[0], bnb.nn.Linear4bit)
    before = named_weights(trainer.model)
    result = trainer.train()
    after = named_weights(trainer.model)
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("lora_B" in name for name in changed) and any("projector.modules_to_save" in name for name in changed)
    assert all("lora_" in name or "modules_to_save" in name for name in changed)


def test_tensorboard_logs_loss_accuracy_and_learning_rate(llama_dir, dataset_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "out"
    train(stage1_args(llama_dir, [dataset_dir], output_dir, max_steps=4, report_to="tensorboard",
                      eval_strategy="steps", eval_steps=2))
    event_files = list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file under output_dir/runs"
    tags = set()
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/token_accuracy", "train/learning_rate", "train/grad_norm",
            "eval/loss", "eval/token_accuracy"} <= tags
    accuracy = [event.value for event_file in event_files for event in
                _scalars(EventAccumulator(str(event_file)), "train/token_accuracy")]
    assert len(accuracy) == 4 and all(0.0 <= value <= 1.0 for value in accuracy)


def _scalars(accumulator, tag):
    accumulator.Reload()
    return accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []


def test_stage2_refuses_a_plain_llama_folder(llama_dir, dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="stage-1 output"):
        build_trainer(*parse_args(stage2_args(llama_dir, [dataset_dir], tmp_path)))


def test_lora_on_lm_head_trains_and_merges_and_unknown_targets_list_the_valid_names(stage1_dir, dataset_dir,
                                                                                   tmp_path):
    from peft import PeftModel

    from mm_llama.merge import merge_lora_checkpoint

    output_dir = tmp_path / "out"
    trainer = build_trainer(*parse_args(stage2_args(stage1_dir, [dataset_dir], output_dir, max_steps=3)
                                        + ["--lora_target_modules", "q_proj", "v_proj", "lm_head"]))
    head = {name for name, _ in trainer.model.named_parameters() if "lm_head.lora_" in name}
    assert head, "lm_head got no LoRA adapter"
    before = named_weights(trainer.model)
    trainer.train()
    trainer.save_model()
    after = named_weights(trainer.model)
    assert {name for name in head if "lora_B" in name and not torch.equal(before[name], after[name])}
    saved = load_file(output_dir / "adapter_model.safetensors")  # no copy of the unchanged head or embeddings
    assert not any("embed_tokens" in key or key.endswith("lm_head.weight") for key in saved)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "media_embeds")}
    adapter = PeftModel.from_pretrained(MMLlamaForCausalLM.from_pretrained(stage1_dir), output_dir).eval()
    merged = MMLlamaForCausalLM.from_pretrained(merge_lora_checkpoint(output_dir, tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter(**inputs).logits, rtol=1e-5, atol=1e-5)
        base_logits = MMLlamaForCausalLM.from_pretrained(stage1_dir).eval()(**inputs).logits
    assert (merged(**inputs).logits - base_logits).abs().max() > 1e-4  # the head's adapter changed the model

    with pytest.raises(ValueError, match=r"lora_target_modules \['qproj'\] match no linear layer of the language "
                                         r"model; valid names: \['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                         r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        build_trainer(*parse_args(stage2_args(stage1_dir, [dataset_dir], tmp_path / "bad")
                                  + ["--lora_target_modules", "qproj", "v_proj"]))


def test_progress_bar_shows_loss_and_accuracy_instead_of_printing_every_log(llama_dir, dataset_dir, tmp_path):
    from transformers import ProgressCallback

    from mm_llama.training.trainer import TrainingProgressCallback

    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path, disable_tqdm="false")))
    callbacks = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert TrainingProgressCallback in callbacks and ProgressCallback not in callbacks

    class Bar:
        postfix, written = None, []

        def set_postfix(self, values):
            Bar.postfix = values

        def write(self, text):
            Bar.written.append(text)

    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingProgressCallback))
    callback.training_bar, state = Bar(), trainer.state
    callback.on_log(trainer.args, state, None, logs={"loss": 1.23456, "token_accuracy": 0.5, "learning_rate": 2e-4,
                                                     "grad_norm": 3.0})
    assert Bar.postfix == {"loss": "1.23", "acc": "0.5", "lr": "0.0002"} and Bar.written == []
    state.global_step = 200
    callback.on_log(trainer.args, state, None, logs={"eval_loss": 0.6123, "eval_token_accuracy": 0.507,
                                                     "eval_answer_loss": 0.655, "eval_runtime": 1.0})
    assert Bar.written == ["eval at step 200: loss 0.6123, answer-token accuracy 50.7%, answer loss 0.655"]
    callback.on_log(trainer.args, state, None, logs={"train_runtime": 3.0, "train_loss": 1.0})  # `train` prints these
    assert len(Bar.written) == 1


def test_without_a_progress_bar_a_line_per_evaluation_and_about_ten_training_lines(llama_dir, dataset_dir, tmp_path,
                                                                                     capsys):
    from transformers import PrinterCallback

    from mm_llama.training.trainer import TrainingLogPrinter

    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path, disable_tqdm="true")))
    callbacks = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert TrainingLogPrinter in callbacks and PrinterCallback not in callbacks
    printer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingLogPrinter))
    state = trainer.state
    state.max_steps = 100
    printer.on_train_begin(trainer.args, state, None)
    for step in range(1, 101):
        state.global_step = step
        printer.on_log(trainer.args, state, None, logs={"loss": 1.0, "token_accuracy": 0.25, "learning_rate": 1e-4})
        if step == 50:
            printer.on_log(trainer.args, state, None, logs={"eval_loss": 0.5, "eval_token_accuracy": 0.75})
    lines = capsys.readouterr().out.splitlines()
    training = [line for line in lines if line.startswith("step ")]
    assert training[0] == "step 1/100: loss 1, answer-token accuracy 25.0%, lr 0.0001"
    assert [int(line.split()[1].split("/")[0]) for line in training] == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]
    assert "eval at step 50: loss 0.5, answer-token accuracy 75.0%" in lines
