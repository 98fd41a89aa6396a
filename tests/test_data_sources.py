"""Readers: upstream formats -> conversation records, with bad records skipped and counted by reason."""

from __future__ import annotations

import json
import os

import pytest

from mm_llama.data import (
    SkipLog,
    SourceSpec,
    read_llava,
    read_records,
    read_source,
    read_videochat,
    validate_record,
)
from mm_llama.data.records import RecordError


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def llava(id_, image, *turns):
    """A record in LLaVA's exact format; turns alternate human/gpt."""
    record = {"id": id_, "conversations": [
        {"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(turns)]}
    if image is not None:
        record["image"] = image
    return record


# --- LLaVA ---------------------------------------------------------------------------------------------------------


def test_llava_image_tag_before_or_after_text_becomes_media_index(tmp_path):
    path = write_json(tmp_path / "chat.json", [
        llava("a", "GCC_1.jpg", "<image>\nDescribe the image.", "A cat."),  # CC3M: tag first
        llava("b", "sub/2.jpg", "What is this?\n<image>", "A dog."),  # tag after the text
        llava("c", "3.jpg", "What colour?\n<image>", "Red.", "How many?", "Two."),  # Instruct-150K multi-turn
    ])
    skips = SkipLog()
    records = list(read_llava(path, tmp_path / "images", skips))
    assert skips.total == 0
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert records[0]["messages"] == [
        {"role": "user", "content": "Describe the image.", "media_index": 0},
        {"role": "assistant", "content": "A cat.", "media_index": None},
    ]
    assert records[1]["messages"][0] == {"role": "user", "content": "What is this?", "media_index": 0}
    assert [m["media_index"] for m in records[2]["messages"]] == [0, None, None, None]
    assert records[2]["messages"][2]["content"] == "How many?"
    assert records[1]["media"] == [{"type": "image", "path": os.path.abspath(tmp_path / "images" / "sub" / "2.jpg")}]


def test_llava_text_only_record_and_default_media_dir(tmp_path):
    path = write_json(tmp_path / "chat.json", [llava("t", None, "Hello?", "Hi."), llava("i", "x.jpg", "<image>", "Y")])
    records = list(read_llava(path, None, SkipLog()))
    assert records[0]["media"] == [] and records[0]["messages"][0]["media_index"] is None
    # A turn holding only the tag is a question made of the image alone.
    assert records[1]["messages"][0] == {"role": "user", "content": "", "media_index": 0}
    assert records[1]["media"][0]["path"] == os.path.abspath(tmp_path / "x.jpg")


@pytest.mark.parametrize(
    "record, reason",
    [
        (llava("r", "a.jpg"), "no_human_turn"),
        ({"id": "r", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "Only an answer."}]}, "no_human_turn"),
        (llava("r", "a.jpg", "<image>\nWhat?", "   "), "empty_answer"),
        (llava("r", "a.jpg", "<image>\nWhat?"), "empty_answer"),
        (llava("r", "a.jpg", "What is it?", "A cat."), "image_tag_on_no_turn"),
        (llava("r", "a.jpg", "<image>\nWhat?", "A.", "<image> again?", "B."), "multiple_image_tags"),
        (llava("r", None, "<image>\nWhat?", "A."), "image_tag_without_image"),
        ({"id": "r", "image": "a.jpg"}, "malformed_record"),
        ({"image": "a.jpg", "conversations": []}, "malformed_record"),
        ({"id": "r", "image": "a.jpg", "conversations": [{"from": "bot", "value": "<image>"}]}, "malformed_record"),
        ({"id": "r", "image": 3, "conversations": [{"from": "human", "value": "<image>"}]}, "malformed_record"),
        ("not an object", "malformed_record"),
        ({"id": "r", "conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"},
                                       {"from": "gpt", "value": "C"}]}, "bad_turn_order"),
    ],
)
def test_llava_bad_records_are_skipped_by_reason(tmp_path, record, reason):
    good = llava("good", "g.jpg", "<image>\nQ", "A")
    path = write_json(tmp_path / "chat.json", [good, record, good])
    skips = SkipLog()
    records = list(read_llava(path, tmp_path, skips))
    assert len(records) == 2
    assert dict(skips.counts) == {reason: 1}
    example = skips.examples[reason][0]
    assert example.startswith(f"{path}[1]")  # names the file and the record's position


def test_unreadable_json_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "chat.json"
    bad.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="chat.json is not valid JSON"):
        list(read_llava(bad, tmp_path, SkipLog()))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(read_llava(tmp_path / "obj.json", tmp_path, SkipLog()))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        list(read_llava(tmp_path / "missing.json", tmp_path, SkipLog()))


# --- VideoChat -----------------------------------------------------------------------------------------------------


def qa(n, empty_answer_at=None):
    return [{"q": f"Question {i}?", "a": "" if i == empty_answer_at else f"Answer {i}."} for i in range(n)]


def test_videochat_chunks_carry_the_video_on_their_first_user_turn(tmp_path):
    path = write_json(tmp_path / "vc.json", [{"video": "000001_000050/1234.mp4", "QA": qa(5)},
                                             {"video": "000001_000050/99.mp4", "QA": qa(1)}])
    records = list(read_videochat(path, tmp_path / "videos", SkipLog(), max_turns=2))
    assert [r["id"] for r in records] == ["1234_0_0", "1234_0_1", "1234_0_2", "99_1"]
    assert [len(r["messages"]) for r in records] == [4, 4, 2, 2]
    for record in records:
        assert [m["media_index"] for m in record["messages"]] == [0] + [None] * (len(record["messages"]) - 1)
        assert record["media"] == [{"type": "video", "path": os.path.abspath(
            tmp_path / "videos" / "000001_000050" / (record["id"].split("_")[0] + ".mp4"))}]
    assert records[1]["messages"][0]["content"] == "Question 2?"
    assert records[2]["messages"][1]["content"] == "Answer 4."
    unchunked = list(read_videochat(path, tmp_path / "videos", SkipLog()))
    assert [len(r["messages"]) for r in unchunked] == [10, 2]


def test_videochat_finds_videos_in_folder_or_flat_layout(tmp_path):
    (tmp_path / "nested" / "f1").mkdir(parents=True)
    (tmp_path / "nested" / "f1" / "1.mp4").write_bytes(b"x")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.mp4").write_bytes(b"x")
    path = write_json(tmp_path / "vc.json", [{"video": "f1/1.mp4", "QA": qa(1)}])
    nested = list(read_videochat(path, tmp_path / "nested", SkipLog()))[0]["media"][0]["path"]
    flat = list(read_videochat(path, tmp_path / "flat", SkipLog()))[0]["media"][0]["path"]
    assert nested == os.path.abspath(tmp_path / "nested" / "f1" / "1.mp4")
    assert flat == os.path.abspath(tmp_path / "flat" / "1.mp4")
    # Neither layout has it: the path the JSON names, so the builder reports that one as missing.
    missing = list(read_videochat(path, tmp_path / "none", SkipLog()))[0]["media"][0]["path"]
    assert missing == os.path.abspath(tmp_path / "none" / "f1" / "1.mp4")


def test_videochat_bad_chunks_and_records_are_skipped(tmp_path):
    path = write_json(tmp_path / "vc.json", [
        {"video": "f/1.mp4", "QA": qa(4, empty_answer_at=3)},  # chunk 1 of 2 has the empty answer
        {"video": "f/2.mp4"},  # no QA
        {"video": "f/3.mp4", "QA": [{"q": "only a question"}]},
        {"video": "f/4.mp4", "QA": []},
        {"QA": qa(1)},
    ])
    skips = SkipLog()
    records = list(read_videochat(path, tmp_path, skips, max_turns=2))
    assert [r["id"] for r in records] == ["1_0_0"]
    assert dict(skips.counts) == {"empty_answer": 1, "malformed_record": 3, "no_human_turn": 1}
    assert skips.examples["empty_answer"][0].startswith(f"{path}[0] (id f/1.mp4) chunk 1")


# --- Our own format ------------------------------------------------------------------------------------------------


def our_record(id_="r1"):
    return {
        "id": id_,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Look.", "media_index": 0},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And this?", "media_index": 1},
            {"role": "assistant", "content": "A video of a dog."},
        ],
        "media": [{"type": "image", "path": "img/a.png"}, {"type": "video", "path": "/abs/b.mp4"}],
    }


def test_records_jsonl_and_json_with_malformed_lines(tmp_path):
    bad_index = our_record("bad_index")
    bad_index["messages"][1]["media_index"] = 5
    unreferenced = our_record("unreferenced")
    unreferenced["messages"][3]["media_index"] = None
    on_assistant = our_record("on_assistant")
    on_assistant["messages"][2]["media_index"] = 1
    lines = [json.dumps(our_record()), "{not json", json.dumps({"id": "x"}), "", json.dumps(bad_index),
             json.dumps(unreferenced), json.dumps(on_assistant)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    skips = SkipLog()
    records = list(read_records(tmp_path / "data.jsonl", tmp_path / "media", skips))
    assert len(records) == 1
    assert dict(skips.counts) == {"malformed_record": 5}
    assert any(e.startswith(f"{tmp_path / 'data.jsonl'}:2") for e in skips.examples["malformed_record"])
    record = records[0]
    assert [m["media_index"] for m in record["messages"]] == [None, 0, None, 1, None]
    assert record["media"] == [{"type": "image", "path": os.path.abspath(tmp_path / "media" / "img" / "a.png")},
                               {"type": "video", "path": "/abs/b.mp4"}]
    json_path = write_json(tmp_path / "data.json", [our_record("a"), our_record("b")])
    assert [r["id"] for r in read_records(json_path, None, SkipLog())] == ["a", "b"]


def test_validate_record_reasons():
    ok = {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert validate_record(ok)["id"] == "7" and validate_record(ok)["media"] == []
    cases = {
        "bad_turn_order": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}],
        "empty_question": [{"role": "user", "content": " "}, {"role": "assistant", "content": "A"}],
        "no_human_turn": [{"role": "system", "content": "S"}],
        "malformed_record": [{"role": "user", "content": 3}],
    }
    for reason, messages in cases.items():
        with pytest.raises(RecordError) as error:
            validate_record({"id": "x", "messages": messages})
        assert error.value.reason == reason


def test_read_source_max_samples_counts_valid_records(tmp_path):
    path = write_json(tmp_path / "chat.json", [llava("bad", "a.jpg", "no tag", "A")] +
                      [llava(str(i), f"{i}.jpg", "<image>\nQ", "A") for i in range(5)])
    skips = SkipLog()
    records = list(read_source(SourceSpec("llava", path, str(tmp_path), max_samples=3), skips))
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert skips.total == 1
    with pytest.raises(ValueError, match="Unknown source kind"):
        SourceSpec("coco", path)
