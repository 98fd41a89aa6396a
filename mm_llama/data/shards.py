"""Embedding shards on disk: the unit of resumable work.

The distinct media items of a build, sorted, are cut into shards of `shard_size` items. A shard's embeddings are
written to `media-{k:05d}.arrow` (Arrow IPC file, memory-mappable) via a temporary file and an atomic rename, so a
shard file that exists is complete: a killed build resumes by skipping the shards whose files exist. `plan.json`
holds the fingerprint of the work (media list, encoder, dtype, shard size); a re-run with a different plan is
refused rather than silently mixing embeddings of two builds.

Shard columns: `key` (string, `MediaItem.key`), `status` ("ok" or a skip reason), `error` (string or null),
`embedding` (fixed-size list of tokens_per_media * dim float32; zeros when status is not "ok").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .media import MediaItem

PLAN_FILE = "plan.json"
STATUS_OK = "ok"


def shard_path(work_dir: str | os.PathLike, shard_id: int) -> Path:
    """Path of shard `shard_id`'s file in `work_dir`."""
    return Path(work_dir) / f"media-{shard_id:05d}.arrow"


def num_shards(num_items: int, shard_size: int) -> int:
    """Number of shards for `num_items` media items (0 items: 0 shards)."""
    return (num_items + shard_size - 1) // shard_size


def shard_range(shard_id: int, shard_size: int, num_items: int) -> range:
    """Indices into the build's media list that shard `shard_id` covers."""
    return range(shard_id * shard_size, min((shard_id + 1) * shard_size, num_items))


def shards_for_process(total: int, process_index: int, num_processes: int) -> list[int]:
    """The shards one process embeds: every `num_processes`-th, starting at its index (balanced when shards are
    equal-sized, and independent of which shards are already done so that processes agree without talking)."""
    return list(range(process_index, total, num_processes))


def media_fingerprint(items: list[MediaItem], encoder: dict, dtype: str, shard_size: int) -> str:
    """sha256 identifying the embedding work: same media list, encoder and settings -> same shards."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"encoder": encoder, "dtype": dtype, "shard_size": shard_size}, sort_keys=True).encode())
    for item in items:
        digest.update(item.key.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class ShardWriter:
    """Writes one shard atomically. `embeddings`: float32 `[n, tokens_per_media, dim]`."""

    work_dir: Path

    def write(self, shard_id: int, keys: list[str], status: list[str], errors: list[str | None],
              embeddings: np.ndarray) -> Path:
        """Writes shard `shard_id` (all arrays in shard order) and returns its path."""
        n, tokens, dim = embeddings.shape
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "status": pa.array(status, pa.string()),
                "error": pa.array(errors, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, tokens * dim),
            }
        ).replace_schema_metadata({"tokens_per_media": str(tokens), "dim": str(dim)})
        final = shard_path(self.work_dir, shard_id)
        temporary = final.with_name(final.name + ".tmp")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(temporary, final)
        return final


@dataclass
class LoadedShard:
    """A shard read back: keys, status, errors and the memory-mapped embeddings `[n, tokens_per_media, dim]`."""

    keys: list[str]
    status: list[str]
    errors: list[str | None]
    embeddings: np.ndarray


def read_shard(path: str | os.PathLike) -> LoadedShard:
    """Reads a shard file; embeddings stay memory-mapped (no copy into RAM)."""
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    metadata = table.schema.metadata or {}
    tokens, dim = int(metadata[b"tokens_per_media"]), int(metadata[b"dim"])
    embedding = table.column("embedding").combine_chunks()
    values = embedding.values.to_numpy(zero_copy_only=True) if len(embedding) else np.zeros(0, np.float32)
    return LoadedShard(
        keys=table.column("key").to_pylist(),
        status=table.column("status").to_pylist(),
        errors=table.column("error").to_pylist(),
        embeddings=values.reshape(len(embedding), tokens, dim),
    )


def finished_shards(work_dir: str | os.PathLike, items: list[MediaItem], shard_size: int,
                    shard_ids: list[int] | None = None) -> set[int]:
    """Of `shard_ids` (default all), the shards whose files exist and hold exactly the expected keys (anything else
    is redone)."""
    done = set()
    for shard_id in shard_ids if shard_ids is not None else range(num_shards(len(items), shard_size)):
        path = shard_path(work_dir, shard_id)
        if not path.exists():
            continue
        try:
            with pa.memory_map(str(path), "r") as source:
                keys = pa.ipc.open_file(source).read_all().column("key").to_pylist()
        except (pa.ArrowInvalid, OSError):
            continue  # unreadable: embed again
        expected = [items[i].key for i in shard_range(shard_id, shard_size, len(items))]
        if keys == expected:
            done.add(shard_id)
    return done


def write_plan(work_dir: str | os.PathLike, plan: dict) -> None:
    """Writes `plan.json` (fingerprint and sizes) in `work_dir`."""
    path = Path(work_dir) / PLAN_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(plan, indent=2, sort_keys=True))
    os.replace(temporary, path)


def read_plan(work_dir: str | os.PathLike) -> dict | None:
    """The plan of an earlier, unfinished build in `work_dir`, or None."""
    path = Path(work_dir) / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None
