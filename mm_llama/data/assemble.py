"""Records + embedding shards -> one Arrow dataset (the columns of docs/data.md), then a train/validation split."""

from __future__ import annotations

import os

import numpy as np
from datasets import Array3D, Dataset, DatasetDict, Features, List, Value
from datasets.arrow_writer import ArrowWriter

from ..progress import progress_bar
from .media import MediaItem
from .records import SkipLog
from .shards import STATUS_OK, read_shard, shard_path

EMBED_DIM_DEFAULT = 1024


def dataset_features(tokens_per_media: int = 1, dim: int = EMBED_DIM_DEFAULT) -> Features:
    """Columns of a built dataset: `id`, `messages` ({role, content, media_index}), `media_types`,
    `media_embeds` float32 `[num_media, tokens_per_media, dim]` (num_media varies per row, 0 for text-only)."""
    return Features(
        {
            "id": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string"), "media_index": Value("int32")}),
            "media_types": List(Value("string")),
            "media_embeds": Array3D(shape=(None, tokens_per_media, dim), dtype="float32"),
        }
    )


class ShardIndex:
    """Looks up a media key's status and embedding `[tokens_per_media, dim]` across all shard files
    (memory-mapped: the embeddings are not read into RAM until used)."""

    def __init__(self, work_dir: str | os.PathLike, num_shards: int):
        self.shards = [read_shard(shard_path(work_dir, k)) for k in range(num_shards)]
        self.location = {key: (s, row) for s, shard in enumerate(self.shards) for row, key in enumerate(shard.keys)}
        first = next((shard for shard in self.shards if len(shard.keys)), None)
        self.tokens_per_media, self.dim = first.embeddings.shape[1:] if first is not None else (1, None)

    def lookup(self, key: str) -> tuple[str, str | None, np.ndarray]:
        """(status, error, embedding `[tokens_per_media, dim]`) of one media key."""
        s, row = self.location[key]
        shard = self.shards[s]
        return shard.status[row], shard.errors[row], shard.embeddings[row]


def write_rows(
    records: list[tuple[str, dict]],
    index: ShardIndex,
    path: str | os.PathLike,
    skips_by_source: dict[str, SkipLog],
    dim: int,
) -> tuple[Dataset, dict[str, int]]:
    """Writes one row per record whose media all embedded; others are skipped by the media's failure reason.

    `records` are (source name, record) pairs. Returns the memory-mapped dataset and rows written per source.
    """
    tokens = int(index.tokens_per_media)
    features = dataset_features(tokens, dim)
    written = {name: 0 for name in skips_by_source}
    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=1000)
    for source, record in progress_bar(records, desc="assembling", unit="record"):
        embeds = np.zeros((len(record["media"]), tokens, dim), dtype=np.float32)
        failure = None
        for m, item in enumerate(record["media"]):
            status, error, embedding = index.lookup(MediaItem(item["type"], item["path"]).key)
            if status != STATUS_OK:
                failure = (status, error)
                break
            embeds[m] = embedding
        if failure is not None:
            skips_by_source[source].add(failure[0], f"{source} record {record['id']}", failure[1] or failure[0])
            continue
        writer.write(
            {
                "id": record["id"],
                "messages": record["messages"],
                "media_types": [item["type"] for item in record["media"]],
                "media_embeds": embeds,
            }
        )
        written[source] += 1
    writer.finalize()
    return Dataset.from_file(str(path)), written


def split_dataset(dataset: Dataset, validation_ratio: float, seed: int) -> DatasetDict:
    """A `DatasetDict` with "train" and, when `validation_ratio * len` rounds to >= 1 row, "validation".

    Rows are drawn with `seed`, so a rebuild gives the same split. A ratio of 0 gives only "train".
    """
    if not 0.0 <= validation_ratio < 1.0:
        raise ValueError(f"validation_ratio must be in [0, 1), got {validation_ratio}")
    num_validation = min(int(round(len(dataset) * validation_ratio)), max(len(dataset) - 1, 0))
    if num_validation == 0:
        return DatasetDict({"train": dataset})
    split = dataset.train_test_split(test_size=num_validation, seed=seed, shuffle=True)
    return DatasetDict({"train": split["train"], "validation": split["test"]})

