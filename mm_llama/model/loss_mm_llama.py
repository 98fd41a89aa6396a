"""The one definition of MM-LLaMA's training loss and metrics.

For the next-token targets that carry a label (the model shifts labels so that position t predicts token t+1):
  - the optimised loss is sum(w * CE) / sum(w), with w = 1 on answer tokens and `prompt_loss_weight` on prompt tokens
    (or w = 1 everywhere when there are no loss weights);
  - `token_accuracy` is argmax accuracy over ANSWER tokens only, and `answer_loss` the mean CE over them, whatever
    the prompt loss weight: the original MM-LLaMA's definition (its logs count completion tokens only), so that
    figures compare with its published 50.7% / 68.0%.

The model (`causal_lm_loss`), the Trainer's logs, `Trainer.evaluate` and `mm-llama evaluate` all use these sums; the
counts are summed over batches, accumulation steps and processes before dividing. Which implementation runs is the
caller's choice (`LossBackend`, built by `MMLlamaTrainer.compute_loss`), carried out inside the model's forward.

Three implementations give the same sums and gradients (`token_loss_stats(..., chunk_size=...)`):
  - "full" (chunk_size None): the LM head over every trained position at once, then cross-entropy; returns the
    logits. Holds [num_trained, vocab] logits, their float32 copy, the log-softmax and its gradient: at 32k vocabulary
    the largest tensors of a step.
  - "chunked": `chunk_size` positions at a time, each chunk's logits gradient computed and pushed through the LM head
    right away, inside the forward (the loss is the last operation, so the gradient of the summed loss is known up to
    the scalar that backward brings). Never holds more than one chunk's logits; costs the same matmuls as "full"
    (no recomputation); works with any LM head module (plain or PEFT/LoRA-wrapped); the argmax for the accuracy is
    taken in the same pass.
  - "liger": on CUDA, Liger-Kernel's fused linear cross-entropy (Triton) when it is installed and the LM head is a
    plain `nn.Linear`; otherwise "chunked" is used and the reason logged once.

Over 400 lines because the three implementations must give the same sums, so they sit side by side with the one
function that selects and applies them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Trained positions per chunk of the chunked loss. 1024 x 32000 float32 logits are 131 MB (a quarter of the 4096 x 32000
# logits of a fully trained batch of 8 x 512, of which the full loss holds several copies): small next to 7B
# activations, large enough to keep a GPU's matmuls efficient ([1024, 4096] x [4096, 32000]).
DEFAULT_LOSS_CHUNK_SIZE = 1024
# Liger's fused loss takes one weight per class, not per token: tokens are grouped by (loss weight, is answer) and
# each group is one fused call. MM-LLaMA's weights take two values (1 on answers, prompt_loss_weight on the prompt).
_MAX_LIGER_GROUPS = 4


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
    return _stats_from_tokens(weighted_sum, weight_sum, token_losses.detach(), correct, answer_mask)


def _stats_from_tokens(
    weighted_sum: torch.Tensor, weight_sum: torch.Tensor, ce: torch.Tensor, correct: torch.Tensor,
    answer_mask: torch.Tensor | None,
) -> TokenLossStats:
    """The answer sums from per-target CE [num_trained] (no gradient) and argmax hits [num_trained] bool."""
    if answer_mask is None:
        answer_mask = torch.ones_like(correct)
    return TokenLossStats(
        weighted_loss_sum=weighted_sum,
        weight_sum=weight_sum.detach(),
        answer_loss_sum=ce[answer_mask].sum(),
        answer_tokens=answer_mask.sum(),
        answer_correct=(correct & answer_mask).sum(),
    )


def token_loss_stats(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    use_liger: bool = True,
) -> tuple[TokenLossStats, torch.Tensor | None]:
    """Applies the LM head at the trained positions and returns the loss/metric sums and the logits.

    Args:
        hidden_states: [num_trained, hidden] final hidden states at the positions whose next token is trained.
        lm_head: the language model's output layer (a Linear, or a PEFT-wrapped one).
        targets, weights, answer_mask: as in `token_stats_from_logits`.
        chunk_size: None: the "full" loss (returns the logits [num_trained, vocab]). An int: never materialise all
            logits: Liger-Kernel's fused loss on CUDA when available and `use_liger`, otherwise the chunked loss with
            `chunk_size` positions per chunk; the logits are then not returned (None).
        use_liger: allow Liger-Kernel's fused loss (CUDA, `liger-kernel` installed, plain Linear LM head).
    Returns:
        (stats, logits [num_trained, vocab] or None)
    """
    if chunk_size is None:
        logits = lm_head(hidden_states)
        return token_stats_from_logits(logits, targets, weights, answer_mask), logits
    if chunk_size < 1:
        raise ValueError(f"loss chunk_size must be a positive number of positions (or None), got {chunk_size}.")
    implementation, reason = select_loss_implementation(hidden_states, lm_head, chunk_size, use_liger)
    if reason:
        _log_once(reason)
    if implementation == "liger":
        return liger_token_loss_stats(hidden_states, lm_head, targets, weights, answer_mask), None
    return chunked_token_loss_stats(hidden_states, lm_head, targets, weights, answer_mask, chunk_size), None


@dataclass(frozen=True)
class LossBackend:
    """Which implementation of `token_loss_stats` a forward with labels runs: chosen by the caller, run by the model.

    `MMLlamaTrainer.compute_loss` builds one from its TrainingArguments (`loss_chunk_size`, `use_liger_loss`) and
    passes it to the model's forward as `loss_backend`, the way transformers' Trainer passes `num_items_in_batch`:
    the choice belongs to the training loop (as in TRL), not to the model. The computation cannot leave the forward,
    though: under FSDP and DeepSpeed ZeRO-3 the LM head weight is gathered only while the wrapped model's forward
    runs (after it, `model.lm_head` holds a shard or an empty placeholder), so the model calls the backend on its
    final hidden states with its LM head. Only trained positions are passed: prompt and padding positions never go
    through the LM head.

    chunk_size: None: the "full" loss, which also returns the logits [num_trained, vocab] (loglikelihood scoring
        reads them). An int: the chunked loss, `chunk_size` positions at a time, or Liger-Kernel's fused loss; no
        logits.
    use_liger: with `chunk_size`, allow Liger-Kernel's fused loss (CUDA, `liger-kernel` installed, plain Linear head).
    """

    chunk_size: int | None = None
    use_liger: bool = True

    def __call__(
        self, hidden_states: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
        weights: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None,
    ) -> tuple[TokenLossStats, torch.Tensor | None]:
        """`token_loss_stats` with this backend's implementation: [num_trained, hidden] in, (stats, logits) out."""
        return token_loss_stats(hidden_states, lm_head, targets, weights, answer_mask,
                                chunk_size=self.chunk_size, use_liger=self.use_liger)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    loss_weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    backend: LossBackend | None = None,
) -> tuple[torch.Tensor, TokenLossStats, torch.Tensor | None]:
    """The loss of a forward with labels: position t predicts token t+1, as in transformers' causal LMs.

    Args:
        hidden_states: [batch, seq_len, hidden] the language model's final hidden states.
        lm_head: its output layer.
        labels: [batch, seq_len] target ids, -100 where no loss is taken (shifted here).
        loss_weights: [batch, seq_len] per-token weights aligned with `labels`; None: 1 each.
        answer_mask: [batch, seq_len] bool aligned with `labels`, True on answer tokens; None: every labelled token.
        num_items_in_batch: the denominator over a whole gradient-accumulation batch (the trained tokens' weight sum,
            or their count); None: this batch's own.
        backend: None: the LM head over every position, as a plain transformers forward; a `LossBackend`: only at the
            trained positions, with its implementation.
    Returns:
        (loss = sum(w * CE) / denominator, stats, logits: [batch, seq_len, vocab] without a backend, else the
        backend's [num_trained, vocab] or None)
    """
    trained = labels[:, 1:] != -100
    targets = labels[:, 1:][trained]
    weights = loss_weights[:, 1:][trained] if loss_weights is not None else None
    answers = answer_mask[:, 1:][trained].bool() if answer_mask is not None else None
    if backend is None:
        logits = lm_head(hidden_states)
        stats = token_stats_from_logits(logits[:, :-1][trained], targets, weights, answers)
    else:
        stats, logits = backend(hidden_states[:, :-1][trained], lm_head, targets, weights, answers)
    denominator = stats.weight_sum if num_items_in_batch is None else num_items_in_batch
    # A batch with no trained token has a zero sum: clamping keeps its loss 0 instead of 0/0.
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=stats.weighted_loss_sum.device)
    return stats.weighted_loss_sum / denominator.clamp(min=torch.finfo(torch.float32).tiny), stats, logits


# ---------------------------------------------------------------- chunked


def _chunk_statistics(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, with_gradient: bool,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cross-entropy, argmax hit and (optionally) d(sum w*CE)/d(logits) of one chunk.

    Args:
        logits: [chunk, vocab] (any float dtype; the statistics are computed in float32 as the full loss does).
        targets: [chunk]; weights: [chunk] float32 or None (= 1).
        overwrite: the float32 logits may be overwritten (their buffer becomes the gradient): saves a [chunk, vocab]
            allocation and a pass. Only when nothing else reads them (e.g. the backward of a plain Linear, which
            keeps its input and weight, not its output).
    Returns:
        (ce [chunk] float32, correct [chunk] bool, gradient [chunk, vocab] in the logits' dtype or None)
    """
    logits32 = logits.float()
    overwrite = overwrite or logits32 is not logits  # .float() of bf16/fp16 logits is a private copy anyway
    # One pass gives the maximum (for a stable log-sum-exp) and the argmax (for the accuracy); max(dim) returns the
    # first maximal index, as argmax does.
    maximum, predicted = logits32.max(dim=-1)
    target_logits = logits32.gather(1, targets.unsqueeze(1)).squeeze(1)
    shifted = logits32.sub_(maximum.unsqueeze(1)) if overwrite else logits32 - maximum.unsqueeze(1)
    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    ce = maximum + sum_exp.log() - target_logits
    correct = predicted == targets
    if not with_gradient:
        return ce, correct, None
    # d(w * CE)/d(logits) = w * (softmax - one_hot(target)), built in place in the exp buffer.
    scale = (1.0 / sum_exp) if weights is None else (weights / sum_exp)
    gradient = exp.mul_(scale.unsqueeze(1))
    gradient.scatter_add_(1, targets.unsqueeze(1),
                          -(torch.ones_like(scale) if weights is None else weights).unsqueeze(1))
    return ce, correct, gradient.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(w * CE(lm_head(hidden), targets)) without holding all logits.

    Forward goes chunk by chunk: the chunk's logits through `lm_head` (with autograd enabled locally), its CE and
    argmax, then d(sum)/d(logits) pushed back through `lm_head` at once (`torch.autograd.grad`) to get the gradient
    of the chunk's hidden states and of the LM head's trainable parameters; the logits are then freed. Backward only
    scales those stored gradients by the incoming scalar. Same matmuls as the full loss, no recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, targets, weights, lm_head, chunk_size, grad_enabled, *params):
        # needs_input_grad ignores the grad mode of the caller (evaluation under no_grad): `grad_enabled` brings it.
        hidden_needs_grad = grad_enabled and ctx.needs_input_grad[0]
        trainable = [index for index, param in enumerate(params) if grad_enabled and ctx.needs_input_grad[6 + index]]
        with_gradient = hidden_needs_grad or bool(trainable)
        num_positions = hidden.shape[0]
        # A plain Linear's backward reads its input and weight, never its output: the logits buffer can be reused.
        plain_linear = type(lm_head) is nn.Linear
        ce = torch.empty(num_positions, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(num_positions, dtype=torch.bool, device=hidden.device)
        hidden_grad = torch.zeros_like(hidden) if hidden_needs_grad else None
        # Parameter gradients summed over chunks in float32, as one matmul over all positions would accumulate.
        param_grads = [torch.zeros_like(params[index], dtype=torch.float32) for index in trainable]
        for start in range(0, num_positions, chunk_size):
            stop = min(start + chunk_size, num_positions)
            chunk_weights = None if weights is None else weights[start:stop]
            if not with_gradient:
                logits = lm_head(hidden[start:stop])
                ce[start:stop], correct[start:stop], _ = _chunk_statistics(logits, targets[start:stop], None, False,
                                                                           overwrite=True)
                continue
            with torch.enable_grad():
                chunk_hidden = hidden[start:stop].detach().requires_grad_(hidden_needs_grad)
                logits = lm_head(chunk_hidden)
                chunk_ce, chunk_correct, logits_grad = _chunk_statistics(
                    logits.detach(), targets[start:stop], chunk_weights, True, overwrite=plain_linear)
                inputs = ([chunk_hidden] if hidden_needs_grad else []) + [params[index] for index in trainable]
                grads = torch.autograd.grad(logits, inputs, logits_grad, allow_unused=True)
            ce[start:stop], correct[start:stop] = chunk_ce, chunk_correct
            if hidden_needs_grad:
                hidden_grad[start:stop] = grads[0]
                grads = grads[1:]
            for total, grad in zip(param_grads, grads):
                if grad is not None:
                    total += grad
            del logits, logits_grad, grads
        token_weights = ce if weights is None else ce * weights
        weighted_sum = token_weights.sum()
        ctx.trainable = trainable
        ctx.num_params = len(params)
        ctx.param_dtypes = [params[index].dtype for index in trainable]
        ctx.save_for_backward(*([hidden_grad] if hidden_needs_grad else []), *param_grads)
        ctx.hidden_needs_grad = hidden_needs_grad
        ctx.mark_non_differentiable(ce, correct)
        return weighted_sum, ce, correct

    @staticmethod
    def backward(ctx, grad_sum, grad_ce, grad_correct):
        saved = list(ctx.saved_tensors)
        hidden_grad = None
        if ctx.hidden_needs_grad:
            hidden_grad = saved.pop(0)
            hidden_grad = (hidden_grad * grad_sum).to(hidden_grad.dtype)
        param_grads: list[torch.Tensor | None] = [None] * ctx.num_params
        for index, grad, dtype in zip(ctx.trainable, saved, ctx.param_dtypes):
            param_grads[index] = (grad * grad_sum).to(dtype)
        return (hidden_grad, None, None, None, None, None, *param_grads)


def chunked_token_loss_stats(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> TokenLossStats:
    """`token_stats_from_logits(lm_head(hidden_states), ...)` computed `chunk_size` positions at a time.

    Same sums and the same gradients (for `hidden_states` and every trainable LM-head parameter) as the full loss,
    without ever holding more than [chunk_size, vocab] logits. The LM head may be any module mapping
    [n, hidden] -> [n, vocab] row by row (a Linear, a PEFT LoRA Linear, ...).

    Args:
        hidden_states: [num_trained, hidden]; targets: [num_trained]; weights: [num_trained] or None;
        answer_mask: [num_trained] bool or None (every target is an answer).
    """
    weights = None if weights is None else weights.float()
    params = [param for param in lm_head.parameters() if param.requires_grad]
    weighted_sum, ce, correct = _ChunkedLinearCrossEntropy.apply(
        hidden_states, targets, weights, lm_head, chunk_size, torch.is_grad_enabled(), *params)
    weight_sum = (torch.tensor(float(targets.numel()), device=targets.device) if weights is None
                  else weights.sum())
    return _stats_from_tokens(weighted_sum, weight_sum, ce, correct, answer_mask)


# ---------------------------------------------------------------- Liger-Kernel


def _liger_fused_linear_cross_entropy() -> Callable | None:
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def liger_unavailable_reason(hidden_states: torch.Tensor, lm_head: nn.Module) -> str | None:
    """Why Liger-Kernel's fused loss cannot serve this call (None when it can)."""
    if not hidden_states.is_cuda:
        return "Liger-Kernel's fused loss runs on CUDA only"
    fused = _liger_fused_linear_cross_entropy()
    if fused is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if "return_predicted_tokens" not in inspect.signature(fused).parameters:
        return "the installed liger-kernel is too old (no return_predicted_tokens for the token accuracy)"
    if type(lm_head) is not nn.Linear:
        return (f"the LM head is a {type(lm_head).__name__}, not a plain nn.Linear (e.g. LoRA on lm_head); Liger's "
                "fused loss needs the weight matrix itself")
    weight = lm_head.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dim() != 2:
        return f"the LM head weight is a {type(weight).__name__} (sharded or quantized), not a plain 2-D tensor"
    return None


def select_loss_implementation(
    hidden_states: torch.Tensor, lm_head: nn.Module, chunk_size: int | None, use_liger: bool = True
) -> tuple[str, str | None]:
    """("full" | "chunked" | "liger", why Liger is not used or None) for `token_loss_stats`'s arguments."""
    if chunk_size is None:
        return "full", None
    if not use_liger:
        return "chunked", None
    reason = liger_unavailable_reason(hidden_states, lm_head)
    if reason is None:
        return "liger", None
    # Off CUDA there is nothing to explain: the chunked loss is the only memory-efficient option.
    return "chunked", (f"Chunked loss instead of Liger-Kernel's fused loss: {reason}." if hidden_states.is_cuda
                       else None)


def liger_token_loss_stats(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
    fused_loss: Callable | None = None,
) -> TokenLossStats:
    """The same sums as `token_stats_from_logits(lm_head(hidden_states), ...)` from Liger-Kernel's fused linear
    cross-entropy (sum reduction, argmax returned for the accuracy).

    Liger weighs classes, not tokens, so the positions are grouped by (loss weight, is answer) and each group is one
    fused call whose summed CE is multiplied by the group's weight; with more than a few distinct weights this falls
    back to the chunked loss.

    Args:
        hidden_states: [num_trained, hidden]; targets: [num_trained]; weights, answer_mask: [num_trained] or None.
        fused_loss: the fused function (default: liger_kernel's `liger_fused_linear_cross_entropy`); tests pass a
            reference implementation with the same signature.
    """
    fused_loss = fused_loss or _liger_fused_linear_cross_entropy()
    num = targets.numel()
    float_weights = torch.ones(num, device=targets.device) if weights is None else weights.float()
    answers = torch.ones(num, dtype=torch.bool, device=targets.device) if answer_mask is None else answer_mask.bool()
    keys = torch.stack([float_weights, answers.float()], dim=1)
    groups, group_of = torch.unique(keys, dim=0, return_inverse=True)
    if len(groups) > _MAX_LIGER_GROUPS:
        _log_once(f"Chunked loss instead of Liger-Kernel's fused loss: {len(groups)} distinct (loss weight, answer) "
                  f"groups (at most {_MAX_LIGER_GROUPS}).")
        return chunked_token_loss_stats(hidden_states, lm_head, targets, weights, answer_mask)
    weighted_sum = hidden_states.new_zeros((), dtype=torch.float32)
    answer_loss_sum = torch.zeros((), dtype=torch.float32, device=targets.device)
    answer_correct = torch.zeros((), dtype=torch.long, device=targets.device)
    for group_index, (group_weight, group_is_answer) in enumerate(groups.tolist()):
        index = (group_of == group_index).nonzero().squeeze(1)
        if group_weight == 0 and not group_is_answer:
            continue  # contributes nothing to any sum
        # A zero-weight group still needs its CE and argmax for the answer metrics, but no gradient.
        with torch.set_grad_enabled(torch.is_grad_enabled() and group_weight != 0):
            output = fused_loss(hidden_states[index], lm_head.weight, targets[index], lm_head.bias,
                                reduction="sum", return_predicted_tokens=True)
        loss = output.loss.float()
        if group_weight != 0:
            weighted_sum = weighted_sum + loss * group_weight
        if group_is_answer:
            answer_loss_sum += loss.detach()
            answer_correct += (output.predicted_tokens == targets[index]).sum()
    if not weighted_sum.requires_grad and torch.is_grad_enabled() and hidden_states.requires_grad:
        # No weighted group (e.g. no trained position in the batch): keep the graph, as the full loss's empty sum does.
        weighted_sum = weighted_sum + hidden_states.sum() * 0.0
    return TokenLossStats(
        weighted_loss_sum=weighted_sum,
        weight_sum=float_weights.sum(),
        answer_loss_sum=answer_loss_sum,
        answer_tokens=answers.sum(),
        answer_correct=answer_correct,
    )


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    """Logs, once per process, why the fused loss is not used: INFO, since the chunked loss is the default and equal in
    results (on an H100 also in speed, BENCHMARKS.md); a warning on every GPU run without the optional extra would be
    noise."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


__all__ = [
    "DEFAULT_LOSS_CHUNK_SIZE",
    "LossBackend",
    "TokenLossStats",
    "causal_lm_loss",
    "chunked_token_loss_stats",
    "liger_token_loss_stats",
    "liger_unavailable_reason",
    "select_loss_implementation",
    "token_loss_stats",
    "token_stats_from_logits",
]
