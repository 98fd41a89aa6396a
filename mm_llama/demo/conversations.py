"""Questions, answers and conversations about the demo's scenes, as records in the upstream formats (LLaVA CC3M
captions, LLaVA-Instruct, VideoChat), two-media chats, held-out eval items, and the stand-in LLaMA's pre-training
text. Every answer is known by construction (`scenes`), so each question type has an exact accuracy and a chance
level."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .scenes import (
    BACKGROUNDS,
    COLOURS,
    SIZES,
    ImageScene,
    VideoScene,
    sample_image_scene,
    sample_video_scene,
    scene_attributes,
)


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
    """A record in the project's own record format (docs/data.md) with two media items, for `build_datasets --source records`."""
    messages = []
    for question, answer, media_index in turns:
        messages.append({"role": "user", "content": question, "media_index": media_index})
        messages.append({"role": "assistant", "content": answer})
    return {"id": record_id, "messages": messages, "media": list(media)}


# ------------------------------------------------------------------------------------------------- pre-training text
def text_conversation(pairs: Sequence[tuple[str, str]]) -> dict:
    """A text-only conversation record (docs/data.md format, no media)."""
    messages = []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def media_conversation(turns: Sequence[tuple[str, str, int | None]], scenes: Sequence[ImageScene | VideoScene]) -> dict:
    """A conversation whose media placeholders pre-training fills with "scene codes" (one vector per media item,
    a fixed function of the scene's attributes; see `mm_llama.demo.tiny_llama.SceneCodes`). `turns` are
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
    placeholder. A scene code is one learned vector per attribute value (`tiny_llama.SceneCodes`, thrown away after
    pre-training) summed over the scene's attributes; in these chats the answer is predictable from the code only.
    Stage 1 then has something to align to: it must learn the map from ImageBind's embedding to a vector the frozen
    model reads as the scene. The previous design put a "soft caption" there (the mean embedding of the caption's
    tokens) and stage 1 stayed at chance: the model read it only weakly (answer loss 0.243 with the true soft caption
    against 0.300 with a zero vector and 0.326 with another scene's), because of how it was pre-trained (see
    `tiny_llama.pretrain_tiny_llama`), not because of the soft caption itself. The model never sees pixels or
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


__all__ = [
    "ACTION_QUESTIONS", "BACKGROUND_QUESTIONS", "CAPTION_PROMPTS", "COLOUR_QUESTIONS", "NEW_COLOUR_QUESTIONS",
    "QUESTION_TYPES", "SIZE_QUESTIONS", "VIDEO_DESCRIBE_QUESTIONS", "QuestionType", "action_answer",
    "background_answer", "caption_record", "colour_answer", "eval_items", "image_qa_pairs", "instruct_record",
    "media_conversation", "new_colour_answer", "pretraining_items", "render_text", "size_answer", "text_conversation",
    "two_media_pairs", "two_media_record", "video_qa_pairs", "videochat_record",
]
