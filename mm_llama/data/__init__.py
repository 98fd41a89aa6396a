"""Raw sources -> conversation records -> Arrow datasets with precomputed ImageBind embeddings.

- `sources`: one reader per format (LLaVA, VideoChat, our JSON/JSONL) yielding validated records.
- `build`: the embedding builder (`build_dataset`), resumable and multi-process, writing a `DatasetDict` and a
  manifest.
- `webvid`: downloads the WebVid videos a VideoChat JSON needs.
"""

from .assemble import dataset_features, split_dataset
from .build import DEFAULT_VALIDATION_RATIO, build_dataset, distinct_media, format_summary, read_all_sources
from .records import SKIP_REASONS, RecordError, SkipLog, validate_record
from .sources import (
    SOURCE_KINDS,
    SourceSpec,
    llava_to_record,
    read_llava,
    read_records,
    read_source,
    read_videochat,
    resolve_video_path,
    videochat_to_records,
)
from .webvid import OfflineError, download_webvid

from .collator import MMLlamaDataCollator

__all__ = [
    "DEFAULT_VALIDATION_RATIO",
    "MMLlamaDataCollator",
    "SKIP_REASONS",
    "SOURCE_KINDS",
    "OfflineError",
    "RecordError",
    "SkipLog",
    "SourceSpec",
    "build_dataset",
    "dataset_features",
    "distinct_media",
    "download_webvid",
    "format_summary",
    "llava_to_record",
    "read_all_sources",
    "read_llava",
    "read_records",
    "read_source",
    "read_videochat",
    "resolve_video_path",
    "split_dataset",
    "validate_record",
    "videochat_to_records",
]
