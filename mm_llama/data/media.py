"""Decoding media files for the encoder, in DataLoader workers, with failures returned as markers.

A decode failure is bad input, not a bug: the worker returns a marker with the skip reason instead of raising, so
one unreadable file never stops a build that may have run for hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .records import SKIP_CORRUPT_MEDIA, SKIP_EMPTY_MEDIA, SKIP_MISSING_MEDIA


@dataclass(frozen=True, order=True)
class MediaItem:
    """One distinct media file to embed. Ordered by (type, path) so that a build's media list is deterministic."""

    type: str
    path: str

    @property
    def key(self) -> str:
        """Stable identifier stored in shard files: `"image:/abs/path.jpg"`."""
        return f"{self.type}:{self.path}"


MEDIA_KINDS = ("image", "video", "audio")
_SKIP_REASON = {"missing": SKIP_MISSING_MEDIA, "empty": SKIP_EMPTY_MEDIA, "corrupt": SKIP_CORRUPT_MEDIA}


def decode_media(item: MediaItem, image_size: int, audio_processor: Any | None = None) -> dict[str, Any]:
    """Decodes one file; returns `{"pixels": Tensor | None, "reason": str | None, "error": str | None}`.

    Pixels: image `[3, S, S]`, video `[15, 3, 2, S, S]` (5 clips x 3 spatial crops, 2 frames each), S=image_size;
    audio `[3, 1, 128, 204]` (3 clips' fbank features, from `audio_processor`, an `ImageBindAudioProcessor`).
    On failure `pixels` is None and `reason` is missing_media, empty_media or corrupt_media.
    """
    # Imported here so that readers and tests of the record logic do not need the encoder package.
    from mm_llama.imagebind import MediaLoadError, load_image, load_video

    try:
        if item.type == "audio":
            pixels = audio_processor.preprocess_audio(item.path)
        else:
            pixels = (load_image if item.type == "image" else load_video)(item.path, image_size=image_size)
    except MediaLoadError as error:
        return {"pixels": None, "reason": _SKIP_REASON[error.problem], "error": str(error)}
    except Exception as error:  # noqa: BLE001 - decoders (PIL, decord) raise many types; any is a bad file here.
        return {"pixels": None, "reason": SKIP_CORRUPT_MEDIA, "error": f"{item.path}: {type(error).__name__}: {error}"}
    return {"pixels": pixels, "reason": None, "error": None}


class MediaDecodeDataset(Dataset):
    """Map-style dataset over media items; `__getitem__(i)` decodes item i (see `decode_media`) and adds `"index"`."""

    def __init__(self, items: list[MediaItem], image_size: int, audio_processor: Any | None = None):
        self.items = items
        self.image_size = image_size
        self.audio_processor = audio_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {"index": index, "type": item.type, **decode_media(item, self.image_size, self.audio_processor)}


def collate_media(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups decoded samples by kind for the encoder.

    Returns `{"images": Tensor [Bi, 3, S, S] | None, "videos": Tensor [Bv, 15, 3, 2, S, S] | None, "audios": Tensor
    [Ba, 3, 1, 128, 204] | None, "image_indices" / "video_indices" / "audio_indices": list[int], "failures":
    list[(index, reason, error)]}`.
    """
    batch: dict[str, Any] = {"failures": []}
    grouped: dict[str, list[torch.Tensor]] = {kind: [] for kind in MEDIA_KINDS}
    indices: dict[str, list[int]] = {kind: [] for kind in MEDIA_KINDS}
    for sample in samples:
        if sample["pixels"] is None:
            batch["failures"].append((sample["index"], sample["reason"], sample["error"]))
        else:
            grouped[sample["type"]].append(sample["pixels"])
            indices[sample["type"]].append(sample["index"])
    for kind in MEDIA_KINDS:
        batch[f"{kind}s"] = torch.stack(grouped[kind]) if grouped[kind] else None
        batch[f"{kind}_indices"] = indices[kind]
    return batch
