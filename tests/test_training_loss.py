"""The Trainer's loss path against hand computations: prompt_loss_weight, gradient accumulation, token accuracy."""

import pytest
import torch
from torch.nn import functional as F

from mm_llama.processing_mm_llama import IGNORE_INDEX
from mm_llama.data.collator import MMLlamaDataCollator
from mm_llama.training import build_trainer, parse_args
from training_utils import dataset_dir, llama_dir, single_torch_thread, stage1_args  # noqa: F401  (fixtures)


@pytest.fixture
def trainer(llama_dir, dataset_dir, tmp_path):
    trainer = build_trainer(*parse_args(stage1_args(llama_dir, [dataset_dir], tmp_path)))
    trainer.model.eval()
    return trainer


def trainer_loss(trainer, batches) -> torch.Tensor:
    """The loss of one optimizer step over `batches` (gradient-accumulation micro-batches) as the Trainer computes
    it: `num_items_in_batch` from `get_batch_samples`, then the sum of the micro-batch losses."""
    samples, num_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    with torch.no_grad():
        return sum(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items) for batch in samples)


def token_losses(model, batch) -> torch.Tensor:
    """Next-token cross-entropy at every position from full logits: [batch, seq_len - 1]."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       media_embeds=batch["media_embeds"]).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")


def rows(trainer, start, stop):
    return [trainer.train_dataset[i] for i in range(start, stop)]


def test_prompt_loss_weight_zero_equals_label_masking(trainer):
    collator = MMLlamaDataCollator(trainer.processing_class, max_seq_len=None, prompt_loss_weight=0.0)
    batches = [collator(rows(trainer, 0, 3)), collator(rows(trainer, 3, 4))]
    masked = [batch["labels"][:, 1:] != IGNORE_INDEX for batch in batches]
    expected = sum((token_losses(trainer.model, b) * m).sum() for b, m in zip(batches, masked)) / sum(
        m.sum() for m in masked)
    torch.testing.assert_close(trainer_loss(trainer, batches), expected)
    # Explicit 0/1 weights (the weighted path) give the same loss as masking.
    weighted = [{**batch, "loss_weights": (batch["labels"] != IGNORE_INDEX).float()} for batch in batches]
    torch.testing.assert_close(trainer_loss(trainer, weighted), expected)


def test_prompt_loss_weight_matches_a_hand_computation(trainer):
    processor = trainer.processing_class
    weight = 0.3
    plain = MMLlamaDataCollator(processor, max_seq_len=None)
    prompted = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=weight)
    groups = [rows(trainer, 0, 3), rows(trainer, 3, 4)]  # two micro-batches of different sizes
    batches = [prompted(group) for group in groups]
    total = denominator = 0.0
    for group, batch in zip(groups, batches):
        ids = batch["input_ids"]
        answers = plain(group)["labels"] != IGNORE_INDEX
        text = (batch["attention_mask"] == 1) & (ids != processor.tokenizer.bos_token_id) & (
            ids != processor.media_token_id)
        weights = torch.where(answers, 1.0, torch.where(text, weight, 0.0))[:, 1:]
        total += (token_losses(trainer.model, batch) * weights).sum()
        denominator += weights.sum()
    expected = total / denominator
    got = trainer_loss(trainer, batches)
    torch.testing.assert_close(got, expected)
    assert abs(got - trainer_loss(trainer, [plain(group) for group in groups])) > 1e-3


def test_token_accuracy_is_aggregated_over_accumulation_steps_and_eval_loss_over_tokens(llama_dir, dataset_dir,
                                                                                        tmp_path):
    args = stage1_args(llama_dir, [dataset_dir], tmp_path, max_steps=1, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, train_sampling_strategy="sequential",
                       per_device_eval_batch_size=3, prompt_loss_weight=0.5)
    trainer = build_trainer(*parse_args(args))
    collator = trainer.data_collator

    def counts(batch):
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   media_embeds=batch["media_embeds"]).logits[:, :-1]
        trained = batch["labels"][:, 1:] != IGNORE_INDEX
        correct = (logits.argmax(-1) == batch["labels"][:, 1:]) & trained
        return correct.sum().item(), trained.sum().item()

    trainer.model.eval()
    train_counts = [counts(collator(rows(trainer, i, i + 2))) for i in (0, 2)]
    expected_accuracy = sum(c for c, _ in train_counts) / sum(t for _, t in train_counts)
    assert 0 < expected_accuracy < 1

    eval_rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    eval_batches = [collator(eval_rows[i:i + 3]) for i in range(0, len(eval_rows), 3)]
    eval_counts = [counts(batch) for batch in eval_batches]
    weighted = [(token_losses(trainer.model, b) * b["loss_weights"][:, 1:]).sum() for b in eval_batches]
    expected_eval_loss = sum(weighted) / sum(b["loss_weights"][:, 1:].sum() for b in eval_batches)
    metrics = trainer.evaluate()
    assert metrics["eval_token_accuracy"] == pytest.approx(sum(c for c, _ in eval_counts) /
                                                           sum(t for _, t in eval_counts))
    assert metrics["eval_loss"] == pytest.approx(expected_eval_loss.item(), rel=1e-5)

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["token_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
