"""The scores `MMLlamaLMM.loglikelihood` hands to lmms-eval, in lmms-eval 0.7.3's convention.

lmms-eval scores a `multiple_choice` document from its choices' `(score, is_greedy)` pairs (`ConfigurableTask.
process_results`): `acc` takes `np.argmin(scores)`, `acc_norm` the argmin of the scores divided by the choices'
character lengths, `exact_match` the gold choice's `is_greedy`. Its models (llava, longva, vila, ...) return the
continuation's LOSS, so a score is a negative log-likelihood: lower means more likely. MM-LLaMA returns the summed
negative log-likelihood of the continuation's tokens (lmms-eval's models return HF's mean token loss): with the sum,
`acc` is the most likely choice and `acc_norm` the most likely per character, as lm-evaluation-harness defines them.

A document whose media are unusable has no scores, and equal scores would not do: argmin breaks ties towards choice
0, which is right whenever the answer is choice 0. Its choices get scores that lmms-eval's scoring counts as wrong
whatever the answer: NaN ("no score") for every wrong choice and +inf (the largest loss) for the right ones.
`np.argmin` returns the first NaN whatever the other values are, so `acc` and `acc_norm` pick the first wrong choice
(so would `acc_mutual_info`'s argmax, which lmms-eval 0.7.3 cannot run: its `build_all_requests` indexes
`arguments[2]` of the two-item unconditional requests); `is_greedy` is False (`exact_match` 0). Which choices are
right is read from the task, for these documents only: lmms-eval's requests carry the task's bound `doc_to_visual`.
"""

from __future__ import annotations

import math
from typing import Callable

from lmms_eval.api.task import ConfigurableTask

Score = tuple[float, bool]  # (negative log-likelihood, whether greedy decoding gives the continuation)

RIGHT_CHOICE_WITHOUT_MEDIA: Score = (math.inf, False)
WRONG_CHOICE_WITHOUT_MEDIA: Score = (math.nan, False)


def loss_score(logprob: float, greedy: bool) -> Score:
    """(log P(continuation | prompt), greedy) -> lmms-eval's (loss, greedy)."""
    return -logprob, greedy


def task_of(doc_to_visual: Callable) -> ConfigurableTask | None:
    """The lmms-eval task whose bound `doc_to_visual` a request carries (None for a plain function)."""
    owner = getattr(doc_to_visual, "__self__", None)
    return owner if isinstance(owner, ConfigurableTask) else None


def right_choices(task: ConfigurableTask, doc: dict) -> set[int]:
    """Indices of the choices that `process_results` counts as right for `doc`: its gold is `doc_to_text(doc)` for a
    multiple-input task, else `doc_to_target(doc)`; an index, a choice's text, or a list of indices."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    right = set()
    for item in gold if isinstance(gold, list) else [gold]:
        if isinstance(item, str):
            if item in choices:
                right.add(choices.index(item))
        elif 0 <= int(item) < len(choices):
            right.add(int(item))
    return right


def unusable_media_score(task: ConfigurableTask | None, doc: dict, choice: int) -> Score:
    """The score of choice `choice` (the request's `idx`) of a document whose media are unusable: one that lmms-eval
    counts as wrong (see the module docstring). +inf when the task is unknown or not multiple-choice (a
    `loglikelihood` task's `acc` is `is_greedy`, False here)."""
    if task is None or task.OUTPUT_TYPE != "multiple_choice":
        return RIGHT_CHOICE_WITHOUT_MEDIA
    return RIGHT_CHOICE_WITHOUT_MEDIA if choice in right_choices(task, doc) else WRONG_CHOICE_WITHOUT_MEDIA


__all__ = ["RIGHT_CHOICE_WITHOUT_MEDIA", "WRONG_CHOICE_WITHOUT_MEDIA", "Score", "loss_score", "right_choices",
           "task_of", "unusable_media_score"]
