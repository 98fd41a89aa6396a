"""The browser chat demo (`mm-llama web`): one process, one model, a Gradio `ChatInterface` in multimodal mode.

Design (what the peers' demos got wrong, and what this one does instead):
  - One process: the model is loaded once and every request goes through Gradio's queue, which runs at most
    `concurrency_limit` generations at a time (default 1, one GPU) and shows the others their queue position.
  - No shared conversation state: each request rebuilds its conversation from the history Gradio keeps per browser
    session (or per API client), so concurrent users never see or corrupt each other's turns. The only object shared
    between requests is the `MediaEmbedder` cache, keyed by the uploaded file's path, which Gradio derives from the
    file's SHA-256 (same path, same bytes, same embedding).
  - Bad input never breaks the page: a file that is not media, a corrupt or empty file, an over-long prompt,
    too many media or out-of-range settings are answered in the chat by an error message (an assistant message with
    a `metadata` title, which Gradio shows as a titled box). The turn it answers is left out of later prompts, so
    the next message works.

Conversation semantics are `mm_llama.frontends.chat.ChatSession`'s: one image, video or audio file per user turn (audio is
zero-shot, through an --imagebind folder that holds the audio model), each media marker in the turn that brought it,
earlier answers in the prompt. This module imports gradio only in `build_app`, so the chat logic (`WebChat`) is usable
and testable without it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..generation import (
    AUDIO_SUFFIXES,
    VIDEO_SUFFIXES,
    GenerationSettings,
    MediaEmbedder,
    build_generation_inputs,
    generate,
    infer_media_type,
    stream_in_thread,
    user_message,
)
from ..imagebind.processing_imagebind import MediaLoadError
from ..model.processing_mm_llama import MMLlamaProcessor

logger = logging.getLogger(__name__)

ERROR_TITLE = "Not answered"  # the metadata title that marks an error reply (never produced by the model)
MAX_NEW_TOKENS_LIMIT = 4096
INSTALL_HINT = 'The web demo needs Gradio: pip install "mm-llama[web]"'


def image_suffixes() -> tuple[str, ...]:
    """File suffixes of the image formats PIL can open here (what `load_image` decodes), sorted."""
    import PIL.Image

    return tuple(sorted(suffix for suffix, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN))


class GenerationCancelled(Exception):
    """Raised inside `model.generate` when the request that started it went away (stop button, closed tab)."""


class _CancellableStreamer:
    """Forwards tokens to a streamer until `cancelled` is set, then stops `model.generate` at its next token, so that a
    stopped request frees the GPU for the next one in the queue."""

    def __init__(self, streamer: Any, cancelled: threading.Event):
        self.streamer, self.cancelled = streamer, cancelled

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise GenerationCancelled()
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


class UserInputError(ValueError):
    """A request the user can fix; its message is shown in the chat."""


def error_message(text: str) -> dict:
    """The chat reply for a request that could not be answered (shown as a titled box, left out of later prompts)."""
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}


def is_error_message(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def _parts(content: Any) -> tuple[str, list[str]]:
    """Text and file paths of a Gradio message content, in any of the shapes Gradio 6 passes history in: a string, a
    file dict (`{"path": ...}`, as the API's history holds it), a content part (`{"type": "text"|"file", ...}`, as the
    browser's history holds it), or a list of those."""
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        content = [content]
    texts, files = [], []
    for part in content if isinstance(content, (list, tuple)) else []:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(part.get("text") or "")
        elif isinstance(part, dict) and isinstance(part.get("file"), dict) and part["file"].get("path"):
            files.append(part["file"]["path"])
        elif isinstance(part, dict) and part.get("path"):
            files.append(part["path"])
        # Anything else (a Gradio component) is not something this app puts into a conversation: ignored.
    return " ".join(text.strip() for text in texts if text.strip()), files


def answered_turns(history: Sequence[dict]) -> list[tuple[str, list[str], str]]:
    """The (user text, user files, answer) of each answered turn of a Gradio chat history.

    A user message whose reply is an error message, or that has no reply (generation failed or was stopped before the
    first token), is left out: it was never part of the conversation the model saw.
    """
    turns, pending = [], None
    for message in history:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            pending = _parts(message.get("content"))
        elif role == "assistant" and pending is not None:
            if not is_error_message(message):
                turns.append((*pending, _parts(message.get("content"))[0]))
            pending = None
    return turns


class WebChat:
    """The chat logic behind the web page: builds each request's conversation from its own history and streams the
    answer. Holds only read-only things (model, processor, embedder, limits); see the module docstring.

    Args:
        embedder: turns uploaded files into ImageBind embeddings (the model's tower or a standalone ImageBind).
        max_media: media files allowed in one conversation (the original MM-LLaMA's demo: 1).
        context_length: prompt + answer tokens the model can attend to (default: its max_position_embeddings).
    """

    def __init__(self, model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
                 max_media: int = 1, context_length: int | None = None):
        if max_media < 0:
            raise ValueError(f"max_media must be >= 0, got {max_media}.")
        self.model, self.processor, self.embedder, self.max_media = model, processor, embedder, max_media
        text_config = getattr(model.config, "text_config", model.config)
        self.context_length = context_length or text_config.max_position_embeddings
        self.image_suffixes = image_suffixes()
        # One embedding at a time: the embedder's cache is not thread-safe (with --concurrency > 1).
        self._embedding = threading.Lock()

    # -------------------------------------------------------------------------------------------------- requests

    def media_type(self, path: str) -> str:
        """"image", "video" or "audio" from an uploaded file's suffix (`infer_media_type`); UserInputError naming
        the file otherwise. Audio is zero-shot: it needs an --imagebind folder holding the audio model too."""
        kind = infer_media_type(path)
        # infer_media_type calls every other suffix an image (an embedding file's marker type); an upload is decoded,
        # so only the image formats PIL opens are accepted.
        if kind != "image" or Path(path).suffix.lower() in self.image_suffixes:
            return kind
        raise UserInputError(f"{Path(path).name!r} is not an image, a video or an audio file. Attach an image (.png, "
                             f".jpg, .webp, ...), a video ({', '.join(VIDEO_SUFFIXES[:3])}, ...) or audio "
                             f"({', '.join(AUDIO_SUFFIXES[:3])}, ...).")

    def media_part(self, path: str) -> dict:
        """An uploaded file -> an embedded content part {"type", "path", "embeds"}; UserInputError naming the file
        (not the server's cache path) when it is not a readable image, video or audio file."""
        name = Path(path).name
        part = {"type": self.media_type(path), "path": str(path)}
        try:
            with self._embedding:
                part["embeds"] = self.embedder.embed(part)
        except (MediaLoadError, ValueError, OSError) as error:
            raise UserInputError(str(error).replace(str(path), name)) from error
        return part

    def conversation(self, text: str, files: Sequence[str], history: Sequence[dict],
                     system_prompt: str | None) -> list[dict]:
        """The conversation of one request: system prompt, the answered turns of `history` (media re-embedded from
        the cache), then the new message. Raises UserInputError for what the user must change."""
        if len(files) > 1:
            raise UserInputError(f"{len(files)} files in one message; attach one image, video or audio file per "
                                 "message.")
        if not text.strip() and not files:
            raise UserInputError("The message is empty; type a question.")
        if files:
            self.media_type(files[0])  # a wrong kind of file is the first thing to say
        turns = answered_turns(history)
        used = sum(len(turn_files) for _, turn_files, _ in turns)
        if files and not self.max_media:
            raise UserInputError("This demo answers text only (it was started with --max_media 0).")
        if files and used >= self.max_media:
            raise UserInputError(
                f"This conversation already has {used} media file(s); this demo takes at most {self.max_media} per "
                "conversation. Click \"New conversation\" to ask about another file."
            )
        messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for turn_text, turn_files, answer in turns:
            media = self.media_part(turn_files[0]) if turn_files else None
            messages += [user_message(turn_text, media), {"role": "assistant", "content": answer}]
        return messages + [user_message(text.strip(), self.media_part(files[0]) if files else None)]

    def settings(self, temperature: Any, top_p: Any, max_new_tokens: Any) -> GenerationSettings:
        """The request's sampling settings (API clients can send anything); UserInputError when out of range."""
        def number(value: Any, name: str, low: float, high: float, rule: str) -> float:
            try:
                result = float(value)
            except (TypeError, ValueError):
                result = float("nan")  # fails the range check below
            if not low <= result <= high or (name == "top_p" and result == 0):
                raise UserInputError(f"{name} must be {rule}, got {value!r}.")
            return result

        return GenerationSettings(
            int(number(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT,
                       f"between 1 and {MAX_NEW_TOKENS_LIMIT}")),
            number(temperature, "temperature", 0, 5, "between 0 (greedy) and 5"),
            number(top_p, "top_p", 0, 1, "in (0, 1]"),
        )

    def respond(self, message: dict | str, history: Sequence[dict], system_prompt: str | None = None,
                temperature: float = GenerationSettings.temperature, top_p: float = GenerationSettings.top_p,
                max_new_tokens: float = GenerationSettings.max_new_tokens) -> Iterator[str | dict]:
        """The `ChatInterface` function: yields the answer so far as it is generated, or one error message.

        Args:
            message: the MultimodalTextbox value {"text": str, "files": [path]} (or a plain string).
            history: this session's Gradio chat history (messages with "role" and "content").
        """
        text, files = (message, []) if isinstance(message, str) else (
            message.get("text") or "", [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []])
        try:
            settings = self.settings(temperature, top_p, max_new_tokens)
            conversation = self.conversation(text, files, history, (system_prompt or "").strip() or None)
            inputs = build_generation_inputs(self.processor, [conversation], self.embedder)
            prompt_tokens = inputs["input_ids"].shape[1]
            if prompt_tokens >= self.context_length:
                raise UserInputError(
                    f"The prompt is {prompt_tokens} tokens (system prompt, earlier turns and your message); the model "
                    f"reads at most {self.context_length}. Shorten the message or click \"New conversation\"."
                )
            # The answer gets what the context has left, up to the requested length.
            settings.max_new_tokens = min(settings.max_new_tokens, self.context_length - prompt_tokens)
        except UserInputError as error:
            yield error_message(str(error))
            return
        except Exception as error:  # noqa: BLE001  (e.g. out of GPU memory in the encoder: logged, the page goes on)
            logger.exception("preparing a request failed")
            yield error_message(f"This request could not be prepared ({type(error).__name__}: {error}).")
            return
        yield from self._stream(inputs, settings)

    def _stream(self, inputs: Any, settings: GenerationSettings) -> Iterator[str | dict]:
        cancelled = threading.Event()

        def run(streamer: Any) -> None:
            generate(self.model, self.processor, inputs, settings, streamer=_CancellableStreamer(streamer, cancelled))

        answer = ""
        try:
            for piece in stream_in_thread(self.processor.tokenizer, run):
                answer += piece
                yield answer.strip()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            yield error_message("The GPU ran out of memory for this request; lower max new tokens or start a new "
                                "conversation.")
            return
        except Exception as error:  # noqa: BLE001  (a bug or a broken model: logged, and the page goes on)
            logger.exception("generation failed")
            yield error_message(f"Generation failed ({type(error).__name__}: {error}); see the server log.")
            return
        finally:
            cancelled.set()  # a closed request (stop button, closed tab) ends its generation at the next token
        if not answer.strip():
            yield error_message("The model ended its answer without any text; ask again or rephrase.")


# ---------------------------------------------------------------------------------------------------- the app


def build_app(chat: WebChat, *, title: str = "MM-LLaMA", system_prompt: str = "",
              defaults: GenerationSettings | None = None, concurrency_limit: int = 1, max_queue: int | None = None):
    """The Gradio Blocks app around `chat.respond`, queued with at most `concurrency_limit` generations at a time
    (and at most `max_queue` waiting requests, unlimited when None). Imports gradio."""
    # No telemetry or version-check calls: off for our Blocks below, and for any Gradio creates on its own.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    defaults = defaults or GenerationSettings()
    media_rule = (f"Attach one image or video (or audio file) per message with the paperclip button, up to "
                  f"{chat.max_media} per conversation."
                  if chat.max_media else "Text only.")
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        settings = [  # rendered by ChatInterface, in its Settings accordion
            gr.Textbox(system_prompt, label="System prompt", lines=2, placeholder="(none)", render=False),
            gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)",
                      render=False),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", render=False),
            gr.Slider(1, min(MAX_NEW_TOKENS_LIMIT, chat.context_length), value=defaults.max_new_tokens, step=1,
                      label="Max new tokens", render=False),
        ]
        interface = gr.ChatInterface(
            chat.respond,
            multimodal=True,
            # No "share to Hugging Face" button (it needs the Hub) and no download links to the server's file cache.
            chatbot=gr.Chatbot(show_label=False, elem_id="mm-llama-chat", height=560, buttons=["copy", "copy_all"],
                               allow_file_downloads=False),
            textbox=gr.MultimodalTextbox(
                file_count="single", sources=["upload"], elem_id="mm-llama-input", autofocus=True,
                placeholder="Ask a question; attach an image or a video with the paperclip", stop_btn=True,
                max_plain_text_length=100_000),  # long pastes stay text (Gradio would turn them into a .txt file)
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            title=title,
            description=f"{media_rule} Answers are streamed; requests are answered {concurrency_limit} at a time, "
                        "others wait with their place in the queue shown.",
            concurrency_limit=concurrency_limit,
            api_name="chat",
            analytics_enabled=False,
            fill_height=False,
        )
        new = gr.Button("New conversation", elem_id="mm-llama-new", variant="secondary")
        # Clears this session's history (the chatbot and the state ChatInterface feeds to the function) and input.
        new.click(lambda: ([], [], None), None, [interface.chatbot, interface.chatbot_state, interface.textbox],
                  queue=False, api_visibility="undocumented")
    return app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any) -> Any:
    """Serves `app` (blocking unless `prevent_thread_lock=True` is passed); no share link unless asked."""
    return app.launch(server_name=host, server_port=port, share=share, show_error=True, **kwargs)


__all__ = ["ERROR_TITLE", "WebChat", "answered_turns", "build_app", "error_message",
           "image_suffixes", "is_error_message", "launch"]
