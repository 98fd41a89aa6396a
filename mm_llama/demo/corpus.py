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
    two_media/two_media.jsonl             the project's own record format (docs/data.md; stage 2): chats with an image on
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

from ..progress import progress_bar
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


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    """A bar over the files written (while mm_llama.progress's switch is on), cleared when done."""
    return progress_bar(iterable, total=total, desc=desc, unit="file", leave=False)


def _dump_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(items: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


Media = tuple[dict, ImageScene | VideoScene]  # ({"type", "path" relative to the corpus root}, scene)


def generate_corpus(output_dir: str | Path, size: CorpusSize | str = "smoke", seed: int = 0
                    ) -> tuple[CorpusPaths, dict]:
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
    records = {}
    records["cc3m"], _ = _write_images(paths, "cc3m", size.caption_images, paths.cc3m_images, "GCC_train_",
                                       caption_record, seed)
    _dump_json(records["cc3m"], paths.cc3m_json)
    records["instruct"], instruct_media = _write_images(paths, "instruct", size.instruct_images, paths.instruct_images,
                                                        "", instruct_record, seed)
    _dump_json(records["instruct"], paths.instruct_json)
    records["videochat"], video_media = _write_videochat(paths, size.videos, seed)
    _dump_json(records["videochat"], paths.videochat_json)
    records["two_media"] = _two_media_records(instruct_media + video_media, size.two_media, seed)
    _write_jsonl(records["two_media"], paths.two_media_jsonl)
    records["eval"] = _write_eval_media(paths, size, seed)
    _write_jsonl(records["eval"], paths.eval_jsonl)
    records["pretrain"] = _write_pretraining_text(paths, size.pretrain_lines, seed)
    summary = _corpus_summary(paths, size, seed, records)
    _dump_json(summary, paths.summary)
    return paths, summary


def _write_images(paths: CorpusPaths, stream: str, count: int, folder: Path, prefix: str,
                  make: Callable[[str, str, ImageScene, random.Random], dict], seed: int
                  ) -> tuple[list[dict], list[Media]]:
    """`count` JPEG images of random scenes in `folder` and their records (`make`), drawn from the `stream` random
    stream; returns (records, media for two-media chats)."""
    rng, records, media = random.Random(f"{seed}-{stream}"), [], []
    for i in _progress(range(count), count, f"{stream} images"):
        scene = sample_image_scene(rng)
        name = f"{prefix}{i:06d}.jpg"
        render_image(scene, seed=rng.getrandbits(32)).save(folder / name, quality=JPEG_QUALITY)
        records.append(make(f"{prefix}{i:06d}", name, scene, rng))
        media.append(({"type": "image", "path": (folder / name).relative_to(paths.root).as_posix()}, scene))
    return records, media


def _write_videochat(paths: CorpusPaths, count: int, seed: int) -> tuple[list[dict], list[Media]]:
    """`count` mp4 clips (alternately moving and changing colour) in WebVid-style folders and their VideoChat
    records; returns (records, media for two-media chats)."""
    rng, records, media = random.Random(f"{seed}-videochat"), [], []
    for i in _progress(range(count), count, "videochat videos"):
        scene = sample_video_scene(rng, kind=("move", "turn")[i % 2])
        relative = f"{i // 50 * 50:06d}_{i // 50 * 50 + 49:06d}/{1000000 + i}.mp4"  # WebVid-style <folder>/<name>
        write_mp4(render_video_frames(scene, seed=rng.getrandbits(32)), paths.videochat_videos / relative)
        records.append(videochat_record(relative, scene, rng))
        path = (paths.videochat_videos / relative).relative_to(paths.root).as_posix()
        media.append(({"type": "video", "path": path}, scene))
    return records, media


def _two_media_records(stage2_media: list[Media], count: int, seed: int) -> list[dict]:
    """`count` chats with one of stage 2's images on the first turn and any stage-2 image or clip on a later one."""
    rng, records = random.Random(f"{seed}-two-media"), []
    images_only = [item for item in stage2_media if item[0]["type"] == "image"]
    for i in range(count if images_only else 0):
        (first_media, first), (second_media, second) = rng.choice(images_only), rng.choice(stage2_media)
        records.append(two_media_record(f"two_media_{i:06d}", [first_media, second_media],
                                        two_media_pairs(first, second, rng)))
    return records


def _write_eval_media(paths: CorpusPaths, size: CorpusSize, seed: int) -> list[dict]:
    """The held-out images and clips (their own random stream) and their eval items."""
    rng, evaluation = random.Random(f"{seed}-eval"), []
    eval_dir = paths.eval_jsonl.parent
    for i in _progress(range(size.eval_images), size.eval_images, "eval images"):
        scene = sample_image_scene(rng)
        relative = f"images/eval_{i:05d}.jpg"
        render_image(scene, seed=rng.getrandbits(32)).save(eval_dir / relative, quality=JPEG_QUALITY)
        evaluation += eval_items(f"img{i:05d}", "image", relative, scene)
    for i in _progress(range(size.eval_videos), size.eval_videos, "eval videos"):
        scene = sample_video_scene(rng, kind=("move", "turn")[i % 2])
        relative = f"videos/eval_{i:05d}.mp4"
        write_mp4(render_video_frames(scene, seed=rng.getrandbits(32)), eval_dir / relative)
        evaluation += eval_items(f"vid{i:05d}", "video", relative, scene)
    return evaluation


def _write_pretraining_text(paths: CorpusPaths, count: int, seed: int) -> list[dict]:
    """The stand-in LLaMA's pre-training items (JSONL) and the tokenizer's training text; returns the items."""
    pretrain = pretraining_items(random.Random(f"{seed}-text"), count)
    _write_jsonl(pretrain, paths.pretrain_jsonl)
    # The tokenizer's training text: everything a model of the demo reads or writes, including the chat markup.
    lines = [render_text(item) for item in pretrain] + list(CAPTION_PROMPTS) + ["<<SYS>>", "<</SYS>>"]
    paths.pretrain_text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pretrain


def _corpus_summary(paths: CorpusPaths, size: CorpusSize, seed: int, records: dict[str, list[dict]]) -> dict:
    """corpus.json: seed, sizes, counts of each part, the world's vocabulary and question types, paths."""
    evaluation = records["eval"]
    return {
        "seed": seed,
        "size": asdict(size),
        "counts": {
            "cc3m_records": len(records["cc3m"]),
            "instruct_records": len(records["instruct"]),
            "videochat_records": len(records["videochat"]),
            "two_media_records": len(records["two_media"]),
            "eval_questions": len(evaluation),
            "eval_questions_by_type": {name: sum(item["type"] == name for item in evaluation)
                                       for name in QUESTION_TYPES},
            "pretrain_items": len(records["pretrain"]),
        },
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
                       "directions": list(DIRECTIONS)},
        "question_types": {name: {"question": qt.question, "choices": list(qt.choices), "chance": qt.chance}
                           for name, qt in QUESTION_TYPES.items()},
        "paths": {key: str(value) for key, value in asdict(paths).items()},
    }


def read_eval_items(path: str | Path) -> list[dict]:
    """The held-out eval items of `generate_corpus` (one JSON object per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["CORPUS_SIZES", "CorpusPaths", "CorpusSize", "generate_corpus", "read_eval_items"]
