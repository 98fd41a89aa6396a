"""Padding-free packing: several conversations per row of at most `max_seq_len` tokens.

A packed row is the concatenation of whole encoded conversations, followed by padding up to the batch's row length.
Attention never crosses a conversation boundary because the rows carry `position_ids` that restart at 0 for every
conversation and NO `attention_mask`: transformers then builds the packed-sequence mask itself
(`masking_utils.find_packed_sequence_indices`: a new sequence wherever the position does not grow by 1) for the
sdpa / eager / flex attention implementations. flash_attention_2 infers sequences from `position_ids` only for a
batch of ONE row (`modeling_flash_attention_utils._is_packed_sequence`), so for it the rows also carry
`cu_seq_lens_q/k` and `max_length_q/k` (`flash_attention_kwargs=True`), which its varlen path reads over the
flattened batch. The padding after the last conversation of a row is its own sequence (positions restart at 0) with
no labels, so it affects nothing.

Restarting positions give each conversation exactly the rotary positions it has unpacked, and each conversation's
first token (BOS) never has a label, so the last token of one conversation never learns to predict the next
conversation: the loss and its gradients equal those of the same conversations batched unpacked
(`tests/test_packing.py`). Media placeholders travel with their conversation and `media_embeds` follow placeholder
order row by row; `labels`, `loss_weights` and `answer_mask` are carried along, so the loss normalisation
(sum(w * CE) / sum(w)) is unchanged.

IMPORTANT for the model call: the packed mask is built only when no KV cache is created, i.e. with
`use_cache=False` (LlamaModel otherwise makes a DynamicCache from `config.use_cache`, and a cache disables the
packed-sequence detection).

Which conversations share a row is planned once over the dataset's token lengths (`plan_packs`: best-fit
decreasing, near-full rows; or greedy next-fit in dataset order); `PackedDataset` serves one row's conversations per
item and `PackingCollator` encodes and packs them.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..model.processing_mm_llama import IGNORE_INDEX, EncodedConversation

PackingMethod = Literal["best_fit_decreasing", "greedy"]
PACKING_METHODS = ("best_fit_decreasing", "greedy")


def plan_packs(
    lengths: Sequence[int], max_seq_len: int, method: PackingMethod = "best_fit_decreasing", seed: int | None = 0
) -> list[list[int]]:
    """Groups item indices into rows whose total length is at most `max_seq_len`.

    Args:
        lengths: token length of each item (conversation), each in [1, max_seq_len].
        max_seq_len: row capacity in tokens.
        method: "best_fit_decreasing": longest items first, each into the fullest row that still has room (rows come
            out nearly full: padding is mostly the last rows' slack); "greedy": items in the given order, a new row
            whenever the next item does not fit (keeps the order, wastes more).
        seed: best_fit_decreasing shuffles items before the stable sort by length, so that rows mix items of equal
            length from all over the dataset; None keeps index order among equal lengths.
    Returns:
        rows as lists of item indices; every index appears exactly once. Rows are returned in creation order (the
        Trainer's sampler shuffles them).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}.")
    if method not in PACKING_METHODS:
        raise ValueError(f"Packing method must be one of {PACKING_METHODS}, got {method!r}.")
    for index, length in enumerate(lengths):
        if not 1 <= length <= max_seq_len:
            raise ValueError(
                f"Item {index} has {length} tokens, outside [1, max_seq_len={max_seq_len}]: truncate or drop longer "
                "conversations before packing (DataArguments.truncation)."
            )
    if method == "greedy":
        rows: list[list[int]] = []
        used = max_seq_len  # forces a first row
        for index, length in enumerate(lengths):
            if used + length > max_seq_len:
                rows.append([])
                used = 0
            rows[-1].append(index)
            used += length
        return rows

    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda index: -lengths[index])  # stable: equal lengths keep the shuffled order
    rows = []
    # Open rows bucketed by free space; `free_sizes` is the sorted list of free sizes that have at least one row.
    by_free: dict[int, list[int]] = {}
    free_sizes: list[int] = []
    for index in order:
        length = lengths[index]
        position = bisect.bisect_left(free_sizes, length)  # the smallest free space that fits: best fit
        if position == len(free_sizes):
            rows.append([index])
            row, free = len(rows) - 1, max_seq_len - length
        else:
            old_free = free_sizes[position]
            row = by_free[old_free].pop()
            if not by_free[old_free]:
                del by_free[old_free]
                free_sizes.pop(position)
            rows[row].append(index)
            free = old_free - length
        if free > 0:
            if free not in by_free:
                by_free[free] = []
                bisect.insort(free_sizes, free)
            by_free[free].append(row)
    return rows


def pack_rows(
    rows: Sequence[Sequence[EncodedConversation]],
    pad_token_id: int,
    media_embeds: Sequence[Sequence[np.ndarray | torch.Tensor | None]] | None = None,
    row_length: int | None = None,
    with_loss_weights: bool = False,
    pad_to_multiple_of: int | None = None,
    flash_attention_kwargs: bool = False,
) -> dict[str, Any]:
    """Concatenates each row's conversations and pads the rows to one length.

    Args:
        rows: for each output row, its encoded conversations in order.
        pad_token_id: id written after the last conversation of a row (never the media placeholder).
        media_embeds: same nesting as `rows`: each conversation's kept media embeddings
            [num_media, tokens_per_media, dim] (or None when it has none), in its placeholder order.
        row_length: pad every row to this length (it must fit the longest row); default: the longest row.
        with_loss_weights: also return `loss_weights` and `answer_mask` (as the collator does when
            prompt_loss_weight > 0).
        pad_to_multiple_of: round the row length up to a multiple of this.
        flash_attention_kwargs: also return `cu_seq_lens_q/k` (int32 [num_sequences + 1], cumulative over the
            flattened batch, padding runs counted as sequences) and `max_length_q/k` (int), which flash_attention_2
            needs to keep sequences apart when the batch has more than one row.
    Returns:
        `input_ids`, `labels`, `position_ids` [rows, length] (long); `loss_weights` (float32) and `answer_mask`
        (bool) [rows, length] when `with_loss_weights`; `media_embeds` [total_media, tokens_per_media, dim]
        (float32, row-major placeholder order) when any conversation has media; the flash-attention kwargs when
        asked. No `attention_mask`: its absence is what makes transformers build the packed-sequence mask.
    """
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("pack_rows needs at least one row and at least one conversation per row.")
    totals = [sum(len(conversation.input_ids) for conversation in row) for row in rows]
    length = max(totals)
    if row_length is not None:
        if row_length < length:
            raise ValueError(f"A packed row has {length} tokens, more than row_length={row_length}.")
        length = row_length
    if pad_to_multiple_of:
        length += -length % pad_to_multiple_of

    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    loss_weights = torch.zeros((len(rows), length), dtype=torch.float32) if with_loss_weights else None
    answer_mask = torch.zeros((len(rows), length), dtype=torch.bool) if with_loss_weights else None
    media: list[np.ndarray] = []
    for row_index, row in enumerate(rows):
        start = 0
        for conversation_index, conversation in enumerate(row):
            size = len(conversation.input_ids)
            stop = start + size
            input_ids[row_index, start:stop] = torch.tensor(conversation.input_ids)
            conversation_labels = torch.tensor(conversation.labels)
            # The first token (BOS) has no label anyway; forcing it keeps the previous conversation's last position
            # from ever being trained to predict this conversation's first token.
            conversation_labels[0] = IGNORE_INDEX
            labels[row_index, start:stop] = conversation_labels
            position_ids[row_index, start:stop] = torch.arange(size)
            if with_loss_weights:
                loss_weights[row_index, start:stop] = torch.tensor(conversation.loss_weights, dtype=torch.float32)
                loss_weights[row_index, start] = 0.0
                answer_mask[row_index, start:stop] = torch.tensor(conversation.answer_mask, dtype=torch.bool)
                answer_mask[row_index, start] = False
            embeds = media_embeds[row_index][conversation_index] if media_embeds is not None else None
            if embeds is not None and len(embeds):
                embeds = np.asarray(embeds, dtype=np.float32)
                media.append(embeds[:, None, :] if embeds.ndim == 2 else embeds)
            start = stop
        # The padding is one more sequence (positions 0, 1, ...): it attends only to itself and has no labels.
        position_ids[row_index, start:] = torch.arange(length - start)

    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if with_loss_weights:
        batch["loss_weights"] = loss_weights
        batch["answer_mask"] = answer_mask
    if media:
        batch["media_embeds"] = torch.from_numpy(np.concatenate(media, axis=0))
    if flash_attention_kwargs:
        batch.update(flash_attention_kwargs_from_position_ids(position_ids))
    return batch


def flash_attention_kwargs_from_position_ids(position_ids: torch.Tensor) -> dict[str, Any]:
    """`cu_seq_lens_q/k` and `max_length_q/k` for flash_attention_2's varlen path, from packed `position_ids`
    [rows, length] (every sequence, padding included, starting at position 0), computed by transformers' own
    `prepare_fa_kwargs_from_position_ids` over the flattened batch. The maxima become Python ints here so that no
    layer has to synchronise with the GPU to read them."""
    from transformers.modeling_flash_attention_utils import (
        prepare_fa_kwargs_from_position_ids,
    )

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, length] index of the packed sequence each position belongs to (0, 0, 1, 1, 1, 2, ... per row): the
    same rule transformers applies (a new sequence wherever the position does not grow by exactly 1)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


class PackedDataset(torch.utils.data.Dataset):
    """A dataset whose item `i` is the list of rows (dataset records) packed into output row `i`.

    Args:
        dataset: any indexable dataset of rows (e.g. a `datasets.Dataset` with the built columns).
        packs: row indices of `dataset` per packed row (from `plan_packs`).
        lengths: token length of each dataset row as it will be packed (after truncation), for statistics.
    """

    def __init__(self, dataset: Any, packs: list[list[int]], lengths: Sequence[int] | None = None):
        self.dataset, self.packs = dataset, packs
        self.pack_lengths = None if lengths is None else [sum(lengths[i] for i in pack) for pack in packs]

    @classmethod
    def from_lengths(
        cls, dataset: Any, lengths: Sequence[int], max_seq_len: int, method: PackingMethod = "best_fit_decreasing",
        seed: int | None = 0,
    ) -> PackedDataset:
        """Plans the packs from the rows' token `lengths`; lengths above `max_seq_len` count as `max_seq_len` (the
        collator truncates those rows to it)."""
        clipped = [min(int(length), max_seq_len) for length in lengths]
        return cls(dataset, plan_packs(clipped, max_seq_len, method=method, seed=seed), clipped)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset[row] for row in self.packs[index]]

    def fill_ratio(self, max_seq_len: int) -> float:
        """Share of the `len(self) * max_seq_len` row positions that hold tokens (1 - padding share at full rows)."""
        if self.pack_lengths is None:
            raise ValueError("fill_ratio needs the lengths the packs were planned from.")
        return sum(self.pack_lengths) / (len(self.packs) * max_seq_len)


@dataclass
class PackingCollator:
    """Collates packed items (lists of dataset rows, from `PackedDataset`) into one packed batch.

    Args:
        collator: the `MMLlamaDataCollator` whose `encode_row` (tokenization, truncation to max_seq_len, media) and
            settings (prompt_loss_weight, pad_to_multiple_of, processor) are used.
        flash_attention_kwargs: add `cu_seq_lens_q/k` / `max_length_q/k` (for attn_implementation
            "flash_attention_2").

    Returns (from `__call__`): see `pack_rows`. A row whose conversations exceed `max_seq_len` after encoding (the
    plan used other lengths) is an error naming its rows. Plain dataset rows (dicts, e.g. from an unpacked
    evaluation split served by the same Trainer) are collated unpacked by the wrapped collator.
    """

    collator: Any
    flash_attention_kwargs: bool = False

    def __call__(self, items: Sequence[Sequence[dict[str, Any]]] | Sequence[dict[str, Any]]) -> dict[str, Any]:
        if items and isinstance(items[0], dict):
            return self.collator(items)
        rows, media = [], []
        for item in items:
            encoded_row, media_row = [], []
            for record in item:
                encoded, embeds = self.collator.encode_row(record)
                encoded_row.append(encoded)
                media_row.append(embeds)
            total = sum(len(encoded.input_ids) for encoded in encoded_row)
            max_seq_len = self.collator.max_seq_len
            if max_seq_len is not None and total > max_seq_len:
                raise ValueError(
                    f"Packed row of records {[record.get('id') for record in item]} has {total} tokens > "
                    f"max_seq_len={max_seq_len}: the packing plan was made from other token lengths (recompute the "
                    "dataset's length column with the same processor, train_on and max_seq_len)."
                )
            rows.append(encoded_row)
            media.append(media_row)
        return pack_rows(
            rows,
            self.collator.processor.pad_token_id,
            media_embeds=media,
            with_loss_weights=self.collator.prompt_loss_weight > 0,
            pad_to_multiple_of=self.collator.pad_to_multiple_of,
            flash_attention_kwargs=self.flash_attention_kwargs,
        )


__all__ = [
    "PACKING_METHODS",
    "PackedDataset",
    "PackingCollator",
    "flash_attention_kwargs_from_position_ids",
    "pack_rows",
    "plan_packs",
    "sequence_ids",
]
