"""The tiny stand-in for ImageBind (huge): a tiny ImageBind vision encoder saved as a flat state dict in the key
layout of Meta's `imagebind_huge.pth`; the demo converts it with the real converter.

A random-init encoder separates colours but hardly sizes, shapes or motion, whereas the real ImageBind was pre-trained
on web-scale data. So the stand-in is pre-trained briefly on its OWN synthetic media (never the demo corpus), each
after a random JPEG / H.264 round trip (`codec_noise`), to predict the attributes of a scene from its 1024-d
embedding; the attribute heads are then thrown away and only the encoder is kept.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from .scenes import (
    SCENE_ATTRIBUTES,
    VIDEO_FPS,
    VIDEO_FRAMES,
    ImageScene,
    VideoScene,
    render_image,
    render_video_frames,
    sample_image_scene,
    sample_video_scene,
    scene_attributes,
    write_mp4,
)
from .trainer import ProgressFn, train_steps

# ================================================================================================ tiny ImageBind
IMAGEBIND_IMAGE_SIZE = 84  # 6 x 6 patches of 14 px: enough for colours, sizes and a change between frames


def imagebind_to_meta_state_dict(model) -> dict[str, torch.Tensor]:
    """An `ImageBindVisionModel` state dict in the flat key layout of Meta's `imagebind_huge.pth` (vision keys):
    the inverse of the converter, read off its own key list (`official_vision_shapes`) and key mapping, where a
    stacked `attn.in_proj_*` key is the concatenation of the HF keys it maps to (q, k, v in that order)."""
    from mm_llama.imagebind.conversion_imagebind import official_vision_shapes
    from mm_llama.imagebind.conversion_imagebind import (
        vision_hf_keys as official_to_hf_keys,
    )

    hf = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    meta = {}
    for official in official_vision_shapes(model.config):
        parts = [hf[key] for key in official_to_hf_keys(official)]
        meta[official] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return meta


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """`[1, 1 + grid*grid, dim]` 2-D sine-cosine position embedding (MAE's fixed init; the class position is 0).

    Why: the stem's patch features are ~100x larger than the default 0.02-std random position embedding, so after
    the pre-trunk LayerNorm a short training cannot find where things are (measured: direction of motion stayed at
    chance). Starting from positions of unit scale makes "where" as easy to read as "what colour"."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega),
             torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega)]
    table = torch.cat(parts, dim=1)
    table = torch.cat([table, torch.zeros(grid * grid, dim - table.shape[1])], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)


def _labels(scene: ImageScene | VideoScene) -> list[int]:
    """Class index per attribute of `SCENE_ATTRIBUTES`, -1 where the attribute does not apply."""
    given = scene_attributes(scene)
    return [(values.index(given[name]) if name in given else -1) for name, values in SCENE_ATTRIBUTES.items()]


def _jpeg_round_trip(frames: np.ndarray, quality: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8 frames after JPEG compression at `quality` (4:2:0 chroma, as PIL's default)."""
    from PIL import Image

    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def h264_round_trip(frames: np.ndarray, crf: int, fps: int = VIDEO_FPS) -> np.ndarray:
    """`[T, H, W, 3]` uint8 frames after H.264 (libx264, yuv420p, `crf`) encoding and decoding with PyAV."""
    import av

    buffer = io.BytesIO()
    write_mp4(frames, buffer, fps=fps, crf=crf)
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def codec_noise(frames: np.ndarray, rng: random.Random, video: bool) -> np.ndarray:
    """A random lossy round trip of `[T, H, W, 3]` uint8 frames, so that the stand-in encoder does not depend on one
    codec build: JPEG at quality 30-95 (images, and half of the clips' frames), H.264 at CRF 10-35 (the other half
    of the clips), then a small per-channel gain (+-6%) and offset (+-6 levels), which covers the colour shifts of
    different RGB <-> YUV conversions."""
    if video and rng.random() < 0.25:
        frames = h264_round_trip(frames, crf=rng.randint(10, 35))
    else:
        frames = _jpeg_round_trip(frames, quality=rng.randint(30, 95))
    gain = np.array([rng.uniform(0.94, 1.06) for _ in range(3)], dtype=np.float32)
    offset = np.array([rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    return np.clip(frames.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def _stand_in_examples(count: int, seed: int, image_size: int,
                       noise: bool = True) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(pixels [3, 2, S, S], labels) of freshly drawn scenes after a random codec round trip (`codec_noise`),
    preprocessed by the real ImageBind transforms: images with `load_image` (then repeated to 2 frames, as the model
    does), clips with `load_video` on their first and last frame (what ImageBind samples from a 2 s clip)."""
    from mm_llama.imagebind import load_image, load_video

    rng = random.Random(f"imagebind-stand-in-{seed}")
    for i in range(count):
        if i % 2 == 0:
            scene = sample_image_scene(rng)
            pixels = np.asarray(render_image(scene, seed=rng.getrandbits(32)))[None]
            pixels = codec_noise(pixels, rng, video=False)[0] if noise else pixels[0]
            yield load_image(pixels, image_size=image_size).unsqueeze(1).expand(-1, 2, -1, -1), _labels(scene)
        else:
            scene = sample_video_scene(rng, kind=("move", "turn")[(i // 2) % 2])
            frames = render_video_frames(scene, seed=rng.getrandbits(32), indices=[0, VIDEO_FRAMES - 1])
            frames = codec_noise(frames, rng, video=True) if noise else frames
            # Two frames at 1 fps = a 2 s clip whose frames ImageBind keeps: both.
            yield load_video(frames, image_size=image_size, num_clips=1, num_crops=1, fps=1.0)[0], _labels(scene)


class AttributeReader(nn.Module):
    """What the stand-in's pre-training trains: the encoder and one linear head per attribute of `SCENE_ATTRIBUTES`
    on its embedding (the heads are thrown away). `forward` returns the summed cross-entropy of the attributes that
    apply (-1 targets do not), the shape the HF Trainer steps on."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder  # parameter order: the encoder's, then the heads'
        self.heads = nn.ModuleDict({name: nn.Linear(encoder.config.projection_dim, len(classes))
                                    for name, classes in SCENE_ATTRIBUTES.items()})

    def logits(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, `[batch, classes]` logits of `[batch, 3, 2, S, S]` media."""
        # The heads read the L2-normalised embedding (scaled up: unit vectors give tiny logits), which is what the
        # MM-LLaMA projector will read.
        device = self.encoder.device
        embeds = self.encoder(pixel_values.to(device, torch.float32), return_dict=True).embeds * 20.0
        return {name: head(embeds) for name, head in self.heads.items()}

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        out, targets = self.logits(pixel_values), targets.to(self.encoder.device)
        loss = sum(nn.functional.cross_entropy(out[name], targets[:, k], ignore_index=-1)
                   for k, name in enumerate(SCENE_ATTRIBUTES) if (targets[:, k] >= 0).any())
        return {"loss": loss}

    @torch.no_grad()
    def accuracy(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Per attribute, the share of media (where it applies) whose head picks the right class."""
        out, targets = self.logits(pixel_values), targets.to(self.encoder.device)
        accuracy = {}
        for k, name in enumerate(SCENE_ATTRIBUTES):
            mask = targets[:, k] >= 0
            if mask.any():
                accuracy[name] = (out[name][mask].argmax(-1) == targets[mask, k]).float().mean().item()
        return accuracy


class RandomBatches(Sampler[list[int]]):
    """`steps` batches of `batch_size` indices drawn with replacement by `rng.randrange` (what the stand-in's results
    were measured with; torch's RandomSampler draws from another generator, hence other batches)."""

    def __init__(self, pool_size: int, batch_size: int, steps: int, rng: random.Random):
        self.pool_size, self.batch_size, self.steps, self.rng = pool_size, batch_size, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield [self.rng.randrange(self.pool_size) for _ in range(self.batch_size)]


def _stack(examples: list[tuple[torch.Tensor, list[int]]]) -> dict[str, torch.Tensor]:
    """`pixel_values` `[batch, 3, 2, S, S]` and `targets` `[batch, attributes]` of (pixels, labels) examples."""
    return {"pixel_values": torch.stack([p for p, _ in examples]),
            "targets": torch.tensor([lab for _, lab in examples])}


def pretrain_tiny_imagebind(
    output_file: str | Path,
    *,
    image_size: int = IMAGEBIND_IMAGE_SIZE,
    held_out_examples: int = 400,
    training_examples: int = 4000,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config_overrides: dict | None = None,
    on_step: ProgressFn | None = None,
) -> dict:
    """Pre-trains the "tiny" ImageBind preset with the HF Trainer on its own synthetic scenes (after random codec
    round trips) to predict every attribute of `SCENE_ATTRIBUTES` from its embedding, and saves it to `output_file`
    as a flat `.pth` state dict in Meta's key layout. Returns a summary (held-out attribute accuracies of the
    pre-training heads, which are not saved, time)."""
    from mm_llama.testing_utils import tiny_imagebind

    started = time.monotonic()
    # initializer_range 1/sqrt(width) instead of the default 0.02 (tuned for huge's width 1280): at 0.02 a 64-wide
    # ViT starts with almost no signal from the patches into the class token and learns shapes far more slowly.
    model = tiny_imagebind(image_size, seed, **{"initializer_range": 0.125, **(config_overrides or {})})
    with torch.no_grad():
        grid = model.config.image_size // model.config.patch_size
        model.embeddings.position_embedding.copy_(sincos_position_embedding(grid, model.config.hidden_size))
    reader = AttributeReader(model.to(device)).to(device)
    # A pool of `training_examples` scenes drawn once, batches sampled from it: drawing a scene with its codec round
    # trip costs ~2.5 ms, more than the model's step per example (measured at 84 px: 2.4 ms vs 0.55 ms), so fresh
    # scenes for every batch would make drawing most of the time. The held-out scenes come from another stream.
    pool = list(_stand_in_examples(training_examples, seed, image_size))
    held_out = _stack(list(_stand_in_examples(held_out_examples, seed + 10_000, image_size)))
    optimizer = torch.optim.AdamW(reader.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    train_steps(reader, pool, RandomBatches(len(pool), batch_size, steps, random.Random(seed)), _stack, optimizer,
                scheduler, steps, max_grad_norm=0.0, seed=seed, device=device, on_step=on_step)
    reader.eval()
    accuracy = reader.accuracy(held_out["pixel_values"], held_out["targets"])
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(imagebind_to_meta_state_dict(model.cpu()), output_file)
    return {"held_out_attribute_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": image_size, "training_examples": training_examples, "held_out_examples": held_out_examples,
            "steps": steps, "seconds": time.monotonic() - started, "path": str(output_file)}


__all__ = ["IMAGEBIND_IMAGE_SIZE", "AttributeReader", "RandomBatches", "codec_noise", "h264_round_trip", "imagebind_to_meta_state_dict",
           "pretrain_tiny_imagebind", "sincos_position_embedding"]
