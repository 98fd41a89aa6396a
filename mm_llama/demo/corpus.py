"""The demo's synthetic multimodal corpus: coloured shapes (JPEG images) and short clips (mp4), with questions and
answers about them written in the exact upstream formats.

Why synthetic: a newcomer without downloads must see the pipeline learn something checkable. Every answer is known
by construction, so held-out accuracy per question type is exact and a chance level is well defined.

Files written under the corpus folder (names mirror the real datasets that the real recipes use):

    cc3m/chat.json + cc3m/images/          LLaVA CC3M-595K format (stage 1: one brief caption per image)
    instruct/llava_instruct.json + instruct/images/
                                          LLaVA-Instruct-150K format (stage 2: multi-turn questions about an image)
    videochat/videochat_instruct.json + videochat/videos/<folder>/<name>.mp4
                                          VideoChat-11K format (stage 2: questions about a clip)
    two_media/two_media.jsonl             the project's own record format (DESIGN.md; stage 2): chats with an image on
                                          the first user turn and another image or a clip on a later one, so the
                                          model knows that format (media paths relative to the corpus root)
    eval/eval.jsonl + eval/images/ + eval/videos/
                                          held-out generation eval (scripts/evaluate.py --qa_file format):
                                          {"id", "media", "media_type", "question", "answers", "type", "key", ...}
    text/pretrain.jsonl                   the stand-in LLaMA's pre-training data: captions, text-only chats about
                                          scenes told in words, and chats whose media placeholders hold a scene
                                          code, so that it "knows the language" of the task as LLaMA-2-chat knows
                                          English and can read a vector at the placeholder
    text/pretrain.txt                     the same as plain text, for training the sentencepiece tokenizer
    corpus.json                           what was generated (counts, vocabulary, seed)
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

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


@dataclass(frozen=True)
class QuestionType:
    """A held-out question type: its canonical question, the answer set (for the chance level) and the media kind."""

    name: str
    media: str
    question: str
    choices: tuple[str, ...]

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess over the answer set."""
        return 1.0 / len(self.choices)


# The held-out question types. Shape ("What shape is it?") and direction of motion ("Which way does the shape
# move?") were tried and dropped: the tiny ImageBind stand-in, pre-trained for a quarter of a minute, separates them
# only weakly (held-out accuracy of its pre-training heads ~0.5 for shapes, chance 0.33; ~0.3 for directions, chance
# 0.25), so no language model could answer them from its embedding. Captions still mention shapes and directions, as
# real captions mention details an encoder misses.
QUESTION_TYPES: dict[str, QuestionType] = {
    qt.name: qt
    for qt in (
        QuestionType("image_colour", "image", "What colour is the shape?", tuple(COLOURS)),
        QuestionType("image_background", "image", "What colour is the background?", tuple(BACKGROUNDS)),
        QuestionType("image_size", "image", "Is the shape small or large?", SIZES),
        QuestionType("video_action", "video", "What does the shape do?", ("moves", "changes")),
        QuestionType("video_new_colour", "video", "What colour does the shape turn?", tuple(COLOURS)),
    )
}

# Upstream CC3M-595K chat.json prompts are drawn from LLaVA's list of "brief description" instructions.
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
)
# Paraphrases used in training conversations; the eval asks the canonical question of each type.
COLOUR_QUESTIONS = ("What colour is the shape?", "Which colour is the shape?", "What is the colour of the shape?")
SIZE_QUESTIONS = ("Is the shape small or large?", "Is the shape large or small?", "How big is the shape?")
ACTION_QUESTIONS = ("What does the shape do?", "Does the shape move or change colour?")
NEW_COLOUR_QUESTIONS = ("What colour does the shape turn?", "Which colour does the shape change to?")
BACKGROUND_QUESTIONS = ("What colour is the background?", "Which colour is the background?")
VIDEO_DESCRIBE_QUESTIONS = ("Describe the video briefly.", "What happens in the video?")


# ------------------------------------------------------------------------------------------------- answers
# One function per answer, shared by the conversations, the eval references and the pre-training text, so that the
# words a model must produce are the same everywhere.
def colour_answer(colour: str) -> str:
    return f"The shape is {colour}."


def size_answer(size: str) -> str:
    return f"It is {size}."


def action_answer(kind: str) -> str:
    return "It moves." if kind == "move" else "It changes colour."


def new_colour_answer(colour: str) -> str:
    return f"It turns {colour}."


def background_answer(background: str) -> str:
    return f"The background is {background}."


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


# ------------------------------------------------------------------------------------------------- conversations
def _with_image_tag(text: str, rng: random.Random) -> str:
    """LLaVA puts `<image>` with a newline before or after the first human text; both occur upstream."""
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"


def caption_record(record_id: str, image_path: str, scene: ImageScene, rng: random.Random) -> dict:
    """One CC3M-595K `chat.json` entry (stage 1: brief caption)."""
    return {
        "id": record_id,
        "image": image_path,
        "conversations": [
            {"from": "human", "value": _with_image_tag(rng.choice(CAPTION_PROMPTS), rng)},
            {"from": "gpt", "value": scene.caption()},
        ],
    }


def image_qa_pairs(scene: ImageScene, rng: random.Random) -> list[tuple[str, str]]:
    pairs = [
        (rng.choice(COLOUR_QUESTIONS), colour_answer(scene.colour)),
        (rng.choice(SIZE_QUESTIONS), size_answer(scene.size)),
        (rng.choice(BACKGROUND_QUESTIONS), background_answer(scene.background)),
    ]
    rng.shuffle(pairs)
    return pairs[: rng.randint(1, len(pairs))]


def instruct_record(record_id: str, image_path: str, scene: ImageScene, rng: random.Random) -> dict:
    """One LLaVA-Instruct-150K entry: a multi-turn conversation, the image tag on the first human turn."""
    conversations = []
    for turn, (question, answer) in enumerate(image_qa_pairs(scene, rng)):
        conversations.append({"from": "human", "value": _with_image_tag(question, rng) if turn == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image_path, "conversations": conversations}


def video_qa_pairs(scene: VideoScene, rng: random.Random) -> list[tuple[str, str]]:
    pairs = [(rng.choice(ACTION_QUESTIONS), action_answer(scene.kind))]
    if scene.kind == "turn":
        pairs.append((rng.choice(NEW_COLOUR_QUESTIONS), new_colour_answer(scene.new_colour)))
    rng.shuffle(pairs)
    if rng.random() < 0.3:
        pairs.append((rng.choice(VIDEO_DESCRIBE_QUESTIONS), scene.caption()))
    return pairs


def videochat_record(video_path: str, scene: VideoScene, rng: random.Random) -> dict:
    """One VideoChat-11K `videochat_instruct_11k.json` entry."""
    return {"video": video_path, "QA": [{"q": q, "a": a} for q, a in video_qa_pairs(scene, rng)]}


def eval_items(item_id: str, media_type: str, media_path: str, scene: ImageScene | VideoScene) -> list[dict]:
    """Held-out questions about one media item, one per applicable question type, with the reference answers:
    the full sentence and the key word (scoring matches either)."""
    items = []
    if media_type == "image":
        assert isinstance(scene, ImageScene)
        keyed = {"image_colour": (colour_answer(scene.colour), scene.colour),
                 "image_background": (background_answer(scene.background), scene.background),
                 "image_size": (size_answer(scene.size), scene.size)}
    else:
        assert isinstance(scene, VideoScene)
        keyed = {"video_action": (action_answer(scene.kind), "moves" if scene.kind == "move" else "changes")}
        if scene.kind == "turn":
            keyed["video_new_colour"] = (new_colour_answer(scene.new_colour), scene.new_colour)
    for type_name, (sentence, key) in keyed.items():
        items.append({
            "id": f"{item_id}-{type_name}",
            "type": type_name,
            "media": media_path,
            "media_type": media_type,
            "question": QUESTION_TYPES[type_name].question,
            "answers": [sentence, key],
            "key": key,
            "description": scene.caption(),
        })
    return items


# ------------------------------------------------------------------------------------------------- scene attributes
# What a scene is, attribute by attribute: the tiny ImageBind is pre-trained to read these off the pixels, and the
# tiny LLaMA is pre-trained with one "scene code" per media placeholder built from them (see `tiny_models`).
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


# ------------------------------------------------------------------------------------------------- two-media chats
def _later_media_question(rng: random.Random) -> str:
    """How a later user turn introduces its media item ("And this one?"), before the question about it."""
    return rng.choice(("Now look at this one.", "Here is another one.", "And this one?", "Next one."))


def two_media_pairs(first: ImageScene, second: ImageScene | VideoScene,
                    rng: random.Random) -> list[tuple[str, str, int | None]]:
    """(question, answer, media index or None) turns of a chat that shows an image on the first user turn and a
    second image or a clip on a later one; questions after the second item are about it."""
    first_pairs = image_qa_pairs(first, rng)[:rng.randint(1, 2)]
    second_pairs = (image_qa_pairs(second, rng) if isinstance(second, ImageScene)
                    else video_qa_pairs(second, rng))[:rng.randint(1, 2)]
    turns: list[tuple[str, str, int | None]] = [(q, a, 0 if i == 0 else None) for i, (q, a) in enumerate(first_pairs)]
    intro = _later_media_question(rng)
    turns += [((f"{intro} {q}" if i == 0 else q), a, 1 if i == 0 else None) for i, (q, a) in enumerate(second_pairs)]
    return turns


def two_media_record(record_id: str, media: Sequence[dict], turns: Sequence[tuple[str, str, int | None]]) -> dict:
    """A record in the project's own format (DESIGN.md) with two media items, for `build_datasets --source records`."""
    messages = []
    for question, answer, media_index in turns:
        messages.append({"role": "user", "content": question, "media_index": media_index})
        messages.append({"role": "assistant", "content": answer})
    return {"id": record_id, "messages": messages, "media": list(media)}


# ------------------------------------------------------------------------------------------------- pre-training text
def text_conversation(pairs: Sequence[tuple[str, str]]) -> dict:
    """A text-only conversation record (DESIGN.md format, no media)."""
    messages = []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def media_conversation(turns: Sequence[tuple[str, str, int | None]], scenes: Sequence[ImageScene | VideoScene]) -> dict:
    """A conversation whose media placeholders pre-training fills with "scene codes" (one vector per media item,
    a fixed function of the scene's attributes; see `mm_llama.demo.tiny_models.SceneCodes`). `turns` are
    (question, answer, index of the media item shown on that turn or None)."""
    messages = []
    for question, answer, media_index in turns:
        messages += [{"role": "user", "content": question, "media_index": media_index},
                     {"role": "assistant", "content": answer}]
    media = [{"type": "image" if isinstance(scene, ImageScene) else "video", "scene": scene_attributes(scene)}
             for scene in scenes]
    return {"messages": messages, "media": media}


def _sample_scene(rng: random.Random) -> ImageScene | VideoScene:
    return sample_image_scene(rng) if rng.random() < 0.55 else sample_video_scene(rng)


def _scene_pairs(scene: ImageScene | VideoScene, rng: random.Random) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """Questions about a scene with their answers, and a (describe request, caption) pair."""
    if isinstance(scene, ImageScene):
        return image_qa_pairs(scene, rng), (rng.choice(CAPTION_PROMPTS), scene.caption())
    return video_qa_pairs(scene, rng), (rng.choice(VIDEO_DESCRIBE_QUESTIONS), scene.caption())


def pretraining_items(rng: random.Random, count: int) -> list[dict]:
    """What the stand-in LLaMA is pre-trained on: plain captions (`{"text"}`, like web text), text-only chats
    (`{"messages"}`) where a scene is told in words and then asked about, and chats whose media placeholders carry a
    "scene code" (`{"messages", "media": [{"type", "scene"}]}`), some of them with two media items.

    The first two teach the language of the task, as LLaMA-2-chat knows English and how to answer. The scene-code
    chats stand for what a 7B model brings and a tiny one lacks: a way to read content from a vector at the
    placeholder. A scene code is one learned vector per attribute value (`tiny_models.SceneCodes`, thrown away after
    pre-training) summed over the scene's attributes; in these chats the answer is predictable from the code only.
    Stage 1 then has something to align to: it must learn the map from ImageBind's embedding to a vector the frozen
    model reads as the scene. The previous design put a "soft caption" there (the mean embedding of the caption's
    tokens) and stage 1 stayed at chance: the model read it only weakly (answer loss 0.243 with the true soft caption
    against 0.300 with a zero vector and 0.326 with another scene's), because of how it was pre-trained (see
    `tiny_models.pretrain_tiny_llama`), not because of the soft caption itself. The model never sees pixels or
    ImageBind embeddings."""
    items = []
    for _ in range(count):
        scene = _sample_scene(rng)
        pairs, describe = _scene_pairs(scene, rng)
        style = rng.random()
        if style < 0.08:
            items.append({"text": scene.caption()})
        elif style < 0.24:
            context = ("Here is a picture: " if isinstance(scene, ImageScene) else "Here is a video: ") + scene.caption()
            first, *rest = [describe] if style < 0.12 else pairs
            items.append(text_conversation([(f"{context} {first[0]}", first[1]), *rest]))
        elif style < 0.9:
            chosen = [describe] if style < 0.4 else pairs
            items.append(media_conversation([(q, a, 0 if i == 0 else None) for i, (q, a) in enumerate(chosen)],
                                            [scene]))
        else:
            first, second = sample_image_scene(rng), _sample_scene(rng)
            items.append(media_conversation(two_media_pairs(first, second, rng), [first, second]))
    return items


def render_text(item: dict) -> str:
    """One pre-training item as plain text in the LLaMA-2 chat layout, media markers included (the tokenizer is
    trained on these lines)."""
    if "text" in item:
        return item["text"]
    media = item.get("media") or []
    turns = item["messages"]
    parts = []
    for user, answer in zip(turns[::2], turns[1::2]):
        marker = ""
        if user.get("media_index") is not None:
            opening, closing = ("<<IMG>>", "<</IMG>>") if media[user["media_index"]]["type"] == "image" else (
                "<<VID>>", "<</VID>>")
            marker = f" {opening}{closing}"
        parts.append(f"[INST] {user['content']}{marker} [/INST] {answer['content']}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------- sizes and writer
@dataclass(frozen=True)
class CorpusSize:
    """How much to generate. Stage 1 and stage 2 use different images, as CC3M and COCO are different sets.
    `two_media` conversations reuse stage 2's images and clips, paired at random."""

    caption_images: int
    instruct_images: int
    videos: int
    eval_images: int
    eval_videos: int
    pretrain_lines: int
    two_media: int = 0


CORPUS_SIZES: dict[str, CorpusSize] = {
    "tiny": CorpusSize(caption_images=60, instruct_images=60, videos=40, eval_images=16, eval_videos=16,
                       pretrain_lines=400, two_media=10),
    "smoke": CorpusSize(caption_images=600, instruct_images=600, videos=400, eval_images=60, eval_videos=80,
                        pretrain_lines=20000, two_media=60),
    "full": CorpusSize(caption_images=2000, instruct_images=2000, videos=1200, eval_images=150, eval_videos=200,
                       pretrain_lines=20000, two_media=200),
}


@dataclass
class CorpusPaths:
    """Where `generate_corpus` wrote each part (absolute paths)."""

    root: Path
    cc3m_json: Path
    cc3m_images: Path
    instruct_json: Path
    instruct_images: Path
    videochat_json: Path
    videochat_videos: Path
    two_media_jsonl: Path
    eval_jsonl: Path
    pretrain_jsonl: Path
    pretrain_text: Path
    summary: Path

    @classmethod
    def under(cls, root: Path) -> "CorpusPaths":
        root = Path(root).absolute()
        return cls(
            root=root,
            cc3m_json=root / "cc3m" / "chat.json",
            cc3m_images=root / "cc3m" / "images",
            instruct_json=root / "instruct" / "llava_instruct.json",
            instruct_images=root / "instruct" / "images",
            videochat_json=root / "videochat" / "videochat_instruct.json",
            videochat_videos=root / "videochat" / "videos",
            two_media_jsonl=root / "two_media" / "two_media.jsonl",
            eval_jsonl=root / "eval" / "eval.jsonl",
            pretrain_jsonl=root / "text" / "pretrain.jsonl",
            pretrain_text=root / "text" / "pretrain.txt",
            summary=root / "corpus.json",
        )


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="file", leave=False)


def _dump_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(items: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def generate_corpus(output_dir: str | Path, size: CorpusSize | str = "smoke", seed: int = 0,
                    progress: bool = True) -> tuple[CorpusPaths, dict]:
    """Writes the whole corpus under `output_dir`; returns its paths and a summary (also saved as corpus.json).

    Deterministic for a given (size, seed) and media stack. Eval media are drawn from their own random stream, so
    they are never copies of training media (the scenes come from the same distribution, as a held-out split
    should). The two-media conversations (`two_media/two_media.jsonl`, the project's own record format, media paths
    relative to the corpus root) pair stage 2's images and clips.
    """
    size = CORPUS_SIZES[size] if isinstance(size, str) else size
    paths = CorpusPaths.under(Path(output_dir))
    for folder in (paths.cc3m_images, paths.instruct_images, paths.videochat_videos, paths.eval_jsonl.parent / "images",
                   paths.eval_jsonl.parent / "videos", paths.pretrain_text.parent):
        folder.mkdir(parents=True, exist_ok=True)
    stage2_media: list[tuple[dict, ImageScene | VideoScene]] = []  # ({"type", "path"}, scene), for two-media chats

    def images(stream: str, count: int, folder: Path, prefix: str,
               make: Callable[[str, str, ImageScene, random.Random], dict]) -> list[dict]:
        rng, records = random.Random(f"{seed}-{stream}"), []
        for i in _progress(range(count), count, f"{stream} images", progress):
            scene = sample_image_scene(rng)
            name = f"{prefix}{i:06d}.jpg"
            render_image(scene, seed=rng.getrandbits(32)).save(folder / name, quality=JPEG_QUALITY)
            records.append(make(f"{prefix}{i:06d}", name, scene, rng))
            if stream == "instruct":
                path = (folder / name).relative_to(paths.root).as_posix()
                stage2_media.append(({"type": "image", "path": path}, scene))
        return records

    cc3m = images("cc3m", size.caption_images, paths.cc3m_images, "GCC_train_", caption_record)
    _dump_json(cc3m, paths.cc3m_json)
    instruct = images("instruct", size.instruct_images, paths.instruct_images, "", instruct_record)
    _dump_json(instruct, paths.instruct_json)

    rng, videochat = random.Random(f"{seed}-videochat"), []
    for i in _progress(range(size.videos), size.videos, "videochat videos", progress):
        scene = sample_video_scene(rng, kind=("move", "turn")[i % 2])
        relative = f"{i // 50 * 50:06d}_{i // 50 * 50 + 49:06d}/{1000000 + i}.mp4"  # WebVid-style <folder>/<name>
        write_mp4(render_video_frames(scene, seed=rng.getrandbits(32)), paths.videochat_videos / relative)
        videochat.append(videochat_record(relative, scene, rng))
        path = (paths.videochat_videos / relative).relative_to(paths.root).as_posix()
        stage2_media.append(({"type": "video", "path": path}, scene))
    _dump_json(videochat, paths.videochat_json)

    rng, two_media = random.Random(f"{seed}-two-media"), []
    images_only = [item for item in stage2_media if item[0]["type"] == "image"]
    for i in range(size.two_media if images_only else 0):
        (first_media, first), (second_media, second) = rng.choice(images_only), rng.choice(stage2_media)
        two_media.append(two_media_record(f"two_media_{i:06d}", [first_media, second_media],
                                          two_media_pairs(first, second, rng)))
    _write_jsonl(two_media, paths.two_media_jsonl)

    rng, evaluation = random.Random(f"{seed}-eval"), []
    eval_dir = paths.eval_jsonl.parent
    for i in _progress(range(size.eval_images), size.eval_images, "eval images", progress):
        scene = sample_image_scene(rng)
        relative = f"images/eval_{i:05d}.jpg"
        render_image(scene, seed=rng.getrandbits(32)).save(eval_dir / relative, quality=JPEG_QUALITY)
        evaluation += eval_items(f"img{i:05d}", "image", relative, scene)
    for i in _progress(range(size.eval_videos), size.eval_videos, "eval videos", progress):
        scene = sample_video_scene(rng, kind=("move", "turn")[i % 2])
        relative = f"videos/eval_{i:05d}.mp4"
        write_mp4(render_video_frames(scene, seed=rng.getrandbits(32)), eval_dir / relative)
        evaluation += eval_items(f"vid{i:05d}", "video", relative, scene)
    _write_jsonl(evaluation, paths.eval_jsonl)

    pretrain = pretraining_items(random.Random(f"{seed}-text"), size.pretrain_lines)
    _write_jsonl(pretrain, paths.pretrain_jsonl)
    # The tokenizer's training text: everything a model of the demo reads or writes, including the chat markup.
    lines = [render_text(item) for item in pretrain] + list(CAPTION_PROMPTS) + ["<<SYS>>", "<</SYS>>"]
    paths.pretrain_text.write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = {
        "seed": seed,
        "size": asdict(size),
        "counts": {
            "cc3m_records": len(cc3m),
            "instruct_records": len(instruct),
            "videochat_records": len(videochat),
            "two_media_records": len(two_media),
            "eval_questions": len(evaluation),
            "eval_questions_by_type": {name: sum(item["type"] == name for item in evaluation) for name in QUESTION_TYPES},
            "pretrain_items": len(pretrain),
        },
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
                       "directions": list(DIRECTIONS)},
        "question_types": {name: {"question": qt.question, "choices": list(qt.choices), "chance": qt.chance}
                           for name, qt in QUESTION_TYPES.items()},
        "paths": {key: str(value) for key, value in asdict(paths).items()},
    }
    _dump_json(summary, paths.summary)
    return paths, summary


def read_eval_items(path: str | Path) -> list[dict]:
    """The held-out eval items of `generate_corpus` (one JSON object per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    "BACKGROUNDS", "COLOURS", "CORPUS_SIZES", "CorpusPaths", "CorpusSize", "DIRECTIONS", "QUESTION_TYPES",
    "QuestionType", "SHAPES", "ImageScene", "VideoScene", "generate_corpus", "read_eval_items", "dominant_colour",
    "shape_centroid", "render_image", "render_video_frames", "sample_image_scene", "sample_video_scene",
    "media_conversation", "pretraining_items", "render_text", "write_mp4", "SCENE_ATTRIBUTES", "scene_attributes",
    "two_media_pairs", "two_media_record", "JPEG_QUALITY",
]
