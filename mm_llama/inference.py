"""Shared inference logic: loading a model for chat, turning media references into ImageBind embeddings, building
generation inputs from conversations, and (streamed) generation. Used by `scripts/chat.py`, `scripts/evaluate.py`
and the chat pipeline.

Media can be given three ways, in any user turn:
  - a precomputed embedding file (`.pt`/`.pth`/`.bin`/`.npy`/`.safetensors`) holding a `[1024]` or `[1, 1024]`
    vector (generally `[tokens_per_media, media_embed_dim]`);
  - a raw image / video file (or a PIL image), embedded by the model's own vision tower, or, for a model trained on
    precomputed embeddings (no tower), by a separate ImageBind model folder (`imagebind_path`);
  - an already computed tensor in the content part (`{"type": "image", "embeds": tensor}`).
Everything is reduced to `media_embeds` `[total_media, tokens_per_media, media_embed_dim]` in placeholder order, so
the model always runs the same path.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, BatchFeature, TextIteratorStreamer

from .processing_mm_llama import MMLlamaProcessor, normalize_conversation
from .dtypes import DTYPES

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".npy", ".safetensors")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
# Modules kept in full precision under 4-bit loading: the projector and vision tower are small and precision
# sensitive, and bitsandbytes' 4-bit layers are meant for the LLM's big linear layers.
FOUR_BIT_SKIP_MODULES = ["projector", "vision_tower", "lm_head"]


def _media_load_error() -> type[ValueError]:
    """`mm_llama.imagebind.MediaLoadError`: one error type for every unusable media input (a ValueError)."""
    from .imagebind import MediaLoadError

    return MediaLoadError


# ---------------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> the first CUDA GPU when there is one, else CPU; otherwise `torch.device(device)`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device} was asked for but CUDA is not available here; use --device cpu.")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name ("float32", "bfloat16", "float16") or dtype -> torch.dtype; `None` -> float32 on CPU (half
    precision matmuls are slow or unsupported there), bfloat16 on GPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------- loading


FULL_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def is_adapter_folder(path: str | Path) -> bool:
    """True for a PEFT adapter folder (stage-2 output): `adapter_config.json` and no full model weights (a config
    copy next to the adapter does not make it a full model)."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not any((path / name).is_file() for name in FULL_WEIGHTS_FILES)


def load_processor(path: str | Path) -> MMLlamaProcessor:
    """Loads the `MMLlamaProcessor` saved next to a model (training saves it in every output folder)."""
    path = Path(path)
    if not (path / "processor_config.json").is_file() and not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"No processor in {path} (no processor_config.json / tokenizer.model). Training saves the processor next "
            "to the model; copy it there with `MMLlamaProcessor.save_pretrained`, or pass the processor folder."
        )
    return AutoProcessor.from_pretrained(str(path))


def load_model_for_chat(
    model_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    base_model: str | Path | None = None,
    processor_path: str | Path | None = None,
) -> tuple[torch.nn.Module, MMLlamaProcessor]:
    """Loads an MM-LLaMA model and its processor for inference.

    Args:
        model_path: a full `MMLlamaForCausalLM` folder (stage-1 output or a merged stage-2 model), or a stage-2 PEFT
            adapter folder (its LoRA is merged on load, except in 4-bit where it stays unmerged).
        device: "cpu", "cuda", "cuda:1", or None/"auto".
        dtype: "float32" / "bfloat16" / "float16" (compute dtype in 4-bit); None picks per device.
        load_in_4bit: quantise the language model's linear layers with bitsandbytes nf4 (double quantisation).
        base_model: for an adapter folder, the stage-1 folder to use instead of the one recorded in it.
        processor_path: folder holding the processor, when it is not saved with the model.
    Returns:
        (model in eval mode on `device`, processor)
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(f"Model folder {model_path} does not exist; pass a trained or merged MM-LLaMA folder.")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    processor = load_processor(processor_path or model_path)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=FOUR_BIT_SKIP_MODULES,
        )
        # Quantised weights are created on their device while loading; they cannot be moved afterwards.
        load_kwargs["device_map"] = {"": device}
    if is_adapter_folder(model_path):
        from .merge import load_stage2_model

        model = load_stage2_model(model_path, base_model=base_model, merge=not load_in_4bit, **load_kwargs)
    else:
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_path} has neither config.json (a full model) nor adapter_config.json (a stage-2 adapter)."
            )
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **load_kwargs)
    if not load_in_4bit:
        model.to(device)
    return model.eval(), processor


# ---------------------------------------------------------------------------------------------------- media


def infer_media_type(path: str | Path) -> str:
    """ "video" for a video file suffix, else "image" (embedding files default to image: the marker type only
    changes the `<<IMG>>` / `<<VID>>` text around the placeholder)."""
    return "video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"


def is_embedding_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in EMBEDDING_SUFFIXES


def load_embedding_file(path: str | Path, media_embed_dim: int, tokens_per_media: int = 1) -> torch.Tensor:
    """Reads a precomputed ImageBind embedding.

    Args:
        path: `.pt`/`.pth`/`.bin` (a tensor, or a dict with one tensor), `.npy`, or `.safetensors` (one tensor).
        media_embed_dim: the model's `config.media_embed_dim` (1024 for ImageBind-huge).
    Returns:
        float32 `[tokens_per_media, media_embed_dim]`; a `[dim]` vector is accepted when tokens_per_media is 1.
    """
    error = _media_load_error()
    path = Path(path)
    if not path.is_file():
        raise error(f"Embedding file {str(path)!r} does not exist; check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            value: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            value = load_file(str(path))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # numpy, safetensors and torch each raise their own types for corrupt files
        raise error(f"Embedding file {str(path)!r} could not be read ({err}).") from err
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise error(f"Embedding file {str(path)!r} holds {len(tensors)} tensors; save exactly one embedding.")
        value = tensors[0]
    if not isinstance(value, torch.Tensor):
        raise error(f"Embedding file {str(path)!r} holds a {type(value).__name__}, not a tensor.")
    return check_embedding(value, media_embed_dim, tokens_per_media, where=f"Embedding file {str(path)!r}")


def check_embedding(value: torch.Tensor, media_embed_dim: int, tokens_per_media: int, where: str) -> torch.Tensor:
    """Validates one media embedding; returns float32 `[tokens_per_media, media_embed_dim]`."""
    value = torch.as_tensor(value).detach().float().cpu()
    if value.dim() == 1 and tokens_per_media == 1:
        value = value.unsqueeze(0)
    if value.dim() == 3 and value.shape[0] == 1:  # [1, tokens, dim], as a built dataset row stores one item
        value = value[0]
    if value.dim() != 2 or tuple(value.shape) != (tokens_per_media, media_embed_dim):
        raise _media_load_error()(
            f"{where} has shape {tuple(value.shape)}; this model needs [{media_embed_dim}] or "
            f"[{tokens_per_media}, {media_embed_dim}] (tokens_per_media x media_embed_dim)."
        )
    return value


class MediaEmbedder:
    """Turns media content parts into ImageBind embeddings `[tokens_per_media, media_embed_dim]`.

    Raw images/videos need an encoder: the chat model's own vision tower, or a standalone `ImageBindVisionModel`.
    Results are cached by (type, path), so a media item in the chat history is embedded once.
    """

    def __init__(
        self,
        media_embed_dim: int,
        tokens_per_media: int = 1,
        encoder: torch.nn.Module | None = None,
        media_processor: Any | None = None,
    ):
        self.media_embed_dim = media_embed_dim
        self.tokens_per_media = tokens_per_media
        self.encoder = encoder
        self.media_processor = media_processor
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        processor: MMLlamaProcessor,
        imagebind: str | Path | torch.nn.Module | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "MediaEmbedder":
        """The embedder for a chat model: its vision tower if it has one, else `imagebind` (an
        `ImageBindVisionModel` or its folder, loaded on `device` in `dtype`), else embedding files only."""
        config = model.config
        encoder, media_processor = getattr(model, "vision_tower", None), None
        if encoder is not None:
            media_processor = processor.media_processor
        elif isinstance(imagebind, torch.nn.Module):
            from .imagebind import ImageBindProcessor

            encoder, media_processor = imagebind.eval(), ImageBindProcessor(image_size=imagebind.config.image_size)
        elif imagebind is not None:
            encoder, media_processor = load_imagebind_encoder(imagebind, device=device, dtype=dtype)
        if encoder is not None and encoder.config.projection_dim != config.media_embed_dim:
            raise ValueError(
                f"The ImageBind encoder gives {encoder.config.projection_dim}-d embeddings but the chat model expects "
                f"media_embed_dim={config.media_embed_dim}; use the encoder the model was trained with."
            )
        return cls(config.media_embed_dim, config.tokens_per_media, encoder, media_processor)

    def embed(self, media: dict) -> torch.Tensor:
        """One content part / record media item -> float32 `[tokens_per_media, media_embed_dim]`.

        Accepted keys: "embeds" (a tensor), or a source under "path" / "url" / the type name ("image": a path or
        PIL image; "video": a path) that is either an embedding file or a raw media file.
        """
        media_type = media.get("type")
        if media_type not in ("image", "video"):
            raise ValueError(f"Unknown media type {media_type!r}; use 'image' or 'video'.")
        if media.get("embeds") is not None:
            return check_embedding(media["embeds"], self.media_embed_dim, self.tokens_per_media,
                                   where=f"The {media_type} embedding")
        source = next((media[key] for key in (media_type, "path", "url") if media.get(key) is not None), None)
        if source is None:
            raise ValueError(f"A {media_type} item needs 'path' (a media or embedding file) or 'embeds': got {media}.")
        key = (media_type, str(source)) if isinstance(source, (str, Path)) else None
        if key is not None and key in self._cache:
            return self._cache[key]
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            # Checked first, so a mistyped path says so rather than "no encoder" or a decoder error.
            raise _media_load_error()(
                f"{media_type.capitalize()} file {str(source)!r} does not exist (or is not a file); check the path."
            )
        if isinstance(source, (str, Path)) and is_embedding_file(source):
            embedding = load_embedding_file(source, self.media_embed_dim, self.tokens_per_media)
        else:
            embedding = self._encode_raw(media_type, source)
        if key is not None:
            self._cache[key] = embedding
        return embedding

    def embed_all(self, media: Sequence[dict]) -> torch.Tensor | None:
        """Media items in placeholder order -> `[len(media), tokens_per_media, media_embed_dim]`, or None if empty."""
        if not media:
            return None
        return torch.stack([self.embed(item) for item in media])

    def _encode_raw(self, media_type: str, source: Any) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError(
                f"{source!r} is a raw {media_type}, but this model has no vision tower and no ImageBind model was "
                "given: pass --imagebind FOLDER (an ImageBindVisionModel folder), or a precomputed embedding file "
                f"({'/'.join(EMBEDDING_SUFFIXES)})."
            )
        if media_type == "image":
            pixels = self.media_processor(images=[source])["pixel_values"]  # [1, 3, S, S]
        else:
            pixels = self.media_processor(videos=[source])["video_pixel_values"]  # [1, views, 3, T, S, S]
        parameter = next(self.encoder.parameters())
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
        with torch.no_grad():
            embeds = self.encoder.embed_images(pixels) if media_type == "image" else self.encoder.embed_videos(pixels)
        return check_embedding(embeds[0], self.media_embed_dim, self.tokens_per_media, where=f"The {media_type} {source!r}")


def load_imagebind_encoder(
    path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.nn.Module, Any]:
    """Loads a standalone `ImageBindVisionModel` folder and its `ImageBindProcessor` (the folder's
    `preprocessor_config.json` when present, else the default preprocessing at the model's image size)."""
    from .imagebind import ImageBindProcessor, ImageBindVisionModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not an ImageBind model folder (no config.json); convert Meta's checkpoint with "
            "scripts/convert_imagebind_checkpoint.py and pass the output folder."
        )
    device = resolve_device(device)
    encoder = ImageBindVisionModel.from_pretrained(str(path), dtype=resolve_dtype(dtype, device)).to(device).eval()
    if (path / "preprocessor_config.json").is_file():
        media_processor = ImageBindProcessor.from_pretrained(str(path))
    else:
        media_processor = ImageBindProcessor(image_size=encoder.config.image_size)
    return encoder, media_processor


def media_of(conversation: dict | Sequence[dict]) -> list[dict]:
    """The media items of one conversation, in placeholder order (validated by the processor's rules)."""
    return [turn.media for turn in normalize_conversation(conversation) if turn.media is not None]


# ---------------------------------------------------------------------------------------------------- inputs


def build_generation_inputs(
    processor: MMLlamaProcessor,
    conversations: Sequence[dict | Sequence[dict]],
    embedder: MediaEmbedder,
) -> BatchFeature:
    """Left-padded generation inputs for a batch of conversations that each end with a user turn.

    Returns:
        BatchFeature with input_ids / attention_mask `[batch, seq_len]` and, when there is media, media_embeds
        `[total_media, tokens_per_media, media_embed_dim]` and media_type_ids `[total_media]`.
    """
    media = [item for conversation in conversations for item in media_of(conversation)]
    return processor(
        list(conversations),
        media_embeds=embedder.embed_all(media),
        add_generation_prompt=True,
        padding_side="left",
    )


# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class GenerationSettings:
    """Sampling settings; `temperature <= 0` means greedy decoding (deterministic)."""

    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9

    def generate_kwargs(self, processor: MMLlamaProcessor) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": processor.tokenizer.eos_token_id,
            "pad_token_id": processor.pad_token_id,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs


def _to_model(inputs: BatchFeature, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Moves the generation inputs to the model's device (the model casts media embeddings to its projector dtype)."""
    device = next(model.parameters()).device
    moved = {}
    for name, value in inputs.items():
        if name == "labels":
            continue
        moved[name] = value.to(device)
    return moved


def generate_texts(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    inputs: BatchFeature,
    settings: GenerationSettings,
    streamer: Any | None = None,
) -> list[str]:
    """Runs `model.generate` on prepared inputs; returns each row's new text (special tokens dropped, stripped)."""
    model_inputs = _to_model(inputs, model)
    with torch.no_grad():
        sequences = model.generate(**model_inputs, **settings.generate_kwargs(processor), streamer=streamer)
    new_tokens = sequences[:, model_inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def stream_in_thread(tokenizer: Any, run: Callable[[TextIteratorStreamer], Any],
                     timeout: float | None = None) -> Iterator[str]:
    """Runs `run(streamer)` (a generation that feeds `streamer`) in a background thread and yields the decoded text
    pieces as they arrive. An exception raised by `run` ends the stream and is re-raised here."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run(streamer)
        except BaseException as err:  # noqa: BLE001  (handed to the consuming thread below)
            failure.append(err)
            streamer.end()  # unblocks the consumer: generate() did not get to end the stream

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]


def stream_texts(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    inputs: BatchFeature,
    settings: GenerationSettings,
    timeout: float | None = None,
) -> Iterator[str]:
    """Generates for one conversation and yields text pieces as they are decoded (`TextIteratorStreamer`)."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("Streaming works on one conversation at a time; use generate_texts for batches.")
    return stream_in_thread(
        processor.tokenizer,
        lambda streamer: generate_texts(model, processor, inputs, settings, streamer=streamer),
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------- chat


def user_message(text: str, media: dict | None = None) -> dict:
    """An HF chat user message: text, plus at most one media content part (placed after the text, as rendered)."""
    content: list[dict] = [{"type": "text", "text": text}]
    if media is not None:
        content.append(media)
    return {"role": "user", "content": content}


class ChatSession:
    """A multi-turn conversation with history, as Meta's `chat_completion` builds it: every turn re-renders the
    whole dialog (system prompt, earlier questions with their media, earlier answers) and generates the next answer.

    Media attached with `attach` go with the next user message and are embedded immediately, so a bad path fails
    before the question is asked and never enters the history.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: MMLlamaProcessor,
        embedder: MediaEmbedder,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ):
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
        """Attaches an image/video (raw file or embedding file) to the next user message; returns the content part.

        Raises MediaLoadError / ValueError (naming the file) when it cannot be used; the session is unchanged then.
        """
        if self.pending_media is not None:
            raise ValueError(
                f"A {self.pending_media['type']} is already attached to the next message ({self.pending_media['path']}); "
                "one image or video per user turn. Send a message first, or /reset."
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
            answer = generate_texts(self.model, self.processor, inputs, self.settings)[0]
        else:
            pieces = []
            for piece in stream_texts(self.model, self.processor, inputs, self.settings):
                pieces.append(piece)
                on_text(piece)
            answer = "".join(pieces).strip()
        self.history += [conversation[-1], {"role": "assistant", "content": answer}]
        self.pending_media = None
        return answer


INTERACTIVE_HELP = (
    "Commands: /image PATH and /video PATH attach media (a raw file or an embedding file) to your next message; "
    "/reset clears the history; /quit exits. Anything else is your message."
)


def run_interactive(
    session: ChatSession,
    lines: Iterable[str],
    out: TextIO,
    err: TextIO,
    stream: bool = True,
    show_prompt: bool = False,
) -> None:
    """The interactive chat loop over input `lines` (e.g. stdin): answers go to `out` as "Assistant: ...", notices
    and one-line errors to `err`. A failing command or turn (bad media path, ...) is reported and the loop goes on."""
    media_error = _media_load_error()
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
            elif text.split(maxsplit=1)[0] in ("/image", "/video"):
                command, _, path = text.partition(" ")
                if not path.strip():
                    raise ValueError(f"{command} needs a file path: {command} PATH")
                part = session.attach(command[1:], path.strip())
                print(f"(attached {part['type']} {part['path']} to your next message)", file=err)
            elif text.startswith("/"):
                raise ValueError(f"unknown command {text.split()[0]!r}. {INTERACTIVE_HELP}")
            else:
                out.write("Assistant: "), out.flush()
                if stream:
                    session.respond(text, on_text=lambda piece: (out.write(piece), out.flush()))
                    out.write("\n")
                else:
                    out.write(session.respond(text) + "\n")
                out.flush()
        except (media_error, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=err)
            err.flush()
        if show_prompt:
            out.write("User: "), out.flush()


# ---------------------------------------------------------------------------------------------------- batches


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: each line must be a JSON object.")
        rows.append(row)
    return rows


def prompt_conversation(prompt: str, media: dict | None = None, system: str | None = None) -> list[dict]:
    """A one-question conversation: optional system prompt, then the user prompt with optional media."""
    system_messages = [{"role": "system", "content": system}] if system else []
    return system_messages + [user_message(prompt, media)]


def generate_batched(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    embedder: MediaEmbedder,
    conversations: Sequence[list[dict]],
    settings: GenerationSettings,
    batch_size: int = 8,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """Answers conversations in left-padded batches of `batch_size`; `on_batch(start, answers)` after each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        batch_answers = generate_texts(model, processor, build_generation_inputs(processor, chunk, embedder), settings)
        answers += batch_answers
        if on_batch is not None:
            on_batch(start, batch_answers)
    return answers


__all__ = [
    "DTYPES",
    "ChatSession",
    "GenerationSettings",
    "MediaEmbedder",
    "build_generation_inputs",
    "check_embedding",
    "generate_batched",
    "generate_texts",
    "infer_media_type",
    "is_adapter_folder",
    "is_embedding_file",
    "load_embedding_file",
    "load_imagebind_encoder",
    "load_model_for_chat",
    "load_processor",
    "media_of",
    "prompt_conversation",
    "read_jsonl",
    "resolve_device",
    "run_interactive",
    "resolve_dtype",
    "stream_in_thread",
    "stream_texts",
    "user_message",
]
