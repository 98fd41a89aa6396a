"""The Trainer's loss path against hand computations: prompt_loss_weight, gradient accumulation, token accuracy."""

import pytest
import torch
from torch.nn import functional as F

from mm_llama.model.processing_mm_llama import IGNORE_INDEX
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


def original_metrics(logits: torch.Tensor, targets: torch.Tensor, completion: torch.Tensor) -> tuple[float, int, float]:
    """The original MM-LLaMA's definition, re-stated: its loss mask is -1 on prompt tokens, 1 on completion tokens
    and 0 on padding, and accuracy counts the argmax hits where the mask is 1 (completion = answer tokens only).
    Returns (correct, completion count, summed CE over completion tokens) for one batch."""
    loss_mask = torch.where(completion, 1, -1)
    hits = (logits.argmax(-1) == targets) & (loss_mask == 1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return hits.sum().item(), int((loss_mask == 1).sum()), (ce * (loss_mask == 1)).sum().item()


def test_token_accuracy_and_answer_loss_count_answers_only_in_logs_evaluate_and_evaluate_script(
        llama_dir, dataset_dir, tmp_path):
    weight = 0.05  # stage 2's prompt loss weight: prompt tokens carry labels, but accuracy must not count them
    args = stage1_args(llama_dir, [dataset_dir], tmp_path, max_steps=1, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, train_sampling_strategy="sequential",
                       per_device_eval_batch_size=3, prompt_loss_weight=weight)
    trainer = build_trainer(*parse_args(args))
    collator = trainer.data_collator
    answers_only = MMLlamaDataCollator(trainer.processing_class, max_seq_len=collator.max_seq_len,
                                       truncation=collator.truncation)  # labels on the answers only

    def sums(group):
        """(correct, answers, answer CE, labelled tokens) of one micro-batch, from full logits."""
        batch = collator(group)
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   media_embeds=batch["media_embeds"]).logits[:, :-1]
        completion = answers_only(group)["labels"][:, 1:] != IGNORE_INDEX
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return (*original_metrics(logits, batch["input_ids"][:, 1:], completion), labelled)

    trainer.model.eval()
    train = [sums(rows(trainer, i, i + 2)) for i in (0, 2)]
    assert sum(t[3] for t in train) > sum(t[1] for t in train) > 0  # prompt tokens are labelled, not counted
    expected_accuracy = sum(t[0] for t in train) / sum(t[1] for t in train)
    expected_answer_loss = sum(t[2] for t in train) / sum(t[1] for t in train)

    eval_rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    evals = [sums(eval_rows[i:i + 3]) for i in range(0, len(eval_rows), 3)]
    eval_batches = [collator(eval_rows[i:i + 3]) for i in range(0, len(eval_rows), 3)]
    weighted = [(token_losses(trainer.model, b) * b["loss_weights"][:, 1:]).sum() for b in eval_batches]
    expected_eval_loss = sum(weighted) / sum(b["loss_weights"][:, 1:].sum() for b in eval_batches)
    expected_eval = {"eval_token_accuracy": sum(t[0] for t in evals) / sum(t[1] for t in evals),
                     "eval_answer_loss": sum(t[2] for t in evals) / sum(t[1] for t in evals),
                     "eval_loss": expected_eval_loss.item()}

    # Caller 1: Trainer.evaluate, pooled over the whole eval set (batches of 3 + remainder).
    metrics = trainer.evaluate()
    assert {k: metrics[k] for k in expected_eval} == pytest.approx(expected_eval, rel=1e-5)

    # Caller 2: scripts/evaluate.py's loss evaluation (one row per batch: pooling makes batching irrelevant).
    from mm_llama.evaluation import evaluate_loss

    result = evaluate_loss(trainer.model, trainer.processing_class, dataset_dir, batch_size=1,
                           prompt_loss_weight=weight, max_seq_len=collator.max_seq_len)
    assert {"eval_token_accuracy": result["token_accuracy"], "eval_answer_loss": result["answer_loss"],
            "eval_loss": result["loss"]} == pytest.approx(expected_eval, rel=1e-5)
    assert result["num_answer_tokens"] == sum(t[1] for t in evals)

    # Caller 3: the training logs, summed over the two accumulation micro-batches.
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["token_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
    assert logged[0]["answer_loss"] == pytest.approx(expected_answer_loss, rel=1e-5)
