"""Raw sources -> conversation records -> Arrow datasets with precomputed ImageBind embeddings.

- `sources`: one reader per format (LLaVA, VideoChat, our JSON/JSONL) yielding validated records.
- `build`: the embedding builder (`build_dataset`), resumable and multi-process, writing a `DatasetDict` and a
  manifest; `build_config`: its options (`BuildConfig`).
- `collator`: training batches from built rows; `packing`: several conversations per row, padding-free.
- `webvid`: downloads the WebVid videos a VideoChat JSON needs.

The names below are imported on first use, so that the light readers (`mm_llama.data.sources`) do not pull in torch
and datasets.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_PUBLIC_NAMES = {
    "dataset_features": "assemble", "split_dataset": "assemble",
    "BuildConfig": "build_config", "DEFAULT_VALIDATION_RATIO": "build_config",
    "build_dataset": "build", "distinct_media": "build", "format_summary": "build", "read_all_sources": "build",
    "MMLlamaDataCollator": "collator",
    "PackedDataset": "packing", "PackingCollator": "packing", "pack_rows": "packing", "plan_packs": "packing",
    "SKIP_REASONS": "records", "RecordError": "records", "SkipLog": "records", "validate_record": "records",
    "SOURCE_KINDS": "sources", "SourceSpec": "sources", "iter_jsonl": "sources", "llava_to_record": "sources",
    "read_llava": "sources", "read_records": "sources", "read_source": "sources", "read_videochat": "sources",
    "resolve_video_path": "sources", "videochat_to_records": "sources",
    "OfflineError": "webvid", "download_webvid": "webvid",
}  # fmt: skip


__getattr__ = lazy_getattr(__name__, _PUBLIC_NAMES)


__all__ = sorted(_PUBLIC_NAMES)
