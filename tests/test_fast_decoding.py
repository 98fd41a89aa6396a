"""Fast decoding (`mm_llama.generation.DecodingOptions`): the static-cache + compiled decoding step and prompt-lookup
decoding give the same greedy tokens as eager decoding (media, left padding, rows that finish early, streaming), the
compiled shapes stay bounded, the pipeline and the CLI loader take the one route, and 4-bit models decode eagerly
with a clear warning.

One test compiles with inductor (the real thing; ~30-45 s with a cold inductor cache on 2 cores, ~5 s once
/tmp/torchinductor_* holds its kernels); the others count graphs with dynamo's CompileCounter backend, which captures
the same full graph of the decoding step and runs it without code generation.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_merge import MEDIA_DIM, make_model, make_processor, save_stage1

from mm_llama.generation import (
    DecodingOptions,
    GenerationSettings,
    MediaEmbedder,
    build_generation_inputs,
    decoding_options,
    generate,
    generate_tokens,
    prompt_conversation,
    set_decoding_options,
    static_cache_length,
    stream,
)

GREEDY = GenerationSettings(24, temperature=0)


@pytest.fixture(scope="module")
def setup(spm_model_path):
    model, processor = make_model(), make_processor(spm_model_path)
    return model, processor, MediaEmbedder.for_model(model, processor)


def image(seed: int) -> dict:
    return {"type": "image", "embeds": torch.randn(MEDIA_DIM, generator=torch.Generator().manual_seed(seed))}


def chats() -> list[list[dict]]:
    """Two prompts of different lengths (left padding), the first with an image."""
    return [prompt_conversation("What is in the image? Describe it.", image(0)), prompt_conversation("Hello there")]


def fresh(model: torch.nn.Module) -> torch.nn.Module:
    """Forgets the compiled shapes and cache length a previous test left on the shared model."""
    for name in ("_mm_llama_cache_length", "_mm_llama_compiled_shapes", "_mm_llama_compile_config", "_compiled_call",
                 "_previous_max_cache_length"):
        model.__dict__.pop(name, None)
    return model


class CompileCounter:
    """A torch.compile backend that counts the graphs dynamo captures and runs them uncompiled. (Not dynamo's own
    `CompileCounter`: transformers deep-copies the backend, and a function is the one callable it copies by
    reference.)"""

    def __init__(self):
        graphs: list = []
        self.graphs = graphs

        def backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        self.backend = backend

    @property
    def frame_count(self) -> int:
        return len(self.graphs)


def test_static_cache_length_is_a_power_of_two_bucket():
    assert [static_cache_length(n) for n in (1, 200, 256, 257, 600, 4096)] == [256, 256, 256, 512, 1024, 4096]
    assert static_cache_length(70, min_length=64) == 128
    assert static_cache_length(64, min_length=16) == 64


@pytest.mark.slow  # cold inductor cache: ~30 s (idle 2 cores) to 75 s (busy); ~5 s warm
def test_inductor_compiled_decoding_streams_the_eager_tokens(setup, caplog):
    """The acceptance check: inductor-compiled decoding step, greedy, with an image, streamed."""
    model, processor, embedder = setup
    inputs = build_generation_inputs(processor, chats()[:1], embedder)
    eager = generate_tokens(fresh(model), processor, inputs, GREEDY)
    compiled_options = DecodingOptions(compile=True)
    with caplog.at_level(logging.INFO, logger="mm_llama.generation"):
        compiled = generate_tokens(model, processor, inputs, GREEDY, decoding=compiled_options)
        streamed = "".join(stream(model, processor, inputs, GREEDY, decoding=compiled_options))
    assert compiled.tolist() == eager.tolist()
    assert streamed.strip() == processor.decode(eager[0], skip_special_tokens=True).strip()
    # Logged once for the one shape, although the stream ran a second generation.
    assert [record.getMessage() for record in caplog.records].count(
        "Compiling the decoding step for batch size 1, cache length 256 (once per shape; this answer waits for it)."
    ) == 1


def test_compiled_batch_with_early_finishing_rows_matches_eager(setup):
    model, processor, embedder = setup
    inputs = build_generation_inputs(processor, chats(), embedder)
    eager = generate_tokens(fresh(model), processor, inputs, GREEDY)
    # Make a token that row 0 emits early (and row 1 does not emit before) the end of sequence: row 0 then finishes
    # early and is padded while row 1 goes on.
    stop = next(token for token in eager[0, 2:8].tolist() if token not in eager[1, :10].tolist())
    settings = {**GREEDY.generate_kwargs(processor), "eos_token_id": stop}
    eager = generate_tokens(model, processor, inputs, settings)
    counter = CompileCounter()
    compiled = generate_tokens(model, processor, inputs, settings,
                               decoding=DecodingOptions(compile=True, compile_backend=counter.backend))
    assert compiled.tolist() == eager.tolist()
    assert (compiled[0] == processor.pad_token_id).sum() > 0 and (compiled[1] != processor.pad_token_id).all()
    assert counter.frame_count == 1  # the whole decoding step is one graph: no graph break


def test_compiled_shapes_stay_bounded(setup):
    """Prompts of other lengths in the same cache bucket reuse the compiled step; a longer request grows the cache
    once, and shorter ones after it keep the longer cache; a new batch size compiles once more."""
    model, processor, embedder = setup
    counter = CompileCounter()
    options = DecodingOptions(compile=True, compile_backend=counter.backend, min_cache_length=128)
    short = GenerationSettings(8, temperature=0)
    fresh(model)
    for question in ("Hi", "What is shown in this image? A red circle on a blue background."):  # 19, 79 tokens
        inputs = build_generation_inputs(processor, [prompt_conversation(question)], embedder)
        assert generate(model, processor, inputs, short, decoding=options) == generate(model, processor, inputs, short)
    assert counter.frame_count == 1 and model._mm_llama_cache_length == 128
    hi = build_generation_inputs(processor, [prompt_conversation("Hi")], embedder)
    generate(model, processor, hi, GenerationSettings(150, temperature=0), decoding=options)
    assert counter.frame_count == 2 and model._mm_llama_cache_length == 256
    generate(model, processor, hi, short, decoding=options)
    assert counter.frame_count == 2 and model._mm_llama_cache_length == 256
    generate(model, processor, build_generation_inputs(processor, chats(), embedder), short, decoding=options)
    assert counter.frame_count == 3
    assert model._mm_llama_compiled_shapes == {(1, 128), (1, 256), (2, 256)}


def test_prompt_lookup_decoding_gives_the_greedy_answer(setup):
    model, processor, embedder = setup
    quoting = prompt_conversation("Repeat: the quick brown fox jumps over the lazy dog, the quick brown fox.", image(1))
    settings = GenerationSettings(40, temperature=0)
    for conversations in ([quoting], [quoting, chats()[1]]):  # batch 2 falls back to plain decoding
        inputs = build_generation_inputs(processor, conversations, embedder)
        eager = generate_tokens(fresh(model), processor, inputs, settings)
        looked_up = generate_tokens(model, processor, inputs, settings,
                                    decoding=DecodingOptions(prompt_lookup_num_tokens=4))
        assert looked_up.tolist() == eager.tolist()


def test_model_options_reach_the_pipeline(setup, tmp_path, spm_model_path):
    from transformers import pipeline

    from mm_llama.frontends.pipeline import TASK, register_pipeline

    register_pipeline()
    folder = save_stage1(tmp_path / "stage1", spm_model_path)
    counter = CompileCounter()
    pipe = pipeline(TASK, model=str(folder), device="cpu",
                    decoding=DecodingOptions(compile=True, compile_backend=counter.backend))
    messages = [{"role": "user", "content": "Hello there"}]
    compiled = pipe(messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    set_decoding_options(pipe.model, DecodingOptions())
    assert pipe(messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"] == compiled
    assert counter.frame_count == 1  # the pipeline decoded through the compiled route


def test_decoding_options_are_validated(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be >= 1"):
        set_decoding_options(model, DecodingOptions(prompt_lookup_num_tokens=0))
    with pytest.raises(ValueError, match="min_cache_length must be >= 1"):
        set_decoding_options(model, DecodingOptions(min_cache_length=0))
    assert decoding_options(model) == DecodingOptions()


def test_cli_flags_set_the_models_decoding_options(tmp_path, spm_model_path):
    from mm_llama.cli import parse_command
    from mm_llama.cli_shared import CommandError, load_for_inference

    folder = save_stage1(tmp_path / "stage1", spm_model_path)

    def load(*flags: str, with_media: bool = True):
        args = parse_command("chat", [str(folder), "--device", "cpu", *flags])
        return load_for_inference(args["model"], args["loading"], args["generation"], with_media=with_media)

    model, _, embedder = load("--compile", "--prompt_lookup_num_tokens", "3", with_media=False)
    assert decoding_options(model) == DecodingOptions(compile=True, prompt_lookup_num_tokens=3) and embedder is None
    model, _, _ = load()
    assert decoding_options(model) == DecodingOptions()
    with pytest.raises(CommandError, match="--prompt_lookup_num_tokens must be >= 1"):
        parse_command("chat", [str(folder), "--prompt_lookup_num_tokens", "0"])


def test_4bit_model_decodes_eagerly_with_a_warning(tmp_path, spm_model_path, caplog):
    pytest.importorskip("bitsandbytes")
    from mm_llama.loading import load_model

    folder = save_stage1(tmp_path / "stage1", spm_model_path)
    model, processor = load_model(folder, device="cpu", dtype="float32", load_in_4bit=True)
    inputs = build_generation_inputs(processor, chats(), MediaEmbedder.for_model(model, processor))
    eager = generate(model, processor, inputs, GREEDY)
    with caplog.at_level(logging.WARNING, logger="mm_llama.generation"):
        options = set_decoding_options(model, DecodingOptions(compile=True))
    assert not options.compile and not decoding_options(model).compile
    assert "--compile is ignored for this quantised model" in caplog.text
    assert generate(model, processor, inputs, GREEDY) == eager
