"""Running the encoder over media shards: DataLoader workers decode, the encoder embeds in batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..progress import progress_bar
from .media import MediaDecodeDataset, MediaItem, collate_media
from .shards import STATUS_OK, ShardWriter, shard_range


# Config keys that do not change what the encoder computes, left out of its hash.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}


def encoder_description(model: torch.nn.Module) -> dict:
    """Name, config hash and a weights digest of an encoder, identifying it in plans and manifests.

    The weights digest hashes the first elements of every parameter: cheap, and different for two checkpoints (or
    two random inits) that share a config.
    """
    config = model.config.to_dict()
    stable = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}
    weights = hashlib.sha256()
    for name, parameter in model.named_parameters():
        weights.update(name.encode())
        weights.update(parameter.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return {
        "name": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "config_hash": hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_digest": weights.hexdigest()[:16],
        **({"image_size": int(model.config.image_size)} if hasattr(model.config, "image_size") else {}),
    }


def _as_tokens(embeddings: torch.Tensor) -> np.ndarray:
    """Encoder output `[B, D]` (ImageBind: one vector per item) or `[B, T, D]` -> float32 `[B, T, D]`."""
    if embeddings.dim() == 2:
        embeddings = embeddings.unsqueeze(1)
    return embeddings.float().cpu().numpy()


def embed_shards(
    model: torch.nn.Module,
    items: list[MediaItem],
    shard_ids: list[int],
    shard_size: int,
    work_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    num_workers: int = 4,
    description: str = "embedding",
    on_shard_written: Callable[[int], None] | None = None,
    audio_model: torch.nn.Module | None = None,
) -> None:
    """Embeds the media of `shard_ids` and writes one shard file each (see `shards.py`).

    `model` must offer the vision model's `embed_media(pixel_values=[B, 3, S, S] | video_pixel_values=[B, 15, 3, 2,
    S, S]) -> [B, D]` and sit on `device` in `dtype`; S is `model.config.image_size`. Audio items need `audio_model`
    (`ImageBindAudioModel.embed_media(input_features) -> [B, D]`), on the same device in the same dtype. Batches never
    cross a shard boundary, so a shard's embeddings do not depend on which other shards are (re)done in the same run
    or by which process. `on_shard_written(shard_id)` is called after each shard file is complete (progress hooks,
    tests).
    """
    if not shard_ids:
        return
    audio_processor = None
    if audio_model is not None:
        from mm_llama.imagebind import ImageBindAudioProcessor

        audio_processor = ImageBindAudioProcessor(num_mel_bins=audio_model.config.num_mel_bins,
                                                  target_length=audio_model.config.target_length)
    dataset = MediaDecodeDataset(items, image_size=int(model.config.image_size), audio_processor=audio_processor)
    batches: list[list[int]] = []
    batch_shard: list[int] = []
    for shard_id in shard_ids:
        indices = list(shard_range(shard_id, shard_size, len(items)))
        for start in range(0, len(indices), batch_size):
            batches.append(indices[start : start + batch_size])
            batch_shard.append(shard_id)
    remaining_batches = {shard_id: batch_shard.count(shard_id) for shard_id in shard_ids}
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_media,
        pin_memory=device.type == "cuda",
    )
    writer = ShardWriter(Path(work_dir))
    pending: dict[int, dict[int, tuple[str, str | None, np.ndarray | None]]] = {}
    dim_tokens: tuple[int, int] | None = None
    with torch.inference_mode(), progress_bar(total=len(batches), desc=description, unit="batch") as bar:
        for shard_id, batch in zip(batch_shard, loader):
            results = pending.setdefault(shard_id, {})
            for index, reason, error in batch["failures"]:
                results[index] = (reason, error, None)
            for kind, encoder, argument in (("image", model, "pixel_values"), ("video", model, "video_pixel_values"),
                                            ("audio", audio_model, "input_features")):
                if batch[f"{kind}s"] is None:
                    continue
                pixels = batch[f"{kind}s"].to(device=device, dtype=dtype, non_blocking=True)
                vectors = _as_tokens(encoder.embed_media(**{argument: pixels}))
                dim_tokens = vectors.shape[1:]
                for index, vector in zip(batch[f"{kind}_indices"], vectors):
                    results[index] = (STATUS_OK, None, vector)
            remaining_batches[shard_id] -= 1
            bar.update(1)
            if remaining_batches[shard_id] == 0:
                _write_shard(writer, shard_id, items, shard_size, pending.pop(shard_id), dim_tokens, model)
                if on_shard_written is not None:
                    on_shard_written(shard_id)


def _write_shard(writer: ShardWriter, shard_id: int, items: list[MediaItem], shard_size: int,
                 results: dict, dim_tokens: tuple[int, int] | None, model: torch.nn.Module) -> None:
    """Orders one shard's results by media index and writes them (zeros stand in for failed items)."""
    indices = list(shard_range(shard_id, shard_size, len(items)))
    # A shard whose every item failed has seen no encoder output; the config gives the output size.
    tokens, dim = dim_tokens if dim_tokens is not None else (1, int(model.config.projection_dim))
    embeddings = np.zeros((len(indices), tokens, dim), dtype=np.float32)
    status, errors = [], []
    for row, index in enumerate(indices):
        state, error, vector = results[index]
        status.append(state)
        errors.append(error)
        if vector is not None:
            embeddings[row] = vector
    writer.write(shard_id, [items[i].key for i in indices], status, errors, embeddings)


def load_encoder(path: str | None = None, preset: str | None = None, image_size: int | None = None,
                 seed: int = 0, modality: str = "vision") -> torch.nn.Module | None:
    """An ImageBind encoder: the `modality` ("vision" or "audio") model of a converted folder `path`, or a
    random-init `preset` (tests, demos) built with `seed` so that two processes or two runs get the same weights.
    Exactly one of `path`, `preset` is needed. For audio, a folder without an audio model gives None (the vision
    model is required)."""
    from mm_llama.imagebind import ImageBindAudioConfig, ImageBindAudioModel, ImageBindVisionConfig, ImageBindVisionModel
    from mm_llama.loading import imagebind_folder

    if (path is None) == (preset is None):
        raise ValueError("Pass either an encoder checkpoint folder (--encoder) or a random-init preset (--encoder_preset).")
    model_class = ImageBindVisionModel if modality == "vision" else ImageBindAudioModel
    if path is not None:
        folder = imagebind_folder(path, modality)
        if folder is None and modality == "audio":
            return None
        if folder is None:
            raise FileNotFoundError(f"{path} holds no ImageBind vision model; pass a folder written by `mm-llama "
                                    "convert-imagebind`.")
        return model_class.from_pretrained(str(folder))
    torch.manual_seed(seed)
    if modality == "audio":
        return ImageBindAudioModel(ImageBindAudioConfig.from_preset(preset))
    overrides = {} if image_size is None else {"image_size": image_size}
    return ImageBindVisionModel(ImageBindVisionConfig.from_preset(preset, **overrides))
