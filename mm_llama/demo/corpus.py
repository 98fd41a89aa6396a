"""The demo's synthetic multimodal corpus: coloured shapes (JPEG images) and short clips (mp4), with questions and
answers about them written in the exact upstream formats.

The world and its pixels live in `scenes`, the questions and conversations in `conversations`; this module sizes
the corpus and writes it.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from .conversations import (
    CAPTION_PROMPTS,
    QUESTION_TYPES,
    caption_record,
    eval_items,
    instruct_record,
    pretraining_items,
    render_text,
    two_media_pairs,
    two_media_record,
    videochat_record,
)
from .scenes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    JPEG_QUALITY,
    SHAPES,
    ImageScene,
    VideoScene,
    render_image,
    render_video_frames,
    sample_image_scene,
    sample_video_scene,
    write_mp4,
)


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


__all__ = ["CORPUS_SIZES", "CorpusPaths", "CorpusSize", "generate_corpus", "read_eval_items"]
