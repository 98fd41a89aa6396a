"""Packing, length grouping and the chunked loss through the Trainer (DataArguments.packing,
train_sampling_strategy, TrainingArguments.loss_chunk_size)."""

import pytest
import torch

from mm_llama.data.packing import PackedDataset, PackingCollator
from mm_llama.training import build_trainer, parse_args
from training_utils import dataset_dir, llama_dir, single_torch_thread, stage1_args  # noqa: F401  (fixtures)


def test_packed_training_batches_give_the_unpacked_loss(llama_dir, dataset_dir, tmp_path):
    args = stage1_args(llama_dir, [dataset_dir], tmp_path, packing="true", train_sampling_strategy="random",
                       prompt_loss_weight=0.1, per_device_train_batch_size=2, max_steps=2, max_seq_len=256)
    trainer = build_trainer(*parse_args(args))
    assert isinstance(trainer.train_dataset, PackedDataset) and isinstance(trainer.data_collator, PackingCollator)
    assert len(trainer.train_dataset) < 32  # 32 conversations, fewer rows
    assert trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, PackedDataset)
    items = [trainer.train_dataset[0], trainer.train_dataset[1]]
    packed = trainer.data_collator(items)
    unpacked = trainer.data_collator.collator([row for item in items for row in item])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2 < unpacked["input_ids"].shape[0]
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, unpacked)
        got = trainer.compute_loss(trainer.model, packed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    trainer.model.train()
    result = trainer.train()
    assert result.global_step == 2
    assert trainer.evaluate()["eval_loss"] > 0  # the unpacked eval split goes through the same collator


def test_loss_chunk_size_gives_the_full_loss_through_the_trainer(llama_dir, dataset_dir, tmp_path, monkeypatch):
    import mm_llama.model.loss_mm_llama as loss_module

    calls = []
    chunked = loss_module.chunked_token_loss_stats
    monkeypatch.setattr(loss_module, "chunked_token_loss_stats",
                        lambda *args, **kwargs: calls.append(args[-1]) or chunked(*args, **kwargs))
    losses = {}
    for chunk in (None, 7):
        model_args, data_args, lora_args, training_args = parse_args(stage1_args(
            llama_dir, [dataset_dir], tmp_path / str(chunk), prompt_loss_weight=0.1, max_steps=3))
        training_args.loss_chunk_size = chunk  # null in a recipe
        trainer = build_trainer(model_args, data_args, lora_args, training_args)
        trainer.train()
        losses[chunk] = [(entry["loss"], entry["token_accuracy"]) for entry in trainer.state.log_history
                         if "loss" in entry]
    assert len(losses[7]) == 3 and set(calls) == {7}  # the chunked loss ran, and only when asked
    for (chunked, chunked_accuracy), (full, accuracy) in zip(losses[7], losses[None]):
        assert chunked == pytest.approx(full, rel=1e-5) and chunked_accuracy == accuracy


def test_packing_with_length_grouping_is_refused(llama_dir, dataset_dir, tmp_path):
    args = stage1_args(llama_dir, [dataset_dir], tmp_path, packing="true", train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="group_by_length"):
        build_trainer(*parse_args(args))


def test_length_grouping_reads_the_length_column_once(llama_dir, dataset_dir, tmp_path):
    """The samplers get the `length` column as a list: datasets' lazy Column would be read one row at a time, once
    per row every epoch. The batches are the same as from the column's values."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    args = stage1_args(llama_dir, [dataset_dir], tmp_path, train_sampling_strategy="group_by_length")
    trainer = build_trainer(*parse_args(args))
    lengths = trainer.train_dataset["length"][:]
    sampler, eval_sampler = trainer._get_train_sampler(), trainer._get_eval_sampler(trainer.eval_dataset)
    for built in (sampler, eval_sampler):
        assert isinstance(built, LengthGroupedSampler) and isinstance(built.lengths, list)
    assert sampler.lengths == lengths
    torch.manual_seed(0)
    order = list(sampler)
    torch.manual_seed(0)
    assert order == list(LengthGroupedSampler(sampler.batch_size, lengths=lengths))
