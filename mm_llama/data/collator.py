"""Training batches from built dataset rows: tokenize with the processor, fit to `max_seq_len`, pad, stack media.

Rows are those of a dataset built by `mm_llama.data` (columns `id`, `messages`, `media_types`, `media_embeds`
`[num_media, tokens_per_media, dim]`). Tokenization happens here, on the fly: sentencepiece encodes a conversation
in well under a millisecond (see `scripts/benchmarks/train_throughput.py`), far below a training step, and it
avoids `datasets.map` rewriting the embedding column into a second Arrow file. Token lengths, which length grouping
and the "drop" policy need up front, are computed once by `conversation_lengths`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from ..model.processing_mm_llama import IGNORE_INDEX, EncodedConversation, MMLlamaProcessor, TrainOn

TruncationPolicy = Literal["drop", "truncate"]
TRUNCATION_POLICIES = ("drop", "truncate")


def row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """The processor's record for a built-dataset row: `{"id", "messages", "media": [{"type": t}, ...]}`."""
    missing = [column for column in ("messages", "media_types") if column not in row]
    if missing:
        raise KeyError(
            f"Dataset row {row.get('id')!r} lacks column(s) {missing}; training expects datasets built by "
            "mm-llama build-datasets (columns id, messages, media_types, media_embeds)."
        )
    return {"id": row.get("id"), "messages": row["messages"], "media": [{"type": t} for t in row["media_types"]]}


def truncate_encoded(encoded: EncodedConversation, max_len: int, media_token_id: int) -> EncodedConversation:
    """Cuts a conversation to at most `max_len` tokens without splitting a media item's placeholder run.

    If the cut would fall inside a run of placeholders, it moves to the run's start, so a media item is either
    kept whole or dropped whole; the returned `media` lists only the items whose placeholders survive.
    """
    if len(encoded.input_ids) <= max_len:
        return encoded
    ids = encoded.input_ids
    cut = max_len
    # A placeholder just before the cut and another just after it: the run straddles the cut, so move the cut back
    # to where the run starts.
    while cut > 0 and ids[cut - 1] == media_token_id and ids[cut] == media_token_id:
        cut -= 1
    kept_runs = sum(1 for i in range(cut) if ids[i] == media_token_id and (i == 0 or ids[i - 1] != media_token_id))
    return EncodedConversation(
        input_ids=ids[:cut],
        labels=encoded.labels[:cut],
        loss_weights=encoded.loss_weights[:cut],
        answer_mask=encoded.answer_mask[:cut],
        media=encoded.media[:kept_runs],
        text="",
    )


def conversation_lengths(
    rows: Iterable[dict[str, Any]], processor: MMLlamaProcessor, train_on: TrainOn = "all"
) -> list[int]:
    """Token length of each row's conversation (placeholders included), as the collator will encode it."""
    return [len(processor.encode_conversation(row_to_record(row), train_on=train_on).input_ids) for row in rows]


@dataclass
class MMLlamaDataCollator:
    """Collates built-dataset rows into a model batch.

    Args:
        processor: the `MMLlamaProcessor` (chat template, tokenizer, `pad_token_id`).
        max_seq_len: longest sequence kept; `None` keeps everything.
        truncation: "truncate" cuts longer conversations at `max_seq_len` (never inside a media placeholder run; a
            media item past the cut is dropped with its embedding); "drop" expects such rows to have been filtered
            out of the dataset beforehand (`mm_llama.training.data.filter_by_length`) and raises if one arrives.
        prompt_loss_weight: weight of the loss on prompt tokens (0: answers only, as plain label masking).
        train_on: "all" assistant turns or only the "last" one.
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores).

    Returns (from `__call__`): `input_ids`, `attention_mask`, `labels` `[batch, seq_len]`; `loss_weights` and
    `answer_mask` (the answer tokens, which token accuracy counts) `[batch, seq_len]` when `prompt_loss_weight > 0`;
    and `media_embeds` `[total_media, tokens_per_media, dim]` in placeholder order when the batch has media.
    Placeholder and media counts always agree.
    """

    processor: MMLlamaProcessor
    max_seq_len: int | None = 512
    truncation: TruncationPolicy = "truncate"
    prompt_loss_weight: float = 0.0
    train_on: TrainOn = "all"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}.")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 (or None), got {self.max_seq_len}.")
        if self.prompt_loss_weight < 0:
            raise ValueError(f"prompt_loss_weight must be >= 0, got {self.prompt_loss_weight}.")

    def encode_row(self, row: dict[str, Any]) -> tuple[EncodedConversation, np.ndarray | None]:
        """Tokenizes one row and fits it to `max_seq_len`; returns it with its kept media embeddings
        `[kept_media, tokens_per_media, dim]` (None when the row has no media)."""
        encoded = self.processor.encode_conversation(
            row_to_record(row), train_on=self.train_on, prompt_loss_weight=self.prompt_loss_weight
        )
        if self.max_seq_len is not None and len(encoded.input_ids) > self.max_seq_len:
            if self.truncation == "drop":
                raise ValueError(
                    f"Row {row.get('id')!r} has {len(encoded.input_ids)} tokens > max_seq_len={self.max_seq_len} "
                    "with truncation='drop': filter the dataset first (mm_llama.training.data.filter_by_length, "
                    "which mm-llama train applies) or use truncation='truncate'."
                )
            encoded = truncate_encoded(encoded, self.max_seq_len, self.processor.media_token_id)
        embeds = row.get("media_embeds")
        if embeds is None or len(encoded.media) == 0:
            return encoded, None
        embeds = np.asarray(embeds, dtype=np.float32)
        if embeds.ndim == 2:  # [num_media, dim] -> one vector per media item
            embeds = embeds[:, None, :]
        if len(embeds) != len(row["media_types"]):
            raise ValueError(
                f"Row {row.get('id')!r} lists {len(row['media_types'])} media types but {len(embeds)} media "
                "embeddings; the dataset is inconsistent, rebuild it."
            )
        return encoded, embeds[: len(encoded.media)]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded, media = [], []
        for row in rows:
            conversation, embeds = self.encode_row(row)
            encoded.append(conversation)
            if embeds is not None:
                media.append(embeds)
        features = self.processor.pad(
            encoded, padding_side="right", with_labels=True, with_loss_weights=self.prompt_loss_weight > 0
        )
        if self.pad_to_multiple_of:
            features = self._pad_to_multiple(features)
        batch = {
            "input_ids": torch.tensor(features["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(features["attention_mask"], dtype=torch.long),
            "labels": torch.tensor(features["labels"], dtype=torch.long),
        }
        if "loss_weights" in features:
            batch["loss_weights"] = torch.tensor(features["loss_weights"], dtype=torch.float32)
            batch["answer_mask"] = torch.tensor(features["answer_mask"], dtype=torch.bool)
        if media:
            batch["media_embeds"] = torch.from_numpy(np.concatenate(media, axis=0))
        return batch

    def _pad_to_multiple(self, features: dict[str, list]) -> dict[str, list]:
        """Extends every padded row so that the length is a multiple of `pad_to_multiple_of`."""
        length = len(features["input_ids"][0])
        extra = -length % self.pad_to_multiple_of
        pad_values = {"input_ids": self.processor.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX,
                      "loss_weights": 0.0, "answer_mask": False}
        return {key: [row + [pad_values[key]] * extra for row in rows] for key, rows in features.items()}


__all__ = ["MMLlamaDataCollator", "conversation_lengths", "row_to_record", "truncate_encoded", "TRUNCATION_POLICIES"]
