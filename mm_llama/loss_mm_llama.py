"""The one definition of MM-LLaMA's training loss and metrics.

For the next-token targets that carry a label (the model shifts labels so that position t predicts token t+1):
  - the optimised loss is sum(w * CE) / sum(w), with w = 1 on answer tokens and `prompt_loss_weight` on prompt tokens
    (or w = 1 everywhere when there are no loss weights);
  - `token_accuracy` is argmax accuracy over ANSWER tokens only, and `answer_loss` the mean CE over them, whatever
    the prompt loss weight: the original MM-LLaMA's definition (its logs count completion tokens only), so that
    figures compare with its published 50.7% / 68.0%.

The model, the Trainer's logs, `Trainer.evaluate` and `mm-llama evaluate` all use `token_loss_stats`; the counts are
summed over batches, accumulation steps and processes before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenLossStats:
    """Sums over one batch's trained targets; divide after summing over batches and processes.

    weighted_loss_sum: sum of w * CE over trained targets (float32 scalar, carries the gradient).
    weight_sum: sum of w over trained targets (float32 scalar).
    answer_loss_sum: sum of CE over answer targets (float32 scalar, no gradient).
    answer_tokens: number of answer targets (int64 scalar).
    answer_correct: answer targets whose argmax prediction is right (int64 scalar).
    """

    weighted_loss_sum: torch.Tensor
    weight_sum: torch.Tensor
    answer_loss_sum: torch.Tensor
    answer_tokens: torch.Tensor
    answer_correct: torch.Tensor


def token_stats_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
) -> TokenLossStats:
    """Loss and metric sums from the logits at the trained positions.

    Args:
        logits: [num_trained, vocab] logits at the positions whose next token is trained.
        targets: [num_trained] the next-token ids.
        weights: [num_trained] per-target loss weights; None means 1 for every target.
        answer_mask: [num_trained] bool, True where the target is an answer token; None means every target is.
    """
    token_losses = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if weights is None:
        weighted_sum = token_losses.sum()
        weight_sum = torch.tensor(float(targets.numel()), device=targets.device)
    else:
        weights = weights.float()
        weighted_sum = (token_losses * weights).sum()
        weight_sum = weights.sum()
    with torch.no_grad():
        correct = logits.argmax(dim=-1) == targets
        if answer_mask is None:
            answer_mask = torch.ones_like(targets, dtype=torch.bool)
        return TokenLossStats(
            weighted_loss_sum=weighted_sum,
            weight_sum=weight_sum.detach(),
            answer_loss_sum=token_losses.detach()[answer_mask].sum(),
            answer_tokens=answer_mask.sum(),
            answer_correct=(correct & answer_mask).sum(),
        )


def token_loss_stats(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
) -> tuple[TokenLossStats, torch.Tensor]:
    """Applies the LM head at the trained positions and returns the loss/metric sums and the logits.

    Args:
        hidden_states: [num_trained, hidden] final hidden states at the positions whose next token is trained.
        lm_head: the language model's output layer (a Linear, or a PEFT-wrapped one).
        targets, weights, answer_mask: as in `token_stats_from_logits`.
    Returns:
        (stats, logits [num_trained, vocab])
    """
    logits = lm_head(hidden_states)
    return token_stats_from_logits(logits, targets, weights, answer_mask), logits


__all__ = ["TokenLossStats", "token_loss_stats", "token_stats_from_logits"]
