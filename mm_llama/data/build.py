"""The embedding builder: sources -> records -> ImageBind embeddings in resumable shards -> Arrow `DatasetDict`.

Output folder layout:
```
output/
  dataset_dict.json, train/, validation/    DatasetDict.save_to_disk (columns: see assemble.dataset_features)
  manifest.json                             sources, encoder, counts, skipped records by reason, time taken
  _shards/                                  while building only: plan.json + media-XXXXX.arrow
```
Multi-process (`accelerate launch`): every process reads the sources (deterministic), embeds its slice of the
shards on its own device, and the main process assembles once all shards exist. Shard contents do not depend on
the number of processes, so the dataset is the same as with one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from accelerate import PartialState

from .assemble import ShardIndex, split_dataset, write_rows
from .build_config import BuildConfig
from ..loading import resolve_dtype
from ..progress import progress_bar, progress_bars, progress_bars_enabled
from .embed import embed_shards, encoder_description
from .media import MEDIA_KINDS, MediaItem
from .records import MEDIA_SKIP_REASONS, SkipLog
from .shards import (
    finished_shards,
    media_fingerprint,
    num_shards,
    read_plan,
    shards_for_process,
    write_plan,
)
from .sources import SourceSpec, read_source

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
WORK_DIR = "_shards"
MANIFEST_VERSION = 1
# What a build writes in its output folder; `overwrite` removes only these, never anything else a user keeps there.
_BUILD_ARTEFACTS = (MANIFEST_FILE, "dataset_dict.json", "train", "validation", WORK_DIR)


def read_all_sources(sources: list[SourceSpec]) -> tuple[list[tuple[str, dict]], dict[str, SkipLog]]:
    """Reads every source: (source name, record) pairs in source order, and a SkipLog per source name."""
    names = [spec.name for spec in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Source names must be distinct, got {names}; give each source its own name.")
    records: list[tuple[str, dict]] = []
    skips = {spec.name: SkipLog() for spec in sources}
    for spec in sources:
        for record in progress_bar(read_source(spec, skips[spec.name]), desc=f"reading {spec.name}",
                                   unit="record"):
            records.append((spec.name, record))
    return records, skips


def distinct_media(records: list[tuple[str, dict]]) -> list[MediaItem]:
    """The distinct media files of all records, sorted: each is embedded once however many records use it."""
    return sorted({MediaItem(item["type"], item["path"]) for _, record in records for item in record["media"]})


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuses to build over a finished dataset or into a folder that is not ours (unless `overwrite`)."""
    if overwrite or not output.exists():
        return
    if (output / MANIFEST_FILE).exists() or (output / "dataset_dict.json").exists():
        raise FileExistsError(
            f"{output} already holds a built dataset. Pass --overwrite (overwrite=True) to rebuild it, "
            f"or choose another output folder."
        )
    others = sorted(p.name for p in output.iterdir() if p.name != WORK_DIR)
    if others:
        raise FileExistsError(
            f"{output} is not empty ({', '.join(others[:5])}) and holds no unfinished build. "
            f"Choose a new or empty output folder."
        )


def _remove_artefacts(output: Path) -> None:
    """Removes what an earlier build wrote in `output` (and nothing else)."""
    for name in _BUILD_ARTEFACTS:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build_dataset(
    sources: list[SourceSpec],
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    config: BuildConfig | None = None,
    *,
    device: torch.device | str | None = None,
    on_shard_written: Callable[[int], None] | None = None,
    audio_model: torch.nn.Module | None = None,
    **options: Any,
) -> dict:
    """Builds the dataset of `sources` with encoder `model` into `output_dir`; returns the manifest.

    Args:
        sources: the inputs (see `SourceSpec`); their records are concatenated in this order.
        model: an ImageBind vision encoder (`embed_images`, `embed_videos`, `config.image_size`); it is moved to
            the device and cast to `config.dtype` in place.
        output_dir: receives the `DatasetDict` (save_to_disk) and `manifest.json`.
        config: the build options (`BuildConfig`); `**options` are its fields by name and override it
            (`build_dataset(..., shard_size=2)`).
        device: where the encoder runs; default the accelerate process's device (GPU when present).
        on_shard_written: called with each shard id once its file is complete.
        audio_model: the ImageBind audio encoder, needed when records carry audio (our records format); moved and
            cast like `model`.

    Raises:
        FileExistsError: the output holds a finished build (without `overwrite`) or unrelated files.
        ValueError: an unfinished build in `output_dir` used other media, encoder or settings; bad options.
    """
    started = time.monotonic()
    config = dataclasses.replace(config or BuildConfig(), **options)
    torch_dtype = resolve_dtype(config.dtype, torch.device("cpu"))  # checked now, not after reading the sources
    # cpu=True is what makes accelerate set up a multi-process CPU group (torchrun on a machine without GPUs);
    # without it, processes launched on CPU would each believe they are alone.
    state = PartialState(cpu=device is not None and torch.device(device).type == "cpu")
    output, work = Path(output_dir), Path(output_dir) / WORK_DIR
    # Only the local main process draws bars (the others would draw over its lines).
    with contextlib.nullcontext() if state.is_local_main_process else progress_bars(False):
        records, skips = read_all_sources(sources)
        items = distinct_media(records)
        num_audio = sum(item.type == "audio" for item in items)
        if num_audio and audio_model is None:  # said now, not after hours of embedding the images
            raise ValueError(
                f"The sources have {num_audio} audio files but no ImageBind audio model was given: pass --encoder "
                "with a folder converted by `mm-llama convert-imagebind --modality all`."
            )
        target = torch.device(device) if device is not None else state.device
        model = model.to(device=target, dtype=torch_dtype).eval()
        audio_model = audio_model.to(device=target, dtype=torch_dtype).eval() if num_audio else None
        build = _Build(sources, records, skips, items, _encoders_description(model, audio_model), config)

        build.resumed = _prepare_work_dir(state, output, work, build)
        mine = shards_for_process(build.plan["num_shards"], state.process_index, state.num_processes)
        done = finished_shards(work, items, config.shard_size, shard_ids=mine)
        embed_shards(
            model, items, [k for k in mine if k not in done], config.shard_size, work,
            device=next(model.parameters()).device, dtype=torch_dtype, batch_size=config.batch_size,
            num_workers=config.num_workers,
            description=f"embedding (process {state.process_index})" if state.num_processes > 1 else "embedding",
            on_shard_written=on_shard_written, audio_model=audio_model,
        )
        state.wait_for_everyone()
        if state.is_main_process:
            _assemble(build, output, int(model.config.projection_dim), state.num_processes, started)
    state.wait_for_everyone()
    with open(output / MANIFEST_FILE, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass
class _Build:
    """What one build works on: its sources' records, their distinct media, the encoders and the shard plan."""

    sources: list[SourceSpec]
    records: list[tuple[str, dict]]
    skips: dict[str, SkipLog]
    items: list[MediaItem]
    encoder: dict
    config: BuildConfig
    resumed: int = 0  # shards an earlier, unfinished run had already embedded

    @functools.cached_property
    def plan(self) -> dict:
        """The shard plan (`_shards/plan.json`): an unfinished build resumes only under the same fingerprint."""
        shard_size = self.config.shard_size
        return {
            "fingerprint": media_fingerprint(self.items, self.encoder, self.config.dtype, shard_size),
            "num_media": len(self.items),
            "shard_size": shard_size,
            "num_shards": num_shards(len(self.items), shard_size),
            "encoder": self.encoder,
            "dtype": self.config.dtype,
        }


def _encoders_description(model: torch.nn.Module, audio_model: torch.nn.Module | None) -> dict:
    """The encoder part of the plan and manifest: the vision encoder's description, with the audio encoder's under
    "audio" when the build embeds audio."""
    encoder = encoder_description(model)
    if audio_model is not None:
        encoder["audio"] = encoder_description(audio_model)
    return encoder


def _prepare_work_dir(state: PartialState, output: Path, work: Path, build: _Build) -> int:
    """Clears (`overwrite`) or checks the output folder, checks that an unfinished build there has the same plan, and
    writes the plan; returns how many shards are already embedded. Every process runs the same read-only checks, so
    that all raise together instead of some waiting forever."""
    plan = build.plan
    if build.config.overwrite and state.is_main_process:
        _remove_artefacts(output)
    state.wait_for_everyone()
    _check_output(output, build.config.overwrite)
    earlier = read_plan(work)
    if earlier is not None and earlier.get("fingerprint") != plan["fingerprint"]:
        raise ValueError(
            f"{work} holds shards of an unfinished build with other media, encoder or settings "
            f"(earlier: {earlier.get('num_media')} media, encoder {earlier.get('encoder', {}).get('name')}, "
            f"dtype {earlier.get('dtype')}, shard size {earlier.get('shard_size')}). "
            f"Pass --overwrite (overwrite=True) to restart, or use another output folder."
        )
    state.wait_for_everyone()
    resumed = 0
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        write_plan(work, plan)
        resumed = len(finished_shards(work, build.items, build.config.shard_size))
        if resumed:
            logger.info("Resuming: %d of %d shards already embedded in %s.", resumed, plan["num_shards"], work)
    state.wait_for_everyone()
    return resumed


def _assemble(build: _Build, output: Path, projection_dim: int, num_processes: int, started: float) -> None:
    """Main process, once every shard exists: the records' rows with their embeddings -> the split `DatasetDict` and
    `manifest.json` in `output`; then removes the shards unless `keep_shards`."""
    work = output / WORK_DIR
    index = ShardIndex(work, build.plan["num_shards"])
    dim = int(index.dim or projection_dim)
    dataset, written = write_rows(build.records, index, work / "assembled.arrow", build.skips, dim)
    splits = split_dataset(dataset, build.config.validation_ratio, build.config.seed)
    # datasets came in with this module, after the command turned the switch off: turned off again, it reaches
    # datasets' bars too (and leaves them as they were afterwards).
    with contextlib.nullcontext() if progress_bars_enabled() else progress_bars(False):
        # An empty split saved with the default sharding has no data file and cannot be loaded back; one
        # explicit shard keeps it loadable.
        splits.save_to_disk(str(output), num_shards={name: 1 for name, split in splits.items() if not len(split)})
    media_failed = sum(1 for shard in index.shards for status in shard.status if status != "ok")
    manifest = _manifest(build, written, splits, media_failed, num_processes, time.monotonic() - started)
    with open(output / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    del index, dataset, splits  # release the memory maps before deleting their files
    if not build.config.keep_shards:
        shutil.rmtree(work)


def _manifest(build: _Build, written: dict[str, int], splits: datasets.DatasetDict, media_failed: int,
              num_processes: int, seconds: float) -> dict:
    """The JSON manifest of a finished build."""
    sources, skips, config = build.sources, build.skips, build.config
    total_skips = SkipLog()
    for log in skips.values():
        total_skips.merge(log)
    # Everything a source's reader looked at: its valid records plus those it skipped (media are checked later, by
    # the builder, so a record skipped for its media is among the valid ones): read = written + skipped.
    read_per_source = {spec.name: sum(count for reason, count in skips[spec.name].counts.items()
                                      if reason not in MEDIA_SKIP_REASONS) for spec in sources}
    for name, _ in build.records:
        read_per_source[name] += 1
    media_by_type = {kind: sum(1 for item in build.items if item.type == kind) for kind in MEDIA_KINDS}
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": [
            {**spec.to_dict(), "records_read": read_per_source[spec.name], "records_written": written[spec.name],
             "skipped": skips[spec.name].to_dict()}
            for spec in sources
        ],
        "encoder": {**build.encoder, "dtype": config.dtype},
        "counts": {
            "records_read": sum(read_per_source.values()),
            "records_written": sum(written.values()),
            "splits": {name: len(split) for name, split in splits.items()},
            "media_distinct": len(build.items),
            "media_by_type": media_by_type,
            "media_failed": media_failed,
        },
        "skipped": total_skips.to_dict(),
        "split": {"validation_ratio": config.validation_ratio, "seed": config.seed},
        "build": {
            "shard_size": config.shard_size,
            "num_shards": build.plan["num_shards"],
            "shards_resumed": build.resumed,
            "num_processes": num_processes,
            "batch_size": config.batch_size,
            "num_workers": config.num_workers,
        },
        "time_taken_s": round(seconds, 3),
    }


def format_summary(manifest: dict) -> str:
    """A human-readable summary of a manifest: rows per split, media, and skipped records by reason."""
    counts = manifest["counts"]
    lines = [
        f"records read: {counts['records_read']}, written: {counts['records_written']} "
        f"({', '.join(f'{name}: {n}' for name, n in counts['splits'].items())})",
        f"media: {counts['media_distinct']} distinct ("
        + ", ".join(f"{n} {kind}s" for kind, n in counts["media_by_type"].items() if n or kind != "audio")
        + f"), {counts['media_failed']} unreadable",
    ]
    skipped = manifest["skipped"]
    lines.append(f"skipped records: {skipped['total']}")
    for reason, count in skipped["by_reason"].items():
        lines.append(f"  {reason}: {count}")
        for example in skipped["examples"].get(reason, [])[:2]:
            lines.append(f"    e.g. {example}")
    lines.append(f"time taken: {manifest['time_taken_s']:.1f} s")
    return "\n".join(lines)
