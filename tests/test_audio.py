"""Audio through ImageBind's joint space, end to end on tiny models: a WAV and an mp4's audio track go through
`mm-llama chat --audio`, the pipeline and a dataset build; the audio placeholder sits in its turn between <<AUD>> markers;
bad audio is a one-line error in chat and a counted skip in a build."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from mm_llama import MMLlamaProcessor
from mm_llama.cli import main as cli
from mm_llama.imagebind import (
    ImageBindAudioConfig,
    ImageBindAudioModel,
    ImageBindAudioProcessor,
    ImageBindProcessor,
)
from mm_llama.testing_utils import tiny_imagebind
from test_chat_cli import MAX_NEW_TOKENS, expected_answer, user
from test_merge import save_stage1
from test_processing import meta_style_media_tokens

av = pytest.importorskip("av")
RATE = 16000


def tone(seconds: float, frequency: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * frequency * t) + 0.02 * np.random.default_rng(int(frequency)).standard_normal(t.size)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def write_mp4_with_sound(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """A short mp4 (MPEG-4 video + AAC audio), as a phone writes a clip with sound."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=8)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for index in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 10, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        pcm = samples.astype(np.float32)[None]
        for start in range(0, pcm.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model_path):
    root = tmp_path_factory.mktemp("audio")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    imagebind = root / "imagebind"  # the layout `mm-llama convert-imagebind --modality all` writes
    tiny_imagebind(image_size=32, seed=0).save_pretrained(imagebind / "vision")
    ImageBindProcessor(image_size=32).save_pretrained(imagebind / "vision")
    audio_model = ImageBindAudioModel(ImageBindAudioConfig.from_preset("tiny")).eval()
    audio_model.save_pretrained(imagebind / "audio")
    ImageBindAudioProcessor().save_pretrained(imagebind / "audio")
    media = {"wav": write_wav(root / "bird.wav", tone(3.0, 880)),
             "mp4": write_mp4_with_sound(root / "street.mp4", tone(2.5, 220)),
             "bad": root / "broken.wav"}
    media["bad"].write_bytes(b"RIFF\x00\x00not really audio")
    model = AutoModelForCausalLM.from_pretrained(stage1).eval()
    return root, stage1, imagebind, audio_model, media, model, MMLlamaProcessor.from_pretrained(stage1)


def audio_vector(audio_model, path) -> torch.Tensor:
    """The embedding the chat must use: ImageBind's audio embedding divided by its logit scale (unit-norm clips)."""
    features = ImageBindAudioProcessor()(audio=[path])["input_features"]
    with torch.no_grad():
        meta = audio_model.embed_audio(features)[0]
    return meta / audio_model.config.logit_scale


@pytest.mark.parametrize("kind", ["wav", "mp4"])
def test_chat_answers_about_a_sound(setup, kind, capsys):
    root, stage1, imagebind, audio_model, media, model, processor = setup
    vector = audio_vector(audio_model, media[kind])
    assert vector.norm() <= 1.0 + 1e-5  # on the scale of the vision embeddings the projector was trained on
    expected = expected_answer(model, processor, [user("What do you hear?", media[kind], "audio")], [vector])
    assert cli(["chat", str(stage1), "--imagebind", str(imagebind), "--device", "cpu", "--temperature", "0",
                "--max_new_tokens", str(MAX_NEW_TOKENS), "--prompt", "What do you hear?", "--audio",
                str(media[kind]), "--no_stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_audio_placeholder_ids_in_the_generation_prompt(setup, sp_reference=None):
    import sentencepiece as spm

    from mm_llama.generation import MediaEmbedder, build_generation_inputs

    root, stage1, imagebind, audio_model, media, model, processor = setup
    embedder = MediaEmbedder.for_model(model, processor, imagebind=imagebind)
    conversation = [user("What is it?", media["mp4"], "video"), {"role": "assistant", "content": "A street."},
                    user("And the sound?", media["wav"], "audio")]
    inputs = build_generation_inputs(processor, [conversation], embedder)
    sp = spm.SentencePieceProcessor(model_file=str(stage1 / "tokenizer.model"))
    reference = [{"role": "user", "content": "What is it?", "media": "video"},
                 {"role": "assistant", "content": "A street."},
                 {"role": "user", "content": "And the sound?", "media": "audio"}]
    assert inputs["input_ids"][0].tolist() == meta_style_media_tokens(sp, reference)
    assert inputs["media_type_ids"].tolist() == [1, 2]
    torch.testing.assert_close(inputs["media_embeds"][1, 0], audio_vector(audio_model, media["wav"]))


def test_pipeline_takes_audio_content_parts(setup):
    from transformers import pipeline

    root, stage1, imagebind, audio_model, media, model, processor = setup
    chat = pipeline("mm-llama-chat", model=str(stage1), imagebind=str(imagebind), device="cpu")
    messages = [user("What do you hear?", media["wav"], "audio")]
    answer = chat(messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]["content"]
    assert answer == expected_answer(model, processor, messages, [audio_vector(audio_model, media["wav"])])


def test_bad_audio_is_a_one_line_error_naming_the_file(setup, capsys):
    root, stage1, imagebind, audio_model, media, model, processor = setup
    common = [str(stage1), "--device", "cpu", "--temperature", "0", "--max_new_tokens", "2", "--prompt", "Hi"]
    assert cli(["chat", *common, "--imagebind", str(imagebind), "--audio", str(media["bad"])]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "rror" in line]
    assert len(errors) == 1 and errors[0].startswith("error: Audio file") and "broken.wav" in errors[0]
    # Without an audio tower (a vision-only ImageBind folder), raw audio says what to pass.
    assert cli(["chat", *common, "--imagebind", str(imagebind / "vision"), "--audio", str(media["wav"])]) == 1
    assert "--modality all" in capsys.readouterr().err


def test_dataset_build_embeds_audio_records_and_counts_bad_audio(setup, tmp_path, capsys):
    root, stage1, imagebind, audio_model, media, model, processor = setup
    records = [
        {"id": "bird", "messages": [{"role": "user", "content": "What is this sound?", "media_index": 0},
                                    {"role": "assistant", "content": "A bird."}],
         "media": [{"type": "audio", "path": str(media["wav"])}]},
        {"id": "street", "messages": [{"role": "user", "content": "And this one?", "media_index": 0},
                                      {"role": "assistant", "content": "Traffic."}],
         "media": [{"type": "audio", "path": str(media["mp4"])}]},
        {"id": "broken", "messages": [{"role": "user", "content": "Hm?", "media_index": 0},
                                      {"role": "assistant", "content": "Nothing."}],
         "media": [{"type": "audio", "path": str(media["bad"])}]},
    ]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    common = ["build-datasets", "--source", "records", "--json", str(jsonl), "--num_workers", "0",
              "--validation_ratio", "0", "--no_progress"]
    assert cli([*common, "--encoder", str(imagebind), "--output", str(tmp_path / "built")]) == 0
    assert "records read: 3, written: 2" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "built" / "manifest.json").read_text())
    assert manifest["skipped"]["by_reason"] == {"corrupt_media": 1}
    assert manifest["counts"]["media_by_type"] == {"image": 0, "video": 0, "audio": 3}
    assert "audio" in manifest["encoder"]
    rows = {row["id"]: row for row in load_from_disk(str(tmp_path / "built"))["train"].with_format("numpy")}
    assert list(rows["bird"]["media_types"]) == ["audio"]
    for name, kind in (("bird", "wav"), ("street", "mp4")):
        np.testing.assert_allclose(rows[name]["media_embeds"][0, 0], audio_vector(audio_model, media[kind]).numpy(),
                                   rtol=1e-4, atol=1e-5)
    # Audio records without an audio tower fail before any embedding, saying what to pass.
    assert cli([*common, "--encoder", str(imagebind / "vision"), "--output", str(tmp_path / "no-audio")]) == 1
    assert "no ImageBind audio model was given" in capsys.readouterr().err
