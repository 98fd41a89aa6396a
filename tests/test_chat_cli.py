"""`mm-llama chat` (and scripts/chat.py): interactive multi-turn chat over stdin (streamed), one-shot and batched modes, raw images through
a standalone ImageBind model, 4-bit loading, and one-line errors for bad media. Expected answers come from direct
greedy `model.generate` calls on the processor's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForCausalLM

from mm_llama import MMLlamaProcessor
from mm_llama.cli import main as cli
from test_merge import MEDIA_DIM, REPO_ROOT, save_stage1

MAX_NEW_TOKENS = 8
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model_path):
    root = tmp_path_factory.mktemp("chat")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    embeds = []
    for index, suffix in enumerate([".pt", ".npy", ".safetensors"]):
        vector = torch.randn(MEDIA_DIM, generator=torch.Generator().manual_seed(index))
        path = root / f"embedding{index}{suffix}"
        if suffix == ".pt":
            torch.save(vector, path)
        elif suffix == ".npy":
            np.save(path, vector[None].numpy())  # the [1, 1024] layout
        else:
            from safetensors.torch import save_file

            save_file({"embedding": vector}, str(path))
        embeds.append((path, vector))
    model = AutoModelForCausalLM.from_pretrained(stage1).eval()
    processor = MMLlamaProcessor.from_pretrained(stage1)
    return root, stage1, embeds, model, processor


def expected_answer(model, processor, messages, media_vectors) -> str:
    media = torch.stack(media_vectors).view(len(media_vectors), 1, -1) if media_vectors else None
    inputs = processor(messages, media_embeds=media, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=processor.pad_token_id)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def user(text, path=None, media_type="image"):
    content = [{"type": "text", "text": text}]
    if path is not None:
        content.append({"type": media_type, "path": str(path)})
    return {"role": "user", "content": content}


def test_interactive_two_turns_with_image_streamed_over_stdin(setup):
    root, stage1, embeds, model, processor = setup
    image, vector = embeds[0]
    stdin = "\n".join([
        f"/image {root / 'missing.png'}",
        f"/image {image}",
        "What is in the image?",
        "/bogus",
        "And what colour is it?",
        "/quit",
        "never read",
    ]) + "\n"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "chat.py"), str(stage1), "--device", "cpu", "--temperature", "0",
         "--max_new_tokens", str(MAX_NEW_TOKENS), "--system", SYSTEM, "--stream"],
        input=stdin, capture_output=True, text=True, encoding="utf-8", timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first_turn = [{"role": "system", "content": SYSTEM}, user("What is in the image?", image)]
    answer1 = expected_answer(model, processor, first_turn, [vector])
    second_turn = first_turn + [{"role": "assistant", "content": answer1}, user("And what colour is it?")]
    answer2 = expected_answer(model, processor, second_turn, [vector])  # the image stays in the history
    assert answer1 and answer2
    assert result.stdout.startswith("Assistant: ")
    answers = [part.strip() for part in result.stdout.split("Assistant: ")[1:]]
    assert answers == [answer1, answer2]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert "missing.png" in errors[0] and "does not exist" in errors[0]
    assert "unknown command '/bogus'" in errors[1]
    assert "Traceback" not in result.stderr


def test_interactive_without_streaming_and_reset(setup, monkeypatch, capsys):
    import io

    root, stage1, embeds, model, processor = setup
    image, vector = embeds[1]  # a .npy file holding [1, 1024]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {image}\nDescribe the video.\n/reset\nHello\n"))
    assert cli(["chat", str(stage1), "--device", "cpu", "--temperature", "0", "--max_new_tokens",
                        str(MAX_NEW_TOKENS), "--no_stream"]) == 0
    out = capsys.readouterr().out
    expected = [
        expected_answer(model, processor, [user("Describe the video.", image, "video")], [vector]),
        expected_answer(model, processor, [user("Hello")], []),  # after /reset: no history
    ]
    assert out == "".join(f"Assistant: {answer}\n" for answer in expected)


def test_a_second_media_item_on_a_later_turn_goes_in_that_turn(setup):
    """An image on turn 1, a video on turn 2 (the issue's leaking-marker case): the session's prompt has each marker
    in the turn that brought it (the ids equal the processor's, whose Meta-style ids test_processing checks), and
    the answer is the model's greedy answer to exactly that conversation with both vectors in order."""
    from mm_llama.frontends.chat import ChatSession
    from mm_llama.generation import GenerationSettings, MediaEmbedder

    root, stage1, embeds, model, processor = setup
    (image, image_vector), (video, video_vector) = embeds[0], embeds[2]
    session = ChatSession(model, processor, MediaEmbedder.for_model(model, processor, device="cpu"),
                          GenerationSettings(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    session.attach("image", image)
    answer1 = session.respond("What is it?")
    session.attach("video", video)
    conversation = session.conversation("And this clip?")
    encoded = processor.encode_conversation(conversation, add_generation_prompt=True)
    assert encoded.text.endswith(
        f"[INST] What is it? <<IMG>><unk><</IMG>> [/INST] {answer1} </s><s>[INST] And this clip? "
        "<<VID>><unk><</VID>> [/INST]")
    answer2 = session.respond("And this clip?")
    expected = expected_answer(model, processor, [user("What is it?", image), {"role": "assistant", "content": answer1},
                                                  user("And this clip?", video, "video")],
                               [image_vector, video_vector])
    assert answer2 == expected and "[/INST]" not in answer2
    session.attach("image", image)
    with pytest.raises(ValueError, match="one image, video or audio per user turn"):
        session.attach("video", video)


def test_one_shot_prompt_and_bad_media_path(setup, capsys):
    root, stage1, embeds, model, processor = setup
    image, vector = embeds[2]  # a .safetensors file
    common = [str(stage1), "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS)]
    assert cli(["chat", *common, "--prompt", "What is this?", "--image", str(image), "--no_stream"]) == 0
    expected = expected_answer(model, processor, [user("What is this?", image)], [vector])
    assert capsys.readouterr().out == expected + "\n"
    assert cli(["chat", *common, "--prompt", "What is this?", "--image", str(image), "--stream"]) == 0
    assert capsys.readouterr().out.strip() == expected

    assert cli(["chat", *common, "--prompt", "What is this?", "--image", str(root / "nope.jpg")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: Image file {str(root / 'nope.jpg')!r} does not exist; check the path "
                            f"(relative to {os.getcwd()!r}).\n")
    # An embedding of the wrong size names the file and the expected shape.
    wrong = root / "wrong.pt"
    torch.save(torch.randn(7), wrong)
    assert cli(["chat", *common, "--prompt", "Hi", "--image", str(wrong)]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith("error:") and "wrong.pt" in err_lines[-1] and "[1024]" in err_lines[-1]
    assert sum(line.startswith("error:") for line in err_lines) == 1


def test_batch_file_runs_left_padded_batches_and_records_bad_lines(setup, tmp_path, capsys):
    root, stage1, embeds, model, processor = setup
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    rows = [
        {"id": "a", "prompt": "What is in the image?", "image": str(embeds[0][0])},
        {"id": "bad-image", "prompt": "And this?", "image": str(corrupt)},
        {"id": "b", "prompt": "Hi"},
        {"id": "no-prompt", "image": str(embeds[0][0])},
        {"id": "c", "prompt": "Describe this short clip in a few words.", "video": str(embeds[1][0]),
         "system": "Be brief."},
    ]
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, "{not json")  # line 4
    batch_file = tmp_path / "prompts.jsonl"
    batch_file.write_text("\n".join(lines) + "\n")
    output = tmp_path / "answers.jsonl"
    common = [str(stage1), "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS),
              "--batch_file", str(batch_file), "--batch_size", "2", "--output", str(output)]
    assert cli(["chat", *common]) == 0  # some lines failed, the others were answered
    written = [json.loads(line) for line in output.read_text().splitlines()]
    errors = [row for row in written if "error" in row]
    assert [(row["line"], row["id"]) for row in errors] == [(2, "bad-image"), (4, 4), (5, "no-prompt")]
    assert "corrupt.png" in errors[0]["error"] and "not valid JSON" in errors[1]["error"]
    assert errors[2]["error"] == "needs a JSON object with a string 'prompt'."
    expected = [
        expected_answer(model, processor, [user(rows[0]["prompt"], embeds[0][0])], [embeds[0][1]]),
        expected_answer(model, processor, [user("Hi")], []),
        expected_answer(model, processor, [{"role": "system", "content": "Be brief."},
                                           user(rows[4]["prompt"], embeds[1][0], "video")], [embeds[1][1]]),
    ]
    answers = [row for row in written if "response" in row]
    assert [row["id"] for row in answers] == ["a", "b", "c"]
    assert [row["response"] for row in answers] == expected
    assert "answered 3, failed 3" in capsys.readouterr().err
    # Exit status 1 only when nothing could be answered.
    batch_file.write_text("{not json\n")
    assert cli(["chat", *common]) == 1


def test_raw_image_through_a_standalone_imagebind_folder(setup, tmp_path, capsys):
    from mm_llama.imagebind import load_image
    from mm_llama.testing_utils import tiny_imagebind

    root, stage1, embeds, model, processor = setup
    encoder = tiny_imagebind(image_size=32, seed=0).eval()
    encoder.save_pretrained(tmp_path / "imagebind")
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(image)
    with torch.no_grad():
        vector = encoder.embed_images(load_image(image, 32)[None])[0]
    expected = expected_answer(model, processor, [user("What is in the image?", image)], [vector])
    common = [str(stage1), "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS),
              "--prompt", "What is in the image?", "--image", str(image), "--no_stream"]
    assert cli(["chat", *common, "--imagebind", str(tmp_path / "imagebind")]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # Without an encoder a raw image is a clear error that names the fix.
    assert cli(["chat", *common]) == 1
    assert "--imagebind" in capsys.readouterr().err


def test_load_in_4bit_quantises_the_language_model_only(setup):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from mm_llama.generation import GenerationSettings, MediaEmbedder, build_generation_inputs, generate
    from mm_llama.loading import load_model

    root, stage1, embeds, _, _ = setup
    model, processor = load_model(stage1, device="cpu", dtype="float32", load_in_4bit=True)
    q_proj = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.projector.layers[0], torch.nn.Linear) and not isinstance(
        model.projector.layers[0], bnb.nn.Linear4bit)
    inputs = build_generation_inputs(processor, [[user("What is in the image?", embeds[0][0])]],
                                     MediaEmbedder.for_model(model, processor))
    answer = generate(model, processor, inputs, GenerationSettings(MAX_NEW_TOKENS, temperature=0))
    assert isinstance(answer[0], str) and len(answer) == 1


def test_media_embedder_cache_keeps_the_most_recently_used(setup):
    from mm_llama.generation import MediaEmbedder

    root, stage1, embeds, model, processor = setup
    embedder = MediaEmbedder.for_model(model, processor, cache_size=2)
    first, second, third = ({"type": "image", "path": str(path)} for path, _ in embeds)
    embedder.embed(first), embedder.embed(second), embedder.embed(first), embedder.embed(third)
    assert [path for _, path in embedder._cache] == [first["path"], third["path"]]  # second was the least recent
    torch.testing.assert_close(embedder.embed(second)[0], embeds[1][1])  # evicted items are embedded again
