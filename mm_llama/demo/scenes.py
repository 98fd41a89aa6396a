"""The demo's synthetic world: a few well separated colours, shapes, backgrounds and sizes; image scenes (a shape on
a background) and video scenes (a shape that moves or changes colour), drawn as pixels and written as JPEG / H.264
mp4; the attributes of each scene (what the stand-in encoders learn to see); and pixel checks the tests use to
confirm that each answer matches what was drawn."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ------------------------------------------------------------------------------------------------- the vocabulary
# Few, well separated colours: the task must be learnable from ONE 1024-d ImageBind vector per media item through a
# linear projector into a tiny language model.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Neutral backgrounds (grey levels), so that "what colour is the shape?" has one answer.
BACKGROUNDS: dict[str, int] = {"white": 235, "grey": 130, "black": 20}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SIZES: tuple[str, ...] = ("small", "large")

VIDEO_FPS = 8
VIDEO_SECONDS = 2  # ImageBind samples 5 clips of 2 s; a 2 s clip makes all five span the whole video
VIDEO_FRAMES = VIDEO_FPS * VIDEO_SECONDS
JPEG_QUALITY = 95


def article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


# ------------------------------------------------------------------------------------------------- scenes
@dataclass
class ImageScene:
    """What an image shows; `box` is the shape's bounding box (x0, y0, x1, y1) in pixels."""

    colour: str
    shape: str
    background: str
    size: str
    width: int
    height: int
    box: tuple[int, int, int, int]

    def caption(self) -> str:
        return f"{article(self.size)} {self.size} {self.colour} {self.shape} on a {self.background} background."


@dataclass
class VideoScene:
    """What a clip shows: a shape that moves (`direction`) or stays and changes colour (`new_colour`)."""

    kind: str  # "move" | "turn"
    colour: str
    shape: str
    background: str
    side: int
    direction: str | None = None
    new_colour: str | None = None
    # Per-frame bounding boxes, for the tests and for describing the clip.
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def caption(self) -> str:
        if self.kind == "move":
            where = f"to the {self.direction}" if self.direction in ("left", "right") else self.direction
            return f"{article(self.colour)} {self.colour} {self.shape} moves {where} on a {self.background} background."
        return f"{article(self.colour)} {self.colour} {self.shape} turns {self.new_colour} on a {self.background} background."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def _canvas(width: int, height: int, background: str, rng: np.random.Generator) -> Image.Image:
    """A neutral background with a little noise, so that no two images are pixel-identical."""
    level = BACKGROUNDS[background] + rng.integers(-12, 13)
    pixels = np.clip(level + rng.normal(0.0, 6.0, size=(height, width, 1)), 0, 255)
    return Image.fromarray(np.repeat(pixels, 3, axis=2).astype(np.uint8))


def sample_image_scene(rng: random.Random) -> ImageScene:
    """A random image scene. Images are not square (ImageBind resizes the short side and centre-crops), so the shape
    is placed inside the central square, where the encoder will see it."""
    short = rng.choice((112, 128, 144))
    long = short + rng.choice((0, 16, 32, 48))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    size = rng.choice(SIZES)
    # Sizes far apart in AREA, not only in side length: the stand-in encoder sees how much of the picture the shape
    # covers much better than its outline, and with sides 0.25-0.33 / 0.45-0.58 of the short side a small square
    # covered as much as a large triangle (measured: most size errors were such pairs). Now the largest small square
    # covers 0.08 of the crop, the smallest large triangle 0.125.
    side = int(short * (rng.uniform(0.2, 0.28) if size == "small" else rng.uniform(0.5, 0.62)))
    crop_x, crop_y = (width - short) // 2, (height - short) // 2
    x0 = crop_x + rng.randint(4, short - side - 4)
    y0 = crop_y + rng.randint(4, short - side - 4)
    return ImageScene(
        colour=rng.choice(tuple(COLOURS)), shape=rng.choice(SHAPES), background=rng.choice(tuple(BACKGROUNDS)),
        size=size, width=width, height=height, box=(x0, y0, x0 + side, y0 + side),
    )


def render_image(scene: ImageScene, seed: int) -> Image.Image:
    image = _canvas(scene.width, scene.height, scene.background, np.random.default_rng(seed))
    _draw_shape(ImageDraw.Draw(image), scene.shape, scene.box, COLOURS[scene.colour])
    return image


def sample_video_scene(rng: random.Random, kind: str | None = None) -> VideoScene:
    """A random clip: half move across the frame, half change colour halfway through (unless `kind` is given)."""
    kind = kind or rng.choice(("move", "turn"))
    side = rng.choice((96, 112, 128))  # square: ImageBind's 3 spatial crops of a square frame are the same view
    shape_side = int(side * rng.uniform(0.3, 0.4))
    colour = rng.choice(tuple(COLOURS))
    scene = VideoScene(kind=kind, colour=colour, shape=rng.choice(SHAPES), background=rng.choice(tuple(BACKGROUNDS)),
                       side=side)
    margin, free = 4, side - shape_side - 8
    if kind == "move":
        scene.direction = rng.choice(DIRECTIONS)
        across = rng.randint(margin, margin + free)  # position on the axis the shape does not move along
        start, end = margin, margin + free
        if scene.direction in ("left", "up"):
            start, end = end, start
        for i in range(VIDEO_FRAMES):
            along = round(start + (end - start) * i / (VIDEO_FRAMES - 1))
            x, y = (along, across) if scene.direction in ("left", "right") else (across, along)
            scene.boxes.append((x, y, x + shape_side, y + shape_side))
    elif kind == "turn":
        scene.new_colour = rng.choice([c for c in COLOURS if c != colour])
        x, y = rng.randint(margin, margin + free), rng.randint(margin, margin + free)
        scene.boxes = [(x, y, x + shape_side, y + shape_side)] * VIDEO_FRAMES
    else:
        raise ValueError(f"Unknown video kind {kind!r}; use 'move' or 'turn'.")
    return scene


def frame_colour(scene: VideoScene, frame: int) -> str:
    """The shape's colour in a frame: a "turn" clip changes colour at its midpoint."""
    return scene.new_colour if scene.kind == "turn" and frame >= VIDEO_FRAMES // 2 else scene.colour


def render_video_frames(scene: VideoScene, seed: int, indices: Sequence[int] | None = None) -> np.ndarray:
    """`[frames, side, side, 3]` uint8 RGB frames (all of them, or those at `indices`)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(len(scene.boxes)) if indices is None else indices:
        frame = _canvas(scene.side, scene.side, scene.background, rng)
        _draw_shape(ImageDraw.Draw(frame), scene.shape, scene.boxes[i], COLOURS[frame_colour(scene, i)])
        frames.append(np.asarray(frame))
    return np.stack(frames)


def write_mp4(frames: np.ndarray, path: Path | BinaryIO, fps: int = VIDEO_FPS, crf: int = 12) -> None:
    """Encodes RGB frames `[T, H, W, 3]` as H.264 mp4 (yuv420p) with PyAV into a file, or an open binary stream
    (the stand-in ImageBind's codec noise). High quality by default, so colours survive the 4:2:0 chroma subsampling.

    One encoder thread with the "ultrafast" preset: for 16 frames of ~100 px, x264's thread start-up and the slower
    presets' analysis cost more than the encoding (measured: 3.9 ms per clip against 12.5 ms with "veryfast")."""
    import av

    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(str(path) if isinstance(path, Path) else path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast", "threads": "1"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------------------------- scene attributes
# What a scene is, attribute by attribute: the tiny ImageBind is pre-trained to read these off the pixels, and the
# tiny LLaMA is pre-trained with one "scene code" per media placeholder built from them (see `tiny_llama`, `tiny_imagebind`).
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": ("still", "move", "turn"),  # an image; a clip whose shape moves; a clip whose shape changes colour
    "colour": tuple(COLOURS),           # an image's colour / a clip's first colour
    "new_colour": tuple(COLOURS),       # the colour a "turn" clip ends with
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "direction": DIRECTIONS,
}


def scene_attributes(scene: ImageScene | VideoScene) -> dict[str, str]:
    """The attributes of a scene that apply to it (a still image has no direction, a moving clip no new colour)."""
    if isinstance(scene, ImageScene):
        return {"kind": "still", "colour": scene.colour, "shape": scene.shape, "background": scene.background,
                "size": scene.size}
    attributes = {"kind": scene.kind, "colour": scene.colour, "shape": scene.shape, "background": scene.background}
    if scene.kind == "move":
        attributes["direction"] = scene.direction
    else:
        attributes["new_colour"] = scene.new_colour
    return attributes



def dominant_colour(pixels: np.ndarray) -> str | None:
    """The named colour closest to the mean of the saturated pixels of an RGB array, or None if there are none.

    Used by the tests to check that an answer matches what was drawn (after JPEG / H.264 compression)."""
    pixels = pixels.reshape(-1, 3).astype(np.float32)
    saturation = pixels.max(axis=1) - pixels.min(axis=1)
    coloured = pixels[saturation > 80]
    if len(coloured) == 0:
        return None
    mean = coloured.mean(axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - mean) ** 2)))


def shape_centroid(pixels: np.ndarray) -> tuple[float, float] | None:
    """(x, y) centre of the saturated (shape) pixels of an RGB array."""
    pixels = pixels.astype(np.int32)
    mask = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


__all__ = [
    "BACKGROUNDS", "COLOURS", "DIRECTIONS", "JPEG_QUALITY", "SCENE_ATTRIBUTES", "SHAPES", "SIZES", "VIDEO_FPS",
    "VIDEO_FRAMES", "VIDEO_SECONDS", "ImageScene", "VideoScene", "article", "dominant_colour", "frame_colour",
    "render_image", "render_video_frames", "sample_image_scene", "sample_video_scene", "scene_attributes",
    "shape_centroid", "write_mp4",
]
