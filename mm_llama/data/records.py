"""Conversation records (the format of docs/data.md), their validation, and the tally of skipped records.

A record is a plain dict, the unit every reader yields and the builder consumes:

```python
{
    "id": "000000033471",
    "messages": [
        {"role": "user", "content": "What is in the picture?", "media_index": 0},
        {"role": "assistant", "content": "A bus.", "media_index": None},
    ],
    "media": [{"type": "image", "path": "/data/coco/train2017/000000033471.jpg"}],
}
```

`media_index` on a user message is the index into `media` of the item that turn carries (the processor renders
the media marker after that turn's text); it is `None` (or absent) on every other message. Each media item is
carried by exactly one user turn and a user turn carries at most one item.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video", "audio")

# Reasons a record is skipped. Readers and the builder only ever use these names, so the manifest's counts are
# comparable across builds.
SKIP_MALFORMED = "malformed_record"  # missing keys, wrong types, unknown speaker, bad media_index
SKIP_NO_HUMAN_TURN = "no_human_turn"
SKIP_EMPTY_QUESTION = "empty_question"  # a user turn with neither text nor media
SKIP_EMPTY_ANSWER = "empty_answer"  # an empty assistant turn, or a last question without an answer
SKIP_TURN_ORDER = "bad_turn_order"  # turns do not alternate user/assistant
SKIP_IMAGE_TAG_ON_NO_TURN = "image_tag_on_no_turn"  # LLaVA: an image but no `<image>` tag in any human turn
SKIP_MULTIPLE_IMAGE_TAGS = "multiple_image_tags"  # LLaVA: one image, several `<image>` tags
SKIP_IMAGE_TAG_WITHOUT_IMAGE = "image_tag_without_image"  # LLaVA: an `<image>` tag but no image file named
SKIP_MISSING_MEDIA = "missing_media"
SKIP_EMPTY_MEDIA = "empty_media"  # a zero-length file
SKIP_CORRUPT_MEDIA = "corrupt_media"  # a file the decoder cannot read

# Found by the builder when it decodes a record's media (readers never open media files).
MEDIA_SKIP_REASONS = (SKIP_MISSING_MEDIA, SKIP_EMPTY_MEDIA, SKIP_CORRUPT_MEDIA)

SKIP_REASONS = (
    SKIP_MALFORMED,
    SKIP_NO_HUMAN_TURN,
    SKIP_EMPTY_QUESTION,
    SKIP_EMPTY_ANSWER,
    SKIP_TURN_ORDER,
    SKIP_IMAGE_TAG_ON_NO_TURN,
    SKIP_MULTIPLE_IMAGE_TAGS,
    SKIP_IMAGE_TAG_WITHOUT_IMAGE,
    SKIP_MISSING_MEDIA,
    SKIP_EMPTY_MEDIA,
    SKIP_CORRUPT_MEDIA,
)


class RecordError(ValueError):
    """A record that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class SkipLog:
    """Counts skipped records by reason and keeps the first few examples of each, for the manifest and summary.

    `where` names the file and record (e.g. `chat.json[17] (id 000123)`) so a user can find and fix it.
    """

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str, count: int = 1) -> None:
        """Records `count` skipped records for `reason`, keeping `where: detail` as an example."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"Unknown skip reason {reason!r}; use one of {SKIP_REASONS}.")
        self.counts[reason] += count
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}")

    def merge(self, other: "SkipLog") -> None:
        """Adds another log's counts and examples to this one."""
        for reason, count in other.counts.items():
            self.counts[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(shown))])

    @property
    def total(self) -> int:
        """Number of skipped records, all reasons together."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready `{"total", "by_reason", "examples"}` with reasons in a stable order."""
        by_reason = {reason: self.counts[reason] for reason in SKIP_REASONS if self.counts.get(reason)}
        return {"total": self.total, "by_reason": by_reason, "examples": {r: self.examples[r] for r in by_reason}}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RecordError(SKIP_MALFORMED, message)


def validate_record(record: Any) -> dict:
    """Checks a record against the contract and returns it normalised (media_index present on every message).

    Raises `RecordError` with the skip reason and a message saying what is wrong. Checks, in order: structure and
    types; media references (each item referenced by exactly one user turn, indices in range); conversation
    content (a user turn exists, turns alternate after an optional leading system message, no empty question or
    answer, the last user turn is answered).
    """
    _require(isinstance(record, dict), f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("id", "messages"):
        _require(key in record, f"missing key {key!r} (a record needs 'id', 'messages' and optionally 'media')")
    _require(isinstance(record["id"], (str, int)) and not isinstance(record["id"], bool), "'id' must be a string")
    media = record.get("media") or []
    _require(isinstance(media, list), "'media' must be a list of {'type', 'path'} objects")
    for i, item in enumerate(media):
        _require(isinstance(item, dict), f"media[{i}] must be an object with 'type' and 'path'")
        _require(item.get("type") in MEDIA_TYPES, f"media[{i}]['type'] must be one of {MEDIA_TYPES}")
        _require(isinstance(item.get("path"), str) and item["path"] != "", f"media[{i}]['path'] must be a string")
    messages = record["messages"]
    _require(isinstance(messages, list), "'messages' must be a list of {'role', 'content'} objects")

    normalised: list[dict] = []
    referenced: list[int] = []
    for i, message in enumerate(messages):
        _require(isinstance(message, dict), f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        _require(role in ROLES, f"messages[{i}]['role'] must be one of {ROLES}, got {role!r}")
        _require(isinstance(content, str), f"messages[{i}]['content'] must be a string")
        media_index = message.get("media_index")
        if media_index is not None:
            _require(role == "user", f"messages[{i}] is a {role} turn and cannot carry media")
            _require(
                isinstance(media_index, int) and not isinstance(media_index, bool) and 0 <= media_index < len(media),
                f"messages[{i}]['media_index'] must be an index into 'media' (0..{len(media) - 1}), got {media_index!r}",
            )
            referenced.append(media_index)
        normalised.append({"role": role, "content": content, "media_index": media_index})
    _require(
        sorted(referenced) == list(range(len(media))),
        f"each media item must be carried by exactly one user turn; turns reference {referenced} of {len(media)} items",
    )

    turns = normalised[1:] if normalised and normalised[0]["role"] == "system" else normalised
    if not any(m["role"] == "user" for m in turns):
        raise RecordError(SKIP_NO_HUMAN_TURN, "the conversation has no user turn")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(SKIP_TURN_ORDER, f"turn {i} is {message['role']!r}, expected {expected!r}")
        if message["role"] == "user" and not message["content"].strip() and message["media_index"] is None:
            raise RecordError(SKIP_EMPTY_QUESTION, f"user turn {i} has no text and no media")
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(SKIP_EMPTY_ANSWER, f"assistant turn {i} is empty")
    if turns[-1]["role"] != "assistant":
        raise RecordError(SKIP_EMPTY_ANSWER, "the last user turn has no answer")
    return {"id": str(record["id"]), "messages": normalised, "media": [dict(m) for m in media]}
