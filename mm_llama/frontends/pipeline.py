"""The "mm-llama-chat" pipeline: chat messages with images/videos in, the assistant's answer out.

Why not transformers' built-in "image-text-to-text" pipeline: it renders chats through
`processor.apply_chat_template(..., continue_final_message=..., processor_kwargs=...)` and passes the processor's
pixel outputs straight to `generate`. MM-LLaMA models are usually trained on precomputed ImageBind embeddings and
have no vision tower, so their media must be embedded by a separate ImageBind model or read from embedding files,
which that pipeline cannot do. This pipeline keeps its message format and output format:

    pipe = pipeline("mm-llama-chat", model="outputs/mm-llama-merged")      # after mm_llama.register_pipeline()
    messages = [{"role": "user", "content": [{"type": "image", "path": "cat.jpg"},
                                             {"type": "text", "text": "What is in the image?"}]}]
    pipe(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"]
    for piece in pipe.stream(messages): print(piece, end="")

Media parts: {"type": "image"|"video", "path": file} where the file is raw media or an embedding file
(.pt/.npy/.safetensors), {"type": "image", "image": PIL.Image}, or {"type": ..., "embeds": tensor [1024]}.
Raw media need the model's vision tower or `imagebind=` (an ImageBindVisionModel or its folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..generation import (
    DecodingOptions,
    MediaEmbedder,
    build_generation_inputs,
    generate_tokens,
    set_decoding_options,
    stream_in_thread,
)

TASK = "mm-llama-chat"


class _Conversation:
    """Carries the input messages through `Pipeline.forward` untouched (it moves tensors in dicts/lists)."""

    def __init__(self, messages: list[dict]):
        self.messages = messages


def _messages_of(inputs: Any) -> list[dict] | dict:
    """Pipeline input -> chat messages: a chat (`Chat` from `Pipeline.__call__` or a list of messages), a record
    with "messages" (+ "media"), or a plain string (one user message)."""
    if isinstance(inputs, str):
        return [{"role": "user", "content": inputs}]
    if hasattr(inputs, "messages"):  # transformers' Chat wrapper
        return list(inputs.messages)
    if isinstance(inputs, dict) and "messages" in inputs:
        return inputs  # a record; normalize_conversation resolves its media list
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
        return list(inputs)
    raise ValueError(
        f"{TASK} takes chat messages ([{{'role': 'user', 'content': [...]}}, ...]), a list of chats, a record with "
        f"'messages', or a string; got {type(inputs).__name__}."
    )


class MMLlamaChatPipeline(Pipeline):
    """Chat generation for `MMLlamaForCausalLM` with image/video content parts (see the module docstring).

    Args (beyond `Pipeline`'s):
        imagebind: an `ImageBindVisionModel` or its folder, used to embed raw media when the model has no vision
            tower.
        decoding: `mm_llama.generation.DecodingOptions` (e.g. `DecodingOptions(compile=True)`), made the model's;
            None keeps the model's own (see docs/generation.md).
    Call arguments: `max_new_tokens`, `return_full_text` (default True: the chat with the answer appended, as
    "image-text-to-text" returns; False: the answer text), `streamer`, `generate_kwargs`, and any generation
    parameter (`do_sample`, `temperature`, `top_p`, ...). Decoding is greedy unless `do_sample=True`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args: Any, imagebind: str | Path | torch.nn.Module | None = None,
                 decoding: DecodingOptions | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if decoding is not None:
            set_decoding_options(self.model, decoding)
        if self.processor is None:
            raise ValueError(f"The {TASK} pipeline needs the MMLlamaProcessor: pass processor=... (or a model folder).")
        self.embedder = MediaEmbedder.for_model(self.model, self.processor, imagebind=imagebind, device=self.device,
                                                dtype=self.model.dtype)
        # LLaMA has no pad token; the processor pads with EOS (never the <unk> media placeholder).
        self._generation_defaults.setdefault("pad_token_id", self.processor.pad_token_id)

    def __call__(self, inputs: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """Answers one chat (returns a list with one result) or a list of chats (a list of such lists)."""
        if (batch_size or self._batch_size or 1) > 1:
            raise ValueError(
                f"The {TASK} pipeline runs one conversation at a time; for left-padded batches use "
                "mm_llama.generation.generate_batched (or mm-llama chat --batch_file)."
            )
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(
        self,
        max_new_tokens: int | None = None,
        generate_kwargs: dict | None = None,
        return_full_text: bool | None = None,
        streamer: Any | None = None,
        **generation_parameters: Any,
    ) -> tuple[dict, dict, dict]:
        forward_kwargs: dict[str, Any] = {}
        generate = {**(generate_kwargs or {}), **generation_parameters}
        if max_new_tokens is not None:
            if "max_new_tokens" in generate:
                raise ValueError("max_new_tokens was given twice (directly and in generate_kwargs); give it once.")
            generate["max_new_tokens"] = max_new_tokens
        if streamer is not None:
            generate["streamer"] = streamer
        if generate:
            forward_kwargs["generate_kwargs"] = generate
        postprocess_kwargs = {} if return_full_text is None else {"return_full_text": return_full_text}
        return {}, forward_kwargs, postprocess_kwargs

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        messages = _messages_of(inputs)
        turns = messages["messages"] if isinstance(messages, dict) else messages
        if turns and turns[-1].get("role") == "assistant":
            raise ValueError(f"{TASK} answers the last user message; this chat ends with an assistant message.")
        model_inputs = build_generation_inputs(self.processor, [messages], self.embedder)
        return {**model_inputs, "conversation": _Conversation(messages)}

    def _forward(self, model_inputs: dict[str, Any], generate_kwargs: dict | None = None) -> dict[str, Any]:
        conversation = model_inputs.pop("conversation")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), return_dict_in_generate=False)
        # The project's one decoding route: it applies the model's DecodingOptions (compiled step, prompt lookup).
        new_tokens = generate_tokens(self.model, self.processor, model_inputs, generate_kwargs)
        return {"new_tokens": new_tokens, "conversation": conversation}

    def postprocess(self, model_outputs: dict[str, Any], return_full_text: bool = True) -> list[dict[str, Any]]:
        conversation = model_outputs["conversation"].messages
        turns = conversation["messages"] if isinstance(conversation, dict) else conversation
        results = []
        for answer in self.processor.batch_decode(model_outputs["new_tokens"], skip_special_tokens=True):
            answer = answer.strip()
            generated = list(turns) + [{"role": "assistant", "content": answer}] if return_full_text else answer
            results.append({"input_text": turns, "generated_text": generated})
        return results

    def stream(self, inputs: Any, **kwargs: Any) -> Iterator[str]:
        """Answers one chat, yielding the answer's text pieces as they are generated (`TextIteratorStreamer`)."""
        return stream_in_thread(self.processor.tokenizer, lambda streamer: self(inputs, streamer=streamer, **kwargs))


def register_pipeline() -> None:
    """Registers the "mm-llama-chat" task with transformers' `pipeline()` (idempotent)."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is MMLlamaChatPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=MMLlamaChatPipeline, pt_model=AutoModelForCausalLM,
                                        type="multimodal")


__all__ = ["MMLlamaChatPipeline", "TASK", "register_pipeline"]
