"""Readers: one per raw format, each turning a file into conversation records (see `records.py`).

Every reader is a generator that validates each record, skips the bad ones into a `SkipLog` (reason + where), and
never raises for a bad record. A file that cannot be read at all (missing, not JSON, not a list) is a clear error
naming the file, since no record of it could be used.

Media paths are resolved to absolute paths here, so the builder needs no knowledge of the source layout. Readers
do not open media files; the builder does (it has to decode them anyway), and counts unreadable ones.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .records import (
    SKIP_IMAGE_TAG_ON_NO_TURN,
    SKIP_IMAGE_TAG_WITHOUT_IMAGE,
    SKIP_MALFORMED,
    SKIP_MULTIPLE_IMAGE_TAGS,
    SKIP_NO_HUMAN_TURN,
    RecordError,
    SkipLog,
    validate_record,
)

LLAVA_IMAGE_TAG = "<image>"
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def load_json_list(path: str | os.PathLike) -> list:
    """Loads a JSON file whose top level is a list; errors name the file and say what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Pass the path of the source's JSON file.")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
            f"If it holds one record per line, name it *.jsonl."
        ) from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records at the top level, got {type(data).__name__}.")
    return data


def _where(path: Path, index: int, raw: Any, id_key: str = "id") -> str:
    """`file[index] (id X)`: enough for a user to find a record in a large file."""
    record_id = raw.get(id_key) if isinstance(raw, dict) else None
    return f"{path}[{index}]" + (f" (id {record_id})" if record_id is not None else "")


def _resolve(media_dir: str | os.PathLike | None, relative: str, default_dir: Path) -> str:
    """Absolute path of a media file named relative to `media_dir` (or `default_dir` when none is given)."""
    return os.path.abspath(os.path.join(media_dir if media_dir is not None else default_dir, relative))


# --- LLaVA (CC3M-595K chat.json, LLaVA-Instruct-150K) -------------------------------------------------------------


def llava_to_record(raw: Any, media_dir: str | os.PathLike | None, default_dir: Path) -> dict:
    """Converts one LLaVA record to ours; raises `RecordError` when it cannot be used.

    LLaVA: `{"id", "image": relative path, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`. The
    `<image>` tag (with its newline, before or after the text) is removed from the human text and that turn gets
    `media_index=0`. A record without "image" is text-only and must carry no tag.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        raise RecordError(SKIP_MALFORMED, "expected an object with 'id' and a 'conversations' list")
    if "id" not in raw:
        raise RecordError(SKIP_MALFORMED, "missing key 'id'")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise RecordError(SKIP_MALFORMED, "'image' must be a relative file path")
    messages: list[dict] = []
    tagged_turns = 0
    for i, turn in enumerate(raw["conversations"]):
        if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise RecordError(
                SKIP_MALFORMED, f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}"
            )
        role, text = _LLAVA_ROLES[turn["from"]], turn["value"]
        media_index = None
        tags = text.count(LLAVA_IMAGE_TAG)
        if tags:
            if role != "user":
                raise RecordError(SKIP_MALFORMED, f"conversations[{i}] is a {turn['from']} turn with an <image> tag")
            tagged_turns += tags
            # Removing the tag, then stripping, removes its newline whichever side of the text it was on.
            text = text.replace(LLAVA_IMAGE_TAG, "")
            media_index = 0
        messages.append({"role": role, "content": text.strip(), "media_index": media_index})
    if not any(m["role"] == "user" for m in messages):
        # Checked before the tag rules: with no human turn there is nowhere a tag could have been.
        raise RecordError(SKIP_NO_HUMAN_TURN, "the conversation has no human turn")
    if image is not None and tagged_turns == 0:
        raise RecordError(SKIP_IMAGE_TAG_ON_NO_TURN, f"image {image!r} but no human turn has an <image> tag")
    if tagged_turns > 1:
        raise RecordError(SKIP_MULTIPLE_IMAGE_TAGS, f"{tagged_turns} <image> tags for one image")
    if image is None and tagged_turns:
        raise RecordError(SKIP_IMAGE_TAG_WITHOUT_IMAGE, "an <image> tag but no 'image' key")
    media = [] if image is None else [{"type": "image", "path": _resolve(media_dir, image, default_dir)}]
    return validate_record({"id": raw["id"], "messages": messages, "media": media})


def read_llava(json_path: str | os.PathLike, media_dir: str | os.PathLike | None, skips: SkipLog) -> Iterator[dict]:
    """Yields records from a LLaVA JSON list (CC3M-595K `chat.json` or `llava_instruct_150k.json`).

    `media_dir` is the folder the "image" paths are relative to (`images/` for CC3M, COCO `train2017/`); by
    default the JSON file's folder.
    """
    json_path = Path(json_path)
    for index, raw in enumerate(load_json_list(json_path)):
        try:
            yield llava_to_record(raw, media_dir, json_path.parent)
        except RecordError as error:
            skips.add(error.reason, _where(json_path, index, raw), str(error))


# --- VideoChat-11K -------------------------------------------------------------------------------------------------


def resolve_video_path(video_dir: str | os.PathLike, relative: str) -> str:
    """Absolute path of a VideoChat video in either layout: `video_dir/<folder>/<name>.mp4` (as the JSON names
    it) or flat `video_dir/<name>.mp4` (as the original project stored them). Neither existing, the first is
    returned so that the builder reports it missing under the path the JSON names."""
    nested = os.path.abspath(os.path.join(video_dir, relative))
    if os.path.exists(nested):
        return nested
    flat = os.path.abspath(os.path.join(video_dir, os.path.basename(relative)))
    return flat if os.path.exists(flat) else nested


def videochat_to_records(
    raw: Any, index: int, video_dir: str | os.PathLike, max_turns: int | None = None
) -> list[dict]:
    """Converts one VideoChat record to one record, or to one per chunk of at most `max_turns` QA pairs.

    VideoChat: `{"video": "<folder>/<name>.mp4", "QA": [{"q": str, "a": str}, ...]}` (an optional "i",
    an instruction, is put before the question). Each chunk carries the video on its first user turn. Records
    are validated; a `RecordError` for a chunk propagates (the caller skips per chunk).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("video"), str) or not raw["video"]:
        raise RecordError(SKIP_MALFORMED, "expected an object with a 'video' path and a 'QA' list")
    qa = raw.get("QA")
    if not isinstance(qa, list):
        raise RecordError(SKIP_MALFORMED, "missing or non-list 'QA'")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(qa):
        if not isinstance(item, dict) or not isinstance(item.get("q"), str) or not isinstance(item.get("a"), str):
            raise RecordError(SKIP_MALFORMED, f"QA[{i}] must be {{'q': str, 'a': str}}, got {item!r:.80}")
        instruction = item.get("i")
        question = item["q"].strip()
        if isinstance(instruction, str) and instruction.strip():
            question = f"{instruction.strip()}\n{question}".strip()
        pairs.append((question, item["a"].strip()))
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be a positive number of QA pairs, got {max_turns}")
    size = max_turns or max(len(pairs), 1)
    chunks = [pairs[start : start + size] for start in range(0, len(pairs), size)] or [[]]
    video = {"type": "video", "path": resolve_video_path(video_dir, raw["video"])}
    stem = Path(raw["video"]).stem
    records = []
    for c, chunk in enumerate(chunks):
        messages = []
        for t, (question, answer) in enumerate(chunk):
            messages.append({"role": "user", "content": question, "media_index": 0 if t == 0 else None})
            messages.append({"role": "assistant", "content": answer, "media_index": None})
        record_id = f"{stem}_{index}" + (f"_{c}" if len(chunks) > 1 else "")
        # An empty QA list gives a record with no turns (and so no media): validation skips it as no_human_turn.
        records.append({"id": record_id, "messages": messages, "media": [video] if messages else []})
    return records


def read_videochat(
    json_path: str | os.PathLike,
    video_dir: str | os.PathLike | None,
    skips: SkipLog,
    max_turns: int | None = None,
) -> Iterator[dict]:
    """Yields records from VideoChat's `videochat_instruct_11k.json`, split into chunks of <= `max_turns` QA pairs.

    `video_dir` holds the WebVid videos, nested (`<folder>/<name>.mp4`) or flat (`<name>.mp4`); by default the
    JSON file's folder. A bad chunk is skipped on its own; the other chunks of its record are kept.
    """
    json_path = Path(json_path)
    video_dir = video_dir if video_dir is not None else json_path.parent
    for index, raw in enumerate(load_json_list(json_path)):
        where = _where(json_path, index, raw, id_key="video")
        try:
            chunks = videochat_to_records(raw, index, video_dir, max_turns)
        except RecordError as error:
            skips.add(error.reason, where, str(error))
            continue
        for c, chunk in enumerate(chunks):
            try:
                yield validate_record(chunk)
            except RecordError as error:
                skips.add(error.reason, f"{where} chunk {c}", str(error))


# --- Our own record format (JSON list or JSONL) --------------------------------------------------------------------


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object, None) for each non-blank line of a JSONL file, or (line number, None, error)
    for a line that is not valid JSON, so that callers decide whether a bad line stops them or is counted."""
    with Path(path).open("r", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"not valid JSON ({error.msg})"


def _iter_jsonl(path: Path, skips: SkipLog) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; unparsable lines are skipped as malformed."""
    for line_number, value, error in iter_jsonl(path):
        if error is not None:
            skips.add(SKIP_MALFORMED, f"{path}:{line_number}", error)
        else:
            yield line_number, value


def read_records(path: str | os.PathLike, media_dir: str | os.PathLike | None, skips: SkipLog) -> Iterator[dict]:
    """Yields records in our own format from a JSON list or a JSONL file (by suffix `.jsonl`).

    Relative media paths are resolved against `media_dir` (by default the file's folder).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file. Pass the path of the JSONL file.")
        items: Iterator[tuple[Any, Any]] = _iter_jsonl(path, skips)
        where_of = lambda key, raw: f"{path}:{key}" + (  # noqa: E731
            f" (id {raw.get('id')})" if isinstance(raw, dict) and "id" in raw else ""
        )
    else:
        items = enumerate(load_json_list(path))
        where_of = lambda key, raw: _where(path, key, raw)  # noqa: E731
    for key, raw in items:
        try:
            record = validate_record(raw)
        except RecordError as error:
            skips.add(error.reason, where_of(key, raw), str(error))
            continue
        for item in record["media"]:
            item["path"] = _resolve(media_dir, item["path"], path.parent)
        yield record


# --- Source specs ---------------------------------------------------------------------------------------------------

SOURCE_KINDS = ("llava", "videochat", "records")


@dataclass
class SourceSpec:
    """One input of a build: which reader, its JSON file, its media folder, and per-source options.

    `kind`: "llava" (CC3M-595K, LLaVA-Instruct-150K), "videochat" (VideoChat-11K) or "records" (our JSON/JSONL).
    `max_samples`: keep the first N valid records. `max_turns`: VideoChat chunk size in QA pairs (None: no split).
    """

    kind: str
    json_path: str
    media_dir: str | None = None
    name: str | None = None
    max_samples: int | None = None
    max_turns: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"Unknown source kind {self.kind!r}; choose one of {SOURCE_KINDS}.")
        if self.name is None:
            self.name = f"{self.kind}:{Path(self.json_path).name}"

    def to_dict(self) -> dict:
        """JSON-ready description for the manifest."""
        return {
            "name": self.name,
            "kind": self.kind,
            "json_path": os.path.abspath(self.json_path),
            "media_dir": None if self.media_dir is None else os.path.abspath(self.media_dir),
            "max_samples": self.max_samples,
            "max_turns": self.max_turns,
        }


def read_source(spec: SourceSpec, skips: SkipLog) -> Iterator[dict]:
    """Yields the valid records of one source (at most `spec.max_samples`), skipping bad ones into `skips`."""
    readers: dict[str, Callable[[], Iterator[dict]]] = {
        "llava": lambda: read_llava(spec.json_path, spec.media_dir, skips),
        "videochat": lambda: read_videochat(spec.json_path, spec.media_dir, skips, max_turns=spec.max_turns),
        "records": lambda: read_records(spec.json_path, spec.media_dir, skips),
    }
    records = readers[spec.kind]()
    return records if spec.max_samples is None else itertools.islice(records, spec.max_samples)
