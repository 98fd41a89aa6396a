"""On-disk ImageBind embedding cache for benchmark runs: a second run of a benchmark, or another checkpoint evaluated
on the same benchmark, never embeds a media item again.

Key scheme:
  - the encoder's fingerprint: sha256 of the dataset manifest's encoder description (`encoder_description`: class,
    config hash, weights digest, image size; not its name, which is the folder it was loaded from, so that the same
    ImageBind weights in another folder or inside another MM-LLaMA checkpoint share entries) plus the weights' dtype
    and the image processor's settings (image size, normalisation, video clip sampling), since each of them changes
    the embedding;
  - the media item's content: sha256 of the file's bytes for a path, of mode, size and decoded pixels for an
    in-memory PIL image or array (what benchmark documents hold), plus the media type.

Layout: `{cache_dir}/{fingerprint[:16]}/encoder.json` (the description the fingerprint hashes, for people) and
`{cache_dir}/{fingerprint[:16]}/{hash[:2]}/{hash}.{image|video}.npy` (float32 `[tokens_per_media, dim]`, exactly the
vector that was computed). Entries are written atomically (temporary file, then rename), so that two processes
evaluating at the same time, or a run killed mid-write, never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ...data.embed import encoder_description
from ...generation import MediaEmbedder
from ...imagebind.processing_imagebind import MediaLoadError

CACHE_ENV = "MM_LLAMA_EMBEDDING_CACHE"
_HASH_CHUNK = 1 << 20
# Image processor keys that do not change what it computes.
_VOLATILE_PROCESSOR_KEYS = {"image_processor_type", "processor_class", "_processor_class"}


def default_cache_dir() -> Path:
    """`$MM_LLAMA_EMBEDDING_CACHE`, else `~/.cache/mm_llama/embeddings`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mm_llama" / "embeddings")


def encoder_fingerprint(encoder: torch.nn.Module, image_processor: Any) -> tuple[str, dict]:
    """(sha256 hex, the description it hashes) of everything that decides an embedding besides the media itself."""
    parameter = next(encoder.parameters())
    settings = image_processor.to_dict() if image_processor is not None else {}
    encoder_info = encoder_description(encoder)
    description = {
        "encoder": {key: value for key, value in encoder_info.items() if key != "name"},
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "preprocessing": {key: value for key, value in sorted(settings.items()) if key not in _VOLATILE_PROCESSOR_KEYS},
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    return digest, {**description, "encoder_name": encoder_info["name"]}


def media_content_hash(source: Any) -> str:
    """sha256 hex of a media item's content.

    Args:
        source: a file path (its bytes are hashed), a PIL image (mode, size and decoded pixels), or a numpy array /
            tensor (dtype, shape and values).
    Raises:
        MediaLoadError: an in-memory image that cannot be decoded (e.g. a lazily opened, truncated file).
        TypeError: any other source type.
    """
    digest = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        digest.update(b"file\0")
        with open(source, "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    elif isinstance(source, PIL.Image.Image):
        try:
            pixels = source.tobytes()  # decodes a lazily opened image: a truncated file fails here
        except (OSError, SyntaxError, ValueError) as err:
            raise MediaLoadError(f"The image could not be decoded ({err}).") from err
        digest.update(f"pil\0{source.mode}\0{source.size[0]}x{source.size[1]}\0".encode())
        digest.update(pixels)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        array = np.ascontiguousarray(array)
        digest.update(f"array\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    else:
        raise TypeError(f"Cannot hash a {type(source).__name__} media source; pass a path, PIL image or array.")
    return digest.hexdigest()


@dataclass
class CacheStats:
    """Distinct media looked up in this process: `hits` were read from disk, `misses` were embedded (and written)."""

    hits: int = 0
    misses: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Fraction of lookups served from disk (1.0 when nothing was looked up)."""
        return self.hits / self.lookups if self.lookups else 1.0


class EmbeddingCache:
    """Embeddings on disk under one encoder fingerprint (see the module docstring for the layout)."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, description: dict):
        self.root = Path(cache_dir).expanduser() / fingerprint[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "encoder.json"
        if not info.is_file():
            _atomic_write(info, json.dumps({"fingerprint": fingerprint, **description}, indent=2, sort_keys=True,
                                           default=str).encode())

    def path(self, media_type: str, content_hash: str) -> Path:
        return self.root / content_hash[:2] / f"{content_hash}.{media_type}.npy"

    def get(self, media_type: str, content_hash: str) -> torch.Tensor | None:
        """The stored embedding, or None when absent or unreadable (an unreadable entry is then rewritten)."""
        path = self.path(media_type, content_hash)
        if not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError, EOFError):  # a damaged entry (disk full, copied half): embed again
            return None

    def put(self, media_type: str, content_hash: str, embedding: torch.Tensor) -> None:
        path = self.path(media_type, content_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.ascontiguousarray(embedding.detach().float().cpu().numpy())
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(handle.name, path)


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)


class CachedMediaEmbedder(MediaEmbedder):
    """A `MediaEmbedder` whose raw image and video encodings go through an `EmbeddingCache` on disk.

    Build it with `CachedMediaEmbedder.for_model(...)` and call `open_cache(dir)`; without an open cache it embeds as
    `MediaEmbedder` does. Audio is never cached here: the fingerprint describes the vision encoder only. `stats` counts
    each distinct medium once per process: found on disk, or embedded (and written).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cache: EmbeddingCache | None = None
        self.stats = CacheStats()
        self._counted: set[tuple[str, str]] = set()  # (type, content hash): a set, so memory stays small
        self._file_hashes: dict[tuple[str, int, int], str] = {}

    def open_cache(self, cache_dir: str | Path) -> EmbeddingCache:
        """Uses `cache_dir` for this embedder's encoder (needs an encoder: the cache is keyed by its fingerprint)."""
        if self.encoder is None:
            raise ValueError("An embedding cache needs an encoder (a vision tower or a standalone ImageBind model).")
        fingerprint, description = encoder_fingerprint(self.encoder, self.image_processor)
        self.cache = EmbeddingCache(cache_dir, fingerprint, description)
        return self.cache

    def content_hash(self, source: Any) -> str:
        """`media_content_hash`, memoised per file (path, size, modification time) so a file is read once a run."""
        if not isinstance(source, (str, os.PathLike)):
            return media_content_hash(source)
        status = os.stat(source)
        key = (os.path.abspath(source), status.st_size, status.st_mtime_ns)
        if key not in self._file_hashes:
            self._file_hashes[key] = media_content_hash(source)
        return self._file_hashes[key]

    def encode_raw(self, media_type: str, source: Any) -> torch.Tensor:
        """The cached embedding `[dim]` of a raw image or video (read from disk, or embedded and written)."""
        if self.cache is None or media_type not in ("image", "video"):
            return super().encode_raw(media_type, source)
        content_hash = self.content_hash(source)
        key = (media_type, content_hash)
        embedding = self.cache.get(media_type, content_hash)
        if embedding is None:
            embedding = super().encode_raw(media_type, source).float().cpu()
            self.cache.put(media_type, content_hash, embedding)
            if key not in self._counted:
                self.stats.misses += 1
        elif key not in self._counted:
            self.stats.hits += 1
        self._counted.add(key)
        return embedding


__all__ = [
    "CACHE_ENV",
    "CacheStats",
    "CachedMediaEmbedder",
    "EmbeddingCache",
    "default_cache_dir",
    "encoder_fingerprint",
    "media_content_hash",
]
