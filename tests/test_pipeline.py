"""The "mm-llama-chat" pipeline: same answers as `model.generate`, media through embedding files, the model's
vision tower or a standalone ImageBind encoder, streaming, batches of chats, clear errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from mm_llama import MMLlamaProcessor
from mm_llama.frontends.pipeline import TASK, MMLlamaChatPipeline, register_pipeline
from test_merge import MEDIA_DIM, make_model, make_processor, save_stage1

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, spm_model_path):
    return save_stage1(tmp_path_factory.mktemp("pipeline") / "stage1", spm_model_path)


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    paths = []
    for index in range(2):
        path = root / f"image{index}.pt"
        torch.save(torch.randn(MEDIA_DIM, generator=torch.Generator().manual_seed(index)), path)
        paths.append(path)
    return paths


def image_chat(path, question="What is in the image?"):
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]},
    ]


def direct_tokens(model, processor, messages, media_embeds=None) -> list[int]:
    """Greedy answer tokens from calling model.generate directly on the processor's output."""
    inputs = processor(messages, media_embeds=media_embeds, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=processor.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def direct_answer(model, processor, messages, media_embeds=None) -> str:
    tokens = direct_tokens(model, processor, messages, media_embeds)
    return processor.decode(tokens, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def pipe(stage1):
    register_pipeline()
    register_pipeline()  # idempotent
    return pipeline(TASK, model=str(stage1), device="cpu")


def test_pipeline_answer_equals_model_generate(pipe, stage1, embedding_files):
    assert isinstance(pipe, MMLlamaChatPipeline)
    model = AutoModelForCausalLM.from_pretrained(stage1).eval()
    processor = MMLlamaProcessor.from_pretrained(stage1)
    tokens = []
    for path in embedding_files:
        embeds = torch.load(path).view(1, 1, -1)
        expected = direct_answer(model, processor, image_chat(path), embeds)
        result = pipe(image_chat(path), max_new_tokens=MAX_NEW_TOKENS)
        assert len(result) == 1
        assert result[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
        assert result[0]["generated_text"][:-1] == image_chat(path)
        assert expected  # a non-empty answer, so the comparison says something
        tokens.append(direct_tokens(model, processor, image_chat(path), embeds))
    assert tokens[0] != tokens[1]  # the image conditions the answer
    only_text = pipe(image_chat(embedding_files[0]), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert only_text[0]["generated_text"] == processor.decode(tokens[0], skip_special_tokens=True).strip()


def test_streaming_gives_the_same_text(pipe, embedding_files):
    expected = pipe(image_chat(embedding_files[1]), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    pieces = list(pipe.stream(image_chat(embedding_files[1]), max_new_tokens=MAX_NEW_TOKENS))
    assert len(pieces) >= 1
    assert "".join(pieces).strip() == expected[0]["generated_text"]


def test_a_list_of_chats_gives_one_result_per_chat(pipe, embedding_files):
    chats = [image_chat(embedding_files[0]), image_chat(embedding_files[1], "Describe it.")]
    results = pipe(chats, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    singles = [pipe(chat, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0] for chat in chats]
    assert results == [[single] for single in singles]


def _png(path, seed):
    """A 40x48 image: random noise over a flat colour that differs per seed (so embeddings differ clearly)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, 3)[None, None] + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def test_raw_image_through_the_model_vision_tower(spm_model_path, tmp_path):
    from mm_llama.imagebind import ImageBindVisionConfig

    model = make_model(seed=2, vision_config=ImageBindVisionConfig.from_preset("tiny", image_size=32))
    processor = make_processor(spm_model_path, image_size=32)
    messages = image_chat(_png(tmp_path / "a.png", 0))
    # model.generate on the processor's pixel_values: the model runs its vision tower itself.
    expected = direct_answer(model, processor, messages)
    pipe = MMLlamaChatPipeline(model=model, processor=processor, device="cpu")
    assert pipe(messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0]["generated_text"] == expected


def test_raw_image_through_a_standalone_imagebind_encoder(stage1, tmp_path):
    from mm_llama.imagebind import load_image
    from mm_llama.testing_utils import tiny_imagebind

    encoder = tiny_imagebind(image_size=32, seed=0).eval()
    model = AutoModelForCausalLM.from_pretrained(stage1).eval()
    processor = MMLlamaProcessor.from_pretrained(stage1)
    image = _png(tmp_path / "a.png", 3)
    with torch.no_grad():
        embeds = encoder.embed_images(load_image(image, 32)[None])  # [1, 1024]
    expected = direct_answer(model, processor, image_chat(image), embeds[:, None])
    pipe = pipeline(TASK, model=model, processor=processor, device="cpu", imagebind=encoder)
    assert pipe(image_chat(image), max_new_tokens=MAX_NEW_TOKENS)[0]["generated_text"][-1]["content"] == expected
    # PIL images in the content part work too.
    pil_chat = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(image)},
                                             {"type": "text", "text": "What is in the image?"}]}]
    pil_expected = direct_answer(model, processor, pil_chat, embeds[:, None])
    assert pipe(pil_chat, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0]["generated_text"] == pil_expected


def test_clear_errors(pipe, tmp_path, embedding_files):
    from mm_llama.imagebind import MediaLoadError

    with pytest.raises(ValueError, match="--imagebind"):
        pipe(image_chat(_png(tmp_path / "raw.png", 0)))
    with pytest.raises(MediaLoadError, match="missing.pt"):
        pipe(image_chat(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="ends with an assistant message"):
        pipe(image_chat(embedding_files[0]) + [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="one conversation at a time"):
        pipe([image_chat(embedding_files[0])] * 2, batch_size=2)
