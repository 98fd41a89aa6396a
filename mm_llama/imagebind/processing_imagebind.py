"""ImageBind preprocessing: images and videos -> normalised pixel tensors, following Meta's `imagebind/data.py`.

Image (Meta: torchvision Resize(224, BICUBIC) on a PIL image, CenterCrop(224), ToTensor, Normalize):
    PIL RGB -> short side to S with PIL bicubic (long side int(S * long / short)) -> centre crop S
    (offset int(round((L - S) / 2))) -> float [0, 1] -> (x - mean) / std                     => [3, S, S]

Video (Meta: pytorchvideo EncodedVideo with the decord decoder, ConstantClipsPerVideoSampler(2 s, 5 clips),
UniformTemporalSubsample(2), ShortSideScale(224), NormalizeVideo, SpatialCrop(224, 3)):
    duration D = frames / avg_fps; clip i of K spans [i * max(D - d, 0) / (K - 1), ... + d]; its frames are
    range(ceil(fps * start), min(ceil(fps * end), n)), of which `frames_per_clip` are kept uniformly
    (linspace(0, len - 1, k) truncated); /255; short side to S bilinear (long side floor(long / short * S));
    normalise; then 3 crops along the long side at 0, ceil((L - S) / 2), L - S    => [K * 3, 3, k, S, S] clip-major.

The sampling rules are small pure functions (`clip_timepoints`, `clip_frame_indices`, `crop_offsets`, ...) so they
can be checked on their own. Errors for unusable media are `MediaLoadError`s naming the file and the problem.

Over 400 lines because Meta's image and video transforms share normalisation, file checks and sampling rules.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypedDict, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# ImageBind normalises images and videos with OpenAI CLIP's per-channel statistics (Meta's imagebind/data.py).
IMAGEBIND_MEAN: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
IMAGEBIND_STD: tuple[float, ...] = tuple(OPENAI_CLIP_STD)

ImageSource = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor]
VideoSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class MediaLoadError(ValueError):
    """An image, video or audio file is missing, empty, unreadable or corrupt (the message names the file and why).

    `problem` is "missing", "empty" or "corrupt", so that a dataset build can count skipped records by reason.
    """

    def __init__(self, message: str, problem: str = "corrupt"):
        super().__init__(message)
        self.problem = problem


# ----------------------------------------------------------------------------------------------------------------
# Pure sampling rules
# ----------------------------------------------------------------------------------------------------------------


def image_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output `(height, width)` of the image short-side resize (torchvision `Resize(int)` rule).

    The short side becomes `size`, the long side `int(size * long / short)` (truncated, evaluated in that order).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_offset(length: int, size: int) -> int:
    """Top/left offset of the image centre crop (torchvision `CenterCrop`: `int(round((length - size) / 2))`).

    Python's `round` rounds halves to even, exactly as torchvision does.
    """
    return int(round((length - size) / 2.0))


def video_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output `(height, width)` of the video short-side scale (pytorchvideo `short_side_scale` rule).

    The short side becomes `size` and the long side `floor(long / short * size)`; a square stays square.
    """
    if width < height:
        return int(math.floor((float(height) / width) * size)), size
    return size, int(math.floor((float(width) / height) * size))


def crop_offsets(length: int, size: int, num_crops: int = 3) -> list[int]:
    """Offsets along the long side of the video crops (ImageBind `SpatialCrop`/`uniform_crop`).

    3 crops: start, centre `ceil((length - size) / 2)`, end `length - size`; 1 crop: the centre only.
    """
    if length < size:
        raise ValueError(f"Cannot take a {size}-pixel crop from a side of {length} pixels.")
    offsets = [0, int(math.ceil((length - size) / 2)), length - size]
    if num_crops == 3:
        return offsets
    if num_crops == 1:
        return [offsets[1]]
    raise ValueError(f"num_crops must be 1 or 3 (as in Meta's SpatialCrop), got {num_crops}.")


def video_crop_boxes(height: int, width: int, size: int, num_crops: int = 3) -> list[tuple[int, int]]:
    """`(top, left)` of each video crop on a short-side-scaled frame: crops move along the longer side.

    As in `uniform_crop`, a frame that is not taller than wide (landscape or square) is cropped left/centre/right,
    a portrait one top/centre/bottom; the other axis is centred with `ceil((short - size) / 2)`.
    """
    if height > width:
        left = crop_offsets(width, size, 1)[0]
        return [(top, left) for top in crop_offsets(height, size, num_crops)]
    top = crop_offsets(height, size, 1)[0]
    return [(top, left) for left in crop_offsets(width, size, num_crops)]


def clip_timepoints(duration: float, num_clips: int = 5, clip_duration: float = 2.0) -> list[tuple[Fraction, Fraction]]:
    """`(start, end)` seconds of each clip (pytorchvideo `ConstantClipsPerVideoSampler`, exact Fractions).

    With `M = max(duration - clip_duration, 0)`, clip i spans `[i * M / (K - 1), i * M / (K - 1) + clip_duration]`;
    for a video shorter than `clip_duration` every clip is `[0, clip_duration]`.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}.")
    length = Fraction(clip_duration)
    # Same arithmetic as pytorchvideo: float duration minus the Fraction clip length, then exact rationals.
    max_start = Fraction(max(duration - length, 0))
    step = Fraction(max_start, max(num_clips - 1, 1))
    return [(step * i, step * i + length) for i in range(num_clips)]


def uniform_subsample_indices(length: int, num_samples: int) -> list[int]:
    """Positions kept out of `length` frames (pytorchvideo `UniformTemporalSubsample`: truncated linspace)."""
    positions = torch.linspace(0, length - 1, num_samples).clamp(0, length - 1).long()
    return positions.tolist()


def clip_frame_indices(
    num_frames: int,
    fps: float,
    num_clips: int = 5,
    clip_duration: float = 2.0,
    frames_per_clip: int = 2,
) -> list[list[int]]:
    """Frame indices (into the decoded video) of each clip's kept frames: `num_clips` lists of `frames_per_clip`.

    A clip covers frames `range(ceil(fps * start), min(ceil(fps * end), num_frames))` (pytorchvideo's decord
    `get_clip`, with `fps * start` evaluated in float as there), subsampled uniformly.
    """
    if num_frames <= 0:
        raise ValueError(f"A video needs at least one frame, got {num_frames}.")
    if not fps > 0:
        raise ValueError(f"The frame rate must be positive, got {fps}.")
    duration = float(num_frames) / float(fps)
    clips = []
    for start, end in clip_timepoints(duration, num_clips, clip_duration):
        first = math.ceil(fps * float(start))
        stop = min(math.ceil(fps * float(end)), num_frames)
        if stop <= first:
            raise ValueError(f"Clip [{float(start):.3f}s, {float(end):.3f}s] of a {duration:.3f}s video has no frames.")
        clips.append([first + i for i in uniform_subsample_indices(stop - first, frames_per_clip)])
    return clips


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def check_media_file(path: str | os.PathLike, kind: str) -> Path:
    """The one existence check of every media input (datasets, chat, evaluation): raises `MediaLoadError` for a path
    that cannot hold media at all (missing, a directory, zero bytes) naming it and the fix; returns it as a Path."""
    path = Path(path)
    if not path.exists():
        raise MediaLoadError(f"{kind} file {str(path)!r} does not exist; check the path (relative to {os.getcwd()!r}).",
                             problem="missing")
    if path.is_dir():
        raise MediaLoadError(f"{kind} path {str(path)!r} is a directory, not a file.", problem="missing")
    if path.stat().st_size == 0:
        raise MediaLoadError(f"{kind} file {str(path)!r} is empty (0 bytes); re-download or re-extract it.",
                             problem="empty")
    return path


def _array_to_pil(array: np.ndarray, what: str) -> PIL.Image.Image:
    """`[H, W, 3]` / `[H, W]` uint8 (or float in [0, 1]) pixels -> PIL RGB image."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what} must be [H, W, C] pixels with C in (1, 3, 4); got shape {array.shape}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{what} must be uint8 or float in [0, 1]; got dtype {array.dtype}.")
        # PIL's bicubic resize works on 8-bit pixels, so float input is quantised first.
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return PIL.Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def open_image(source: ImageSource) -> PIL.Image.Image:
    """Any accepted image source -> fully decoded PIL RGB image.

    Args:
        source: a file path, a PIL image, a `[H, W, C]` numpy array, or a `[3, H, W]` / `[H, W, 3]` tensor
            (uint8, or float in [0, 1]).

    Raises:
        MediaLoadError: for a missing, empty, unreadable or truncated file.
    """
    if isinstance(source, PIL.Image.Image):
        return source.convert("RGB")
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3) and tensor.shape[-1] not in (1, 3):
            tensor = tensor.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
        return _array_to_pil(tensor.numpy(), "An image tensor")
    if isinstance(source, np.ndarray):
        return _array_to_pil(source, "An image array")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Unsupported image source type {type(source).__name__}; pass a path, PIL image, array or tensor."
        )
    path = check_media_file(source, "Image")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return image.convert("RGB")
    except PIL.UnidentifiedImageError as err:
        raise MediaLoadError(f"Image file {str(path)!r} is not a readable image format ({err}).") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaLoadError(f"Image file {str(path)!r} is corrupt or truncated ({err}); re-download it.") from err


def load_image(
    source: ImageSource,
    image_size: int = 224,
    mean: Sequence[float] = IMAGEBIND_MEAN,
    std: Sequence[float] = IMAGEBIND_STD,
) -> torch.Tensor:
    """Loads and preprocesses one image exactly as ImageBind does.

    Args:
        source: file path, PIL image, numpy array `[H, W, C]` or tensor `[3, H, W]`/`[H, W, 3]`.
        image_size: output side S (224 for ImageBind-huge).

    Returns:
        `[3, S, S]` float32, normalised with `mean`/`std`.
    """
    image = open_image(source)
    width, height = image.size
    new_height, new_width = image_resize_size(height, width, image_size)
    if (new_height, new_width) != (height, width):
        image = image.resize((new_width, new_height), PIL.Image.BICUBIC)
    top, left = center_crop_offset(new_height, image_size), center_crop_offset(new_width, image_size)
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return _normalize(pixels, mean, std, channel_dim=0)


def _normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], channel_dim: int) -> torch.Tensor:
    """`(x - mean) / std` per channel along `channel_dim` (float32)."""
    shape = [1] * pixels.ndim
    shape[channel_dim] = -1
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype).view(shape)
    std_t = torch.as_tensor(std, dtype=pixels.dtype).view(shape)
    return (pixels - mean_t) / std_t


# ----------------------------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null for the block: decord (and the FFmpeg inside it) prints its own error
    lines straight to the process's stderr before failing, and the MediaLoadError raised here says it once, naming
    the file. Python's own `sys.stderr` is flushed first and works again after the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _FrameSource:
    """Random access to a video's frames as uint8 `[T, H, W, 3]`: a decord reader over a file, or an in-memory array."""

    def __init__(self, source: VideoSource, fps: float | None):
        self.name = "video frames"
        if isinstance(source, (str, os.PathLike)):
            self._open_file(Path(source))
            return
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        if not isinstance(source, np.ndarray):
            raise TypeError(f"Unsupported video source type {type(source).__name__}; pass a path, array or tensor.")
        if source.ndim != 4 or source.shape[-1] != 3:
            raise ValueError(f"Video frames must be [T, H, W, 3]; got shape {source.shape}.")
        if source.shape[0] == 0:
            raise MediaLoadError("The video frame array has zero frames.")
        if fps is None or not fps > 0:
            raise ValueError(f"Video frames given as an array need their frame rate: pass fps=... (got {fps}).")
        if source.dtype != np.uint8:
            source = (np.clip(source, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        self._frames, self._reader = source, None
        self.num_frames, self.fps = source.shape[0], float(fps)

    def _open_file(self, path: Path) -> None:
        import decord  # imported lazily: only video files need it

        check_media_file(path, "Video")
        self.name = repr(str(path))
        try:
            # As pytorchvideo's decord backend: native resolution, CPU.
            with native_stderr_silenced():
                self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
            self.num_frames, self.fps = len(self._reader), float(self._reader.get_avg_fps())
        except Exception as err:  # decord raises its own DECORDError / RuntimeError types
            raise MediaLoadError(f"Video file {self.name} could not be decoded as a video ({err}).") from err
        if self.num_frames == 0:
            raise MediaLoadError(f"Video file {self.name} has no video frames (zero-length video).")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise MediaLoadError(f"Video file {self.name} reports an invalid frame rate ({self.fps}).")

    def get(self, indices: list[int]) -> np.ndarray:
        """uint8 `[len(indices), H, W, 3]`."""
        if self._reader is None:
            return self._frames[indices]
        try:
            with native_stderr_silenced():
                return self._reader.get_batch(indices).asnumpy()
        except Exception as err:
            raise MediaLoadError(f"Video file {self.name}: frames {indices} could not be decoded ({err}).") from err


def load_video(
    source: VideoSource,
    image_size: int = 224,
    num_clips: int = 5,
    clip_duration: float = 2.0,
    frames_per_clip: int = 2,
    num_crops: int = 3,
    fps: float | None = None,
    mean: Sequence[float] = IMAGEBIND_MEAN,
    std: Sequence[float] = IMAGEBIND_STD,
) -> torch.Tensor:
    """Loads and preprocesses one video exactly as ImageBind does.

    Args:
        source: a video file path (decoded with decord), or frames `[T, H, W, 3]` (numpy or tensor, uint8 or float in
            [0, 1]) together with `fps`.
        image_size: crop side S.
        num_clips, clip_duration, frames_per_clip: temporal sampling (5 clips of 2 s, 2 frames each for ImageBind).
        num_crops: spatial crops per clip, 3 (along the long side) or 1 (centre).
        fps: frame rate of array input (ignored for files, whose average frame rate is used).

    Returns:
        `[num_clips * num_crops, 3, frames_per_clip, S, S]` float32, clip-major (clip 0 crops 0..2, clip 1, ...).

    Raises:
        MediaLoadError: missing, empty, undecodable or zero-length video.
    """
    frames = _FrameSource(source, fps)
    try:
        clips = clip_frame_indices(frames.num_frames, frames.fps, num_clips, clip_duration, frames_per_clip)
    except ValueError as err:
        raise MediaLoadError(f"Video {frames.name}: {err}") from err
    wanted = sorted({i for clip in clips for i in clip})
    decoded = frames.get(wanted)  # decode each needed frame once
    position = {index: row for row, index in enumerate(wanted)}
    rows = torch.as_tensor([[position[i] for i in clip] for clip in clips])  # [K, k]
    video = torch.from_numpy(decoded)[rows]  # [K, k, H, W, 3] uint8
    video = video.permute(0, 4, 1, 2, 3).float() / 255.0  # [K, 3, k, H, W]

    num, channels, length, height, width = video.shape
    new_height, new_width = video_resize_size(height, width, image_size)
    # pytorchvideo interpolates each (C, T, H, W) clip as a batch of C images with T channels; batching the clips
    # into one call computes the same per-pixel values.
    video = F.interpolate(
        video.reshape(num * channels, length, height, width),
        size=(new_height, new_width),
        mode="bilinear",
        align_corners=False,
    ).reshape(num, channels, length, new_height, new_width)
    video = _normalize(video, mean, std, channel_dim=1)

    views = [
        video[:, :, :, top : top + image_size, left : left + image_size]
        for top, left in video_crop_boxes(new_height, new_width, image_size, num_crops)
    ]  # num_crops x [K, 3, k, S, S]
    return torch.stack(views, dim=1).reshape(num * len(views), channels, length, image_size, image_size)


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class ImageBindProcessorKwargs(TypedDict, total=False):
    """Settings of [`ImageBindProcessor`] (also the keys `from_pretrained(..., **kwargs)` may override)."""

    image_size: int
    num_clips: int
    clip_duration: float
    frames_per_clip: int
    num_crops: int
    image_mean: list[float]
    image_std: list[float]


class ImageBindProcessor(BaseImageProcessor):
    """Batches images and videos for [`ImageBindVisionModel`]; saved as `preprocessor_config.json`.

    A `BaseImageProcessor` (so that `AutoImageProcessor` and `MMLlamaProcessor` load it) with its own pipeline: Meta's
    transforms, which none of transformers' backends reproduce exactly.

    `processor(images=[...], videos=[...])` returns a `BatchFeature` with `pixel_values` `[N, 3, S, S]` and
    `video_pixel_values` `[M, num_clips * num_crops, 3, frames_per_clip, S, S]` (`[M, 15, 3, 2, 224, 224]` by
    default). A single item (not a list) is a batch of one.
    """

    valid_kwargs = ImageBindProcessorKwargs
    model_input_names = ["pixel_values", "video_pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        num_clips: int = 5,
        clip_duration: float = 2.0,
        frames_per_clip: int = 2,
        num_crops: int = 3,
        image_mean: Sequence[float] = IMAGEBIND_MEAN,
        image_std: Sequence[float] = IMAGEBIND_STD,
        **kwargs: Any,
    ):
        kwargs.pop("image_processor_type", None)  # written by to_dict(), not a setting
        super().__init__(**kwargs)
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}.")
        self.image_size = int(image_size)
        self.num_clips = int(num_clips)
        self.clip_duration = float(clip_duration)
        self.frames_per_clip = int(frames_per_clip)
        self.num_crops = int(num_crops)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    def preprocess_image(self, source: ImageSource) -> torch.Tensor:
        """One image -> `[3, S, S]`."""
        return load_image(source, self.image_size, self.image_mean, self.image_std)

    def preprocess_video(self, source: VideoSource, fps: float | None = None) -> torch.Tensor:
        """One video -> `[num_clips * num_crops, 3, frames_per_clip, S, S]`."""
        return load_video(
            source,
            image_size=self.image_size,
            num_clips=self.num_clips,
            clip_duration=self.clip_duration,
            frames_per_clip=self.frames_per_clip,
            num_crops=self.num_crops,
            fps=fps,
            mean=self.image_mean,
            std=self.image_std,
        )

    def __call__(
        self,
        images: ImageSource | list[ImageSource] | None = None,
        videos: VideoSource | list[VideoSource] | None = None,
        video_fps: float | list[float] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocesses a batch of images and/or videos.

        Args:
            images: one image source or a list of them (paths, PIL images, arrays, tensors).
            videos: one video source or a list of them (paths, or `[T, H, W, 3]` frame arrays with `video_fps`).
            video_fps: frame rate(s) of array videos, one number or one per video.
            return_tensors: "pt" (tensors are always built as torch; other values are passed to `BatchFeature`).

        Returns:
            `BatchFeature` with `pixel_values` `[N, 3, S, S]` and/or `video_pixel_values` `[M, V, 3, k, S, S]`.
        """
        if kwargs:
            raise TypeError(f"ImageBindProcessor got unexpected arguments {sorted(kwargs)}.")
        if images is None and videos is None:
            raise ValueError("Pass images=..., videos=... or both.")
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            items = images if isinstance(images, (list, tuple)) else [images]
            data["pixel_values"] = torch.stack([self.preprocess_image(item) for item in items])
        if videos is not None:
            items = videos if isinstance(videos, (list, tuple)) else [videos]
            rates = video_fps if isinstance(video_fps, (list, tuple)) else [video_fps] * len(items)
            if len(rates) != len(items):
                raise ValueError(f"Got {len(rates)} video_fps values for {len(items)} videos.")
            data["video_pixel_values"] = torch.stack(
                [self.preprocess_video(item, fps) for item, fps in zip(items, rates)]
            )
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = [
    "IMAGEBIND_MEAN",
    "IMAGEBIND_STD",
    "ImageBindProcessor",
    "MediaLoadError",
    "center_crop_offset",
    "check_media_file",
    "clip_frame_indices",
    "clip_timepoints",
    "crop_offsets",
    "image_resize_size",
    "load_image",
    "load_video",
    "open_image",
    "uniform_subsample_indices",
    "video_crop_boxes",
    "video_resize_size",
]
