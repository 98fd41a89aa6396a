"""The embedding builder, end to end: upstream-format fixtures with real JPEG/PNG and mp4 files, a tiny random-init
ImageBind, Arrow output, manifest, bad media, resume after an interruption, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image

from mm_llama.data import BuildConfig, SourceSpec, build_dataset
from mm_llama.data.shards import shards_for_process
from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel, load_image, load_video
from training_utils import one_torch_thread

IMAGE_SIZE = 32


# --- fixtures: media files and the encoder -------------------------------------------------------------------------


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> Path:
    """A 64x48 image of random blocks (different per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_video(path: Path, seed: int, seconds: int = 3, fps: int = 8) -> Path:
    """A 64x48, `seconds` s, `fps` fps mp4 (MPEG-4 part 2) of a moving bar, encoded with PyAV."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        background = rng.integers(0, 256, 3, dtype=np.uint8)
        for t in range(seconds * fps):
            frame = np.broadcast_to(background, (48, 64, 3)).copy()
            frame[:, (t * 2) % 64 : (t * 2) % 64 + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def encoder() -> ImageBindVisionModel:
    torch.manual_seed(0)
    return ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=IMAGE_SIZE)).eval()


def direct_image(encoder, path) -> np.ndarray:
    """What the encoder gives for one image on its own: `[1, 1024]`."""
    with torch.no_grad():
        return encoder.embed_images(load_image(path, image_size=IMAGE_SIZE)[None]).numpy()


def direct_video(encoder, path) -> np.ndarray:
    with torch.no_grad():
        return encoder.embed_videos(load_video(path, image_size=IMAGE_SIZE)[None]).numpy()


def rows_by_id(dataset_dict) -> dict[str, dict]:
    return {row["id"]: row for split in dataset_dict.values() for row in split.with_format("numpy")}


@pytest.fixture(scope="module")
def llava_fixture(tmp_path_factory) -> tuple[Path, Path]:
    """CC3M-style chat.json with good and bad records, and its images folder."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    for i in range(3):
        write_image(images / f"GCC_{i}.jpg", seed=i)
    write_image(images / "sub" / "p.png", seed=9, fmt="PNG")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    (images / "empty.jpg").write_bytes(b"")
    conversations = [
        {"id": "a", "image": "GCC_0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "Blocks."}]},
        {"id": "b", "image": "GCC_1.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "Colours."},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
        {"id": "c", "image": "GCC_0.jpg", "conversations": [  # same image as "a": embedded once
            {"from": "human", "value": "<image>\nAgain?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "d", "image": "sub/p.png", "conversations": [
            {"from": "human", "value": "<image>\nPNG?"}, {"from": "gpt", "value": "PNG."}]},
        {"id": "missing", "image": "nope.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "empty", "image": "empty.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "malformed", "image": "GCC_2.jpg", "conversations": "<image>\nnot a list"},
        {"id": "notag", "image": "GCC_2.jpg", "conversations": [
            {"from": "human", "value": "No tag"}, {"from": "gpt", "value": "A"}]},
        {"id": "noanswer", "image": "GCC_2.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}]},
    ]
    return write_json(root / "chat.json", conversations), images


# --- tests ---------------------------------------------------------------------------------------------------------


def test_llava_build_counts_markers_embeddings_and_skips(llava_fixture, encoder, tmp_path):
    chat, images = llava_fixture
    manifest = build_dataset([SourceSpec("llava", str(chat), str(images))], encoder, tmp_path / "out",
                             batch_size=2, num_workers=1, shard_size=2)
    built = load_from_disk(str(tmp_path / "out"))
    assert list(built) == ["train"]  # validation ratio 0: no validation split
    rows = rows_by_id(built)
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert [m["media_index"] for m in rows["b"]["messages"]] == [0, None, None, None]
    assert [m["content"] for m in rows["b"]["messages"]] == ["What is this?", "Colours.", "More?", "No."]
    assert rows["a"]["messages"][0] == {"role": "user", "content": "Describe the image.", "media_index": 0}
    for id_, image in [("a", "GCC_0.jpg"), ("b", "GCC_1.jpg"), ("c", "GCC_0.jpg"), ("d", "sub/p.png")]:
        assert list(rows[id_]["media_types"]) == ["image"]
        assert rows[id_]["media_embeds"].shape == (1, 1, 1024) and rows[id_]["media_embeds"].dtype == np.float32
        np.testing.assert_allclose(rows[id_]["media_embeds"][:, 0], direct_image(encoder, images / image),
                                   rtol=1e-5, atol=1e-6)

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    # 10 records in the file: 3 skipped by the reader, 3 for their media, 4 written; the counts add up per source.
    assert counts["records_read"] == 10 and counts["records_written"] == 4 and counts["splits"] == {"train": 4}
    source = manifest["sources"][0]
    assert source["records_read"] == source["records_written"] + source["skipped"]["total"] == 10
    # a and c share GCC_0.jpg: 6 distinct files for 7 records.
    assert counts["media_distinct"] == 6 and counts["media_failed"] == 3
    assert manifest["skipped"]["by_reason"] == {
        "malformed_record": 1, "empty_answer": 1, "image_tag_on_no_turn": 1,
        "missing_media": 1, "empty_media": 1, "corrupt_media": 1,
    }
    assert manifest["sources"][0]["records_written"] == 4
    assert any("corrupt.jpg" in e for e in manifest["skipped"]["examples"]["corrupt_media"])
    assert manifest["encoder"]["image_size"] == IMAGE_SIZE and len(manifest["encoder"]["config_hash"]) == 64
    assert manifest["time_taken_s"] > 0
    assert not (tmp_path / "out" / "_shards").exists()  # shards are removed after success


def test_videochat_build_embeds_each_video_once(encoder, tmp_path, monkeypatch):
    videos = tmp_path / "webvid"  # flat layout, as the original project stored them
    write_video(videos / "1001.mp4", seed=1)
    write_video(videos / "1002.mp4", seed=2)
    good = (videos / "1002.mp4").read_bytes()
    (videos / "1003.mp4").write_bytes(good[: len(good) // 3])  # truncated
    data = write_json(tmp_path / "videochat_instruct_11k.json", [
        {"video": "000001_000050/1001.mp4", "QA": [{"q": f"Q{i}", "a": f"A{i}"} for i in range(5)]},
        {"video": "000001_000050/1002.mp4", "QA": [{"q": "What happens?", "a": "A bar moves."}]},
        {"video": "000001_000050/1003.mp4", "QA": [{"q": "Truncated?", "a": "Yes."}]},
    ])
    videos_embedded = []
    original = encoder.embed_videos
    monkeypatch.setattr(encoder, "embed_videos", lambda x: videos_embedded.append(len(x)) or original(x))
    manifest = build_dataset([SourceSpec("videochat", str(data), str(videos), max_turns=2)], encoder,
                             tmp_path / "out", batch_size=4, num_workers=0)
    assert sum(videos_embedded) == 2  # three chunks of 1001 share one embedding; the truncated file is not embedded
    rows = rows_by_id(load_from_disk(str(tmp_path / "out")))
    assert sorted(rows) == ["1001_0_0", "1001_0_1", "1001_0_2", "1002_1"]
    expected = direct_video(encoder, videos / "1001.mp4")
    for chunk in ("1001_0_0", "1001_0_1", "1001_0_2"):
        assert [m["media_index"] for m in rows[chunk]["messages"]][0] == 0
        assert all(m["media_index"] is None for m in rows[chunk]["messages"][1:])
        assert list(rows[chunk]["media_types"]) == ["video"]
        np.testing.assert_allclose(rows[chunk]["media_embeds"][:, 0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["1002_1"]["media_embeds"][:, 0], direct_video(encoder, videos / "1002.mp4"),
                               rtol=1e-5, atol=1e-6)
    assert manifest["skipped"]["by_reason"] == {"corrupt_media": 1}
    assert manifest["counts"]["media_by_type"] == {"image": 0, "video": 3, "audio": 0}


def test_records_jsonl_mixed_media_text_only_and_split(encoder, tmp_path):
    write_image(tmp_path / "m" / "x.jpg", seed=5)
    write_video(tmp_path / "m" / "v.mp4", seed=6, seconds=2)
    rows = [
        {"id": "mixed", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Picture:", "media_index": 0}, {"role": "assistant", "content": "Seen."},
            {"role": "user", "content": "Video:", "media_index": 1}, {"role": "assistant", "content": "Seen too."}],
         "media": [{"type": "image", "path": "x.jpg"}, {"type": "video", "path": "v.mp4"}]},
    ] + [{"id": f"text{i}", "messages": [{"role": "user", "content": f"Hi {i}"},
                                         {"role": "assistant", "content": "Hello"}]} for i in range(7)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    manifest = build_dataset([SourceSpec("records", str(tmp_path / "data.jsonl"), str(tmp_path / "m"))], encoder,
                             tmp_path / "out", num_workers=0, validation_ratio=0.25, seed=3)
    built = load_from_disk(str(tmp_path / "out"))
    assert {name: len(split) for name, split in built.items()} == {"train": 6, "validation": 2}
    assert manifest["counts"]["splits"] == {"train": 6, "validation": 2}
    assert manifest["skipped"]["by_reason"] == {"malformed_record": 1}
    by_id = rows_by_id(built)
    mixed = by_id["mixed"]
    assert list(mixed["media_types"]) == ["image", "video"] and mixed["media_embeds"].shape == (2, 1, 1024)
    assert [m["media_index"] for m in mixed["messages"]] == [None, 0, None, 1, None]
    np.testing.assert_allclose(mixed["media_embeds"][0], direct_image(encoder, tmp_path / "m" / "x.jpg"), atol=1e-6)
    np.testing.assert_allclose(mixed["media_embeds"][1], direct_video(encoder, tmp_path / "m" / "v.mp4"), atol=1e-6)
    assert by_id["text0"]["media_embeds"].shape == (0, 1, 1024) and list(by_id["text0"]["media_types"]) == []


class Interrupt(Exception):
    pass


def assert_same_dataset(path_a: Path, path_b: Path) -> None:
    a, b = load_from_disk(str(path_a)), load_from_disk(str(path_b))
    assert list(a) == list(b)
    for split in a:
        assert a[split]["id"] == b[split]["id"] and a[split]["messages"] == b[split]["messages"]
        np.testing.assert_array_equal(np.concatenate(a[split].with_format("numpy")["media_embeds"]),
                                      np.concatenate(b[split].with_format("numpy")["media_embeds"]))


def test_interrupted_build_resumes_to_the_same_dataset(llava_fixture, encoder, tmp_path):
    chat, images = llava_fixture
    sources = [SourceSpec("llava", str(chat), str(images))]
    config = BuildConfig(batch_size=1, num_workers=0, shard_size=1, validation_ratio=0.3)
    build_dataset(sources, encoder, tmp_path / "full", config)

    written = []

    def stop_after_two(shard_id: int) -> None:
        written.append(shard_id)
        if len(written) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_dataset(sources, encoder, tmp_path / "resumed", config, on_shard_written=stop_after_two)
    assert sorted(p.name for p in (tmp_path / "resumed" / "_shards").glob("media-*.arrow")) == [
        "media-00000.arrow", "media-00001.arrow"]
    assert not (tmp_path / "resumed" / "manifest.json").exists()

    # A resume with other settings (a keyword overrides the config's field) is refused rather than mixing
    # embeddings of two builds.
    with pytest.raises(ValueError, match="--overwrite"):
        build_dataset(sources, encoder, tmp_path / "resumed", config, shard_size=2)

    # A damaged shard file (say, a disk error) is embedded again rather than trusted.
    (tmp_path / "resumed" / "_shards" / "media-00001.arrow").write_bytes(b"garbage")
    redone = []
    manifest = build_dataset(sources, encoder, tmp_path / "resumed", config, on_shard_written=redone.append)
    assert redone == [1, 2, 3, 4, 5]  # the finished shard 0 was not embedded again
    assert manifest["build"]["shards_resumed"] == 1
    assert_same_dataset(tmp_path / "full", tmp_path / "resumed")

    # A finished build is not overwritten by accident; --overwrite rebuilds from scratch.
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_dataset(sources, encoder, tmp_path / "resumed", config)
    again = []
    build_dataset(sources, encoder, tmp_path / "resumed", config, overwrite=True, on_shard_written=again.append)
    assert again == [0, 1, 2, 3, 4, 5]
    assert_same_dataset(tmp_path / "full", tmp_path / "resumed")


def test_build_config_is_the_one_declaration_of_the_build_flags():
    """HfArgumentParser turns BuildConfig into flags with its defaults and helps; bad values fail when given."""
    from dataclasses import fields

    from transformers import HfArgumentParser

    parser = HfArgumentParser(BuildConfig)
    (defaults,) = parser.parse_args_into_dataclasses([])
    assert defaults == BuildConfig()
    (given,) = parser.parse_args_into_dataclasses(["--shard_size", "8", "--dtype", "bfloat16", "--overwrite"])
    assert (given.shard_size, given.dtype, given.overwrite) == (8, "bfloat16", True)
    # Progress bars are no build option: mm_llama.progress's switch (the command's --no_progress) decides.
    assert "progress" not in {item.name for item in fields(BuildConfig)}
    with pytest.raises(ValueError, match="--no_progress"):
        parser.parse_args_into_dataclasses(["--no_progress"])
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--dtype", "int8"])
    # argparse may wrap a line after a hyphen ("random-" / "init"): undo that before comparing.
    help_text = " ".join(parser.format_help().split()).replace("- ", "-")
    for config_field in fields(BuildConfig):
        assert " ".join(config_field.metadata["help"].split()) in help_text, config_field.name
    with pytest.raises(ValueError, match="batch_size and shard_size must be positive, got 0 and 1024"):
        BuildConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"validation_ratio must be in \[0, 1\), got 1.0"):
        BuildConfig(validation_ratio=1.0)
    with pytest.raises(TypeError, match="shard_sise"):
        build_dataset([], torch.nn.Linear(1, 1), "unused", shard_sise=2)  # a misspelt option is not ignored


def test_bfloat16_encoder_and_a_build_with_nothing_usable(llava_fixture, tmp_path):
    chat, images = llava_fixture
    torch.manual_seed(0)
    bf16_encoder = ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=IMAGE_SIZE))
    reference = direct_image(bf16_encoder, images / "GCC_1.jpg")  # float32, before the builder casts it
    manifest = build_dataset([SourceSpec("llava", str(chat), str(images), max_samples=2)], bf16_encoder,
                             tmp_path / "bf16", dtype="bfloat16", num_workers=0)
    assert manifest["encoder"]["dtype"] == "bfloat16"
    row = rows_by_id(load_from_disk(str(tmp_path / "bf16")))["b"]
    assert row["media_embeds"].dtype == np.float32  # stored as float32 whatever the encoder's precision
    np.testing.assert_allclose(row["media_embeds"][:, 0], reference, atol=2e-2)

    # Every record unusable: an empty dataset and a manifest that says why, not a crash.
    bad = write_json(tmp_path / "bad.json", [
        {"id": "m", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                           {"from": "gpt", "value": "A"}]},
        {"id": "x", "conversations": []}])
    manifest = build_dataset([SourceSpec("llava", str(bad), str(images))], bf16_encoder, tmp_path / "empty",
                             num_workers=0)
    assert manifest["counts"]["records_written"] == 0
    assert manifest["skipped"]["by_reason"] == {"no_human_turn": 1, "missing_media": 1}
    assert len(load_from_disk(str(tmp_path / "empty"))["train"]) == 0


def test_process_slices_cover_every_shard_once():
    for total in (0, 1, 7, 16):
        for processes in (1, 2, 3, 8):
            slices = [shards_for_process(total, p, processes) for p in range(processes)]
            assert sorted(k for s in slices for k in s) == list(range(total))


def test_several_processes_build_the_same_dataset(llava_fixture, tmp_path):
    """torchrun with 2 CPU processes (accelerate's PartialState groups them): each embeds its shards, the main
    process assembles; the result matches a one-process build (run in this process, as `mm-llama build-datasets`)."""
    from mm_llama.cli import main as cli

    chat, images = llava_fixture
    script = Path(__file__).parents[1] / "scripts" / "build_datasets.py"
    common = ["--source", "llava", "--json", str(chat), "--media_dir", str(images), "--encoder_preset", "tiny",
              "--image_size", str(IMAGE_SIZE), "--num_workers", "0", "--shard_size", "1", "--no_progress", "--cpu"]
    env = {**os.environ, "PYTHONPATH": str(script.parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *common, "--output", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # --no_progress reaches datasets' own bar too, although datasets is imported after the flag turned the switch.
    assert "Saving the dataset" not in result.stderr and "%|" not in result.stderr, result.stderr[-3000:]
    with one_torch_thread():  # as OMP_NUM_THREADS=1 in the two processes
        assert cli(["build-datasets", *common, "--output", str(tmp_path / "one")]) == 0
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["build"]["num_processes"] == 2 and manifest["counts"]["records_written"] == 4
    # Same thread count in both runs (one): bitwise the same embeddings.
    assert_same_dataset(tmp_path / "one", tmp_path / "two")


def test_build_datasets_command_end_to_end(llava_fixture, tmp_path, capsys):
    from mm_llama.cli import main as cli

    chat, images = llava_fixture
    assert cli(["build-datasets", "--source", "llava", "--json", str(chat), "--media_dir", str(images), "--encoder_preset", "tiny",
          "--image_size", str(IMAGE_SIZE), "--output", str(tmp_path / "out"), "--num_workers", "0",
          "--max_samples", "2", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "records read: 2, written: 2" in printed and "skipped records: 0" in printed
    assert len(load_from_disk(str(tmp_path / "out"))["train"]) == 2
