"""Chatting with a model: a multi-turn session with history, the interactive loop of `mm-llama chat`, and batches of
one-shot prompts from a JSONL file. Generation itself lives in `generation.py` (as litgpt keeps chat apart from
generate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable, TextIO

import torch

from ..cli_arguments import ChatArguments

from ..data.sources import iter_jsonl
from ..generation import (
    GenerationSettings,
    MediaEmbedder,
    build_generation_inputs,
    generate,
    embedded_prompt_conversation,
    generate_batched,
    stream,
    user_message,
)
from ..imagebind.processing_imagebind import MediaLoadError
from ..model.processing_mm_llama import MMLlamaProcessor

MEDIA_COMMANDS = ("/image", "/video", "/audio")


class ChatSession:
    """A multi-turn conversation with history, as Meta's `chat_completion` builds it: every turn re-renders the
    whole dialog (system prompt, earlier questions with their media, earlier answers) and generates the next answer.
    Each user turn may carry one image or video; a later turn may bring a new one (the prompt then has each media
    marker in the turn that brought it).

    Media attached with `attach` go with the next user message and are embedded immediately, so a bad path fails
    before the question is asked and never enters the history.
    """

    def __init__(self, model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
                 settings: GenerationSettings | None = None, system: str | None = None):
        self.model = model
        self.processor = processor
        self.embedder = embedder
        self.settings = settings or GenerationSettings()
        self.system = system
        self.history: list[dict] = []
        self.pending_media: dict | None = None

    def reset(self) -> None:
        """Forgets the history and any attached media (the system prompt stays)."""
        self.history, self.pending_media = [], None

    def attach(self, media_type: str, path: str | Path) -> dict:
        """Attaches an image/video/audio (raw file or embedding file) to the next user message; returns the content
        part.

        Raises MediaLoadError / ValueError (naming the file) when it cannot be used; the session is unchanged then.
        """
        if self.pending_media is not None:
            raise ValueError(
                f"A {self.pending_media['type']} is already attached to the next message ({self.pending_media['path']}); "
                "one image, video or audio per user turn. Send a message first, or /reset."
            )
        part = {"type": media_type, "path": str(path)}
        part["embeds"] = self.embedder.embed(part)
        self.pending_media = part
        return part

    def conversation(self, text: str) -> list[dict]:
        """The full conversation for the next turn: system prompt, history and the new user message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [user_message(text, self.pending_media)]

    def respond(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Asks `text` (with the attached media) and returns the answer; streams pieces to `on_text` when given.

        The user message and the answer are added to the history only once generation succeeded.
        """
        conversation = self.conversation(text)
        inputs = build_generation_inputs(self.processor, [conversation], self.embedder)
        if on_text is None:
            answer = generate(self.model, self.processor, inputs, self.settings)[0]
        else:
            pieces = []
            for piece in stream(self.model, self.processor, inputs, self.settings):
                pieces.append(piece)
                on_text(piece)
            answer = "".join(pieces).strip()
        self.history += [conversation[-1], {"role": "assistant", "content": answer}]
        self.pending_media = None
        return answer


INTERACTIVE_HELP = (
    "Commands: /image PATH, /video PATH and /audio PATH attach media (a raw file or an embedding file; /audio also "
    "takes a video's sound track) to your next message; "
    "a later message may bring another one; /reset clears the history; /quit exits. Anything else is your message."
)


def run_interactive(session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO, stream_answers: bool = True,
                    show_prompt: bool = False) -> None:
    """The interactive chat loop over input `lines` (e.g. stdin): answers go to `out` as "Assistant: ...", notices
    and one-line errors to `err`. A failing command or turn (bad media path, ...) is reported and the loop goes on."""
    print(INTERACTIVE_HELP, file=err)
    if show_prompt:
        out.write("User: "), out.flush()
    for line in lines:
        text = line.strip()
        try:
            if not text:
                pass
            elif text in ("/quit", "/exit"):
                return
            elif text == "/reset":
                session.reset()
                print("(history cleared)", file=err)
            elif text == "/help":
                print(INTERACTIVE_HELP, file=err)
            elif text.split(maxsplit=1)[0] in MEDIA_COMMANDS:
                command, _, path = text.partition(" ")
                if not path.strip():
                    raise ValueError(f"{command} needs a file path: {command} PATH")
                part = session.attach(command[1:], path.strip())
                print(f"(attached {part['type']} {part['path']} to your next message)", file=err)
            elif text.startswith("/"):
                raise ValueError(f"unknown command {text.split()[0]!r}. {INTERACTIVE_HELP}")
            else:
                out.write("Assistant: "), out.flush()
                if stream_answers:
                    session.respond(text, on_text=lambda piece: (out.write(piece), out.flush()))
                    out.write("\n")
                else:
                    out.write(session.respond(text) + "\n")
                out.flush()
        except (MediaLoadError, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=err)
            err.flush()
        if show_prompt:
            out.write("User: "), out.flush()


def answer_batch_file(model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
                      batch_file: str | Path, out: TextIO, settings: GenerationSettings, batch_size: int = 8,
                      system: str | None = None) -> tuple[int, int]:
    """Answers the one-shot prompts of a JSONL file (`{"prompt", "image"|"video"|"audio"?, "system"?, "id"?}` per line) in
    left-padded batches, writing one JSON line per input line to `out`: `{"id", "prompt", "response"}`, or
    `{"line", "id", "error"}` for a line that cannot be answered (bad JSON, no prompt, unreadable media), which
    never stops the others. Returns (answered, failed)."""
    batch_file = Path(batch_file)
    if not batch_file.is_file():
        raise FileNotFoundError(f"Batch file {batch_file} does not exist.")
    prepared: list[tuple[int, dict, list[dict]]] = []  # (line, row, conversation with embedded media)
    failed = 0

    def fail(line: int, row_id, message: str) -> None:
        nonlocal failed
        failed += 1
        out.write(json.dumps({"line": line, "id": row_id, "error": message}, ensure_ascii=False) + "\n")

    for line, row, error in iter_jsonl(batch_file):
        row_id = row.get("id", line) if isinstance(row, dict) else line
        try:
            if error is not None:
                raise ValueError(error)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError("needs a JSON object with a string 'prompt'.")
            given = [kind for kind in ("image", "video", "audio") if row.get(kind)]
            if len(given) > 1:
                raise ValueError(f"give one of 'image', 'video' or 'audio', not {' and '.join(given)}.")
            media_type = given[0] if given else None
            path = row[media_type] if media_type else None
            conversation = embedded_prompt_conversation(embedder, row["prompt"], media_type, path,
                                                        row.get("system", system))  # a bad file fails this line only
            prepared.append((line, row, conversation))
        except (MediaLoadError, ValueError, FileNotFoundError) as err:
            fail(line, row_id, str(err))

    def write(start: int, answers: list[str]) -> None:
        for (line, row, _), answer in zip(prepared[start:start + len(answers)], answers):
            out.write(json.dumps({"id": row.get("id", line), "prompt": row["prompt"], "response": answer},
                                 ensure_ascii=False) + "\n")
        out.flush()

    generate_batched(model, processor, embedder, [conversation for _, _, conversation in prepared], settings,
                     batch_size, on_batch=write)
    return len(prepared), failed


def run_chat(model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
             settings: GenerationSettings, options: ChatArguments) -> int:
    """`mm-llama chat` once the model is loaded: a batch file (`options.batch_file`), one prompt (`options.prompt`,
    with its media) or the interactive loop over stdin; returns the exit status."""
    if options.batch_file:
        out = open(options.output, "w", encoding="utf-8") if options.output else sys.stdout
        try:
            answered, failed = answer_batch_file(model, processor, embedder, options.batch_file, out, settings,
                                                 options.batch_size, system=options.system)
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"answered {answered}, failed {failed} (error records name their line)", file=sys.stderr)
        return 0 if answered or not failed else 1
    session = ChatSession(model, processor, embedder, settings, system=options.system)
    if options.prompt is None:
        run_interactive(session, sys.stdin, sys.stdout, sys.stderr, stream_answers=options.stream,
                        show_prompt=sys.stdin.isatty())
        return 0
    if options.media:
        session.attach(*options.media)
    if options.stream:
        session.respond(options.prompt, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        print()
    else:
        print(session.respond(options.prompt))
    return 0


__all__ = ["ChatSession", "INTERACTIVE_HELP", "answer_batch_file", "run_chat", "run_interactive"]
