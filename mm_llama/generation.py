"""Generation: media content parts -> ImageBind embeddings, conversations -> left-padded generation inputs, and
batched or streamed generation. Used by the chat CLI, the evaluation, the pipeline and the web demo.

Media can be given three ways, in any user turn:
  - a precomputed embedding file (`.pt`/`.pth`/`.bin`/`.npy`/`.safetensors`) holding a `[1024]` or `[1, 1024]`
    vector (generally `[tokens_per_media, media_embed_dim]`);
  - a raw image / video file (or a PIL image), embedded by the model's own vision tower, or, for a model trained on
    precomputed embeddings (no tower), by a separate ImageBind model (`imagebind=`); a raw audio file (or the audio
    track of a video file), embedded by an ImageBind audio model from the same `imagebind=` folder (zero-shot: the
    projector never saw audio, it only shares ImageBind's joint embedding space);
  - an already computed tensor in the content part (`{"type": "image", "embeds": tensor}`).
Everything is reduced to `media_embeds` `[total_media, tokens_per_media, media_embed_dim]` in placeholder order, so
the model always runs the same path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import BatchFeature, TextIteratorStreamer

from .imagebind.processing_imagebind import ImageBindProcessor, MediaLoadError, check_media_file
from .loading import imagebind_folder, load_imagebind
from .processing_mm_llama import MMLlamaProcessor, Turn, normalize_conversation

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".npy", ".safetensors")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma")
MEDIA_TYPES = ("image", "video", "audio")


# ---------------------------------------------------------------------------------------------------- media


def infer_media_type(path: str | Path) -> str:
    """ "video" / "audio" for a video / audio file suffix, else "image" (embedding files default to image: the marker
    type only changes the `<<IMG>>` / `<<VID>>` / `<<AUD>>` text around the placeholder)."""
    suffix = Path(path).suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else "image"


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
    path = check_media_file(path, "Embedding")
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
        raise MediaLoadError(f"Embedding file {str(path)!r} could not be read ({err}).") from err
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise MediaLoadError(f"Embedding file {str(path)!r} holds {len(tensors)} tensors; save exactly one embedding.")
        value = tensors[0]
    if not isinstance(value, torch.Tensor):
        raise MediaLoadError(f"Embedding file {str(path)!r} holds a {type(value).__name__}, not a tensor.")
    return check_embedding(value, media_embed_dim, tokens_per_media, where=f"Embedding file {str(path)!r}")


def check_embedding(value: torch.Tensor, media_embed_dim: int, tokens_per_media: int, where: str) -> torch.Tensor:
    """Validates one media embedding; returns float32 `[tokens_per_media, media_embed_dim]`."""
    value = torch.as_tensor(value).detach().float().cpu()
    if value.dim() == 1 and tokens_per_media == 1:
        value = value.unsqueeze(0)
    if value.dim() == 3 and value.shape[0] == 1:  # [1, tokens, dim], as a built dataset row stores one item
        value = value[0]
    if value.dim() != 2 or tuple(value.shape) != (tokens_per_media, media_embed_dim):
        raise MediaLoadError(
            f"{where} has shape {tuple(value.shape)}; this model needs [{media_embed_dim}] or "
            f"[{tokens_per_media}, {media_embed_dim}] (tokens_per_media x media_embed_dim)."
        )
    return value


class MediaEmbedder:
    """Turns media content parts into ImageBind embeddings `[tokens_per_media, media_embed_dim]`.

    Raw images/videos need an encoder (the chat model's own vision tower, or a standalone ImageBind vision model)
    and its image processor; raw audio an ImageBind audio model and its processor. Results are cached by (type,
    path), so a media item in the chat history is embedded once; `cache_size` bounds the cache to the most recently
    used items (a long-running server). Subclasses may override `encode_raw` (e.g. to cache embeddings on disk).
    """

    def __init__(self, media_embed_dim: int, tokens_per_media: int = 1, encoder: torch.nn.Module | None = None,
                 image_processor: ImageBindProcessor | None = None, audio_encoder: torch.nn.Module | None = None,
                 audio_processor: Any | None = None, cache_size: int | None = None):
        for tower in (encoder, audio_encoder):
            if tower is not None and tower.config.projection_dim != media_embed_dim:
                raise ValueError(
                    f"The ImageBind encoder gives {tower.config.projection_dim}-d embeddings but the chat model "
                    f"expects media_embed_dim={media_embed_dim}; use the encoder the model was trained with."
                )
        self.media_embed_dim = media_embed_dim
        self.tokens_per_media = tokens_per_media
        self.encoder = encoder
        self.image_processor = image_processor
        self.audio_encoder = audio_encoder
        self.audio_processor = audio_processor
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, processor: MMLlamaProcessor,
                  imagebind: str | Path | torch.nn.Module | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, cache_size: int | None = None) -> "MediaEmbedder":
        """The embedder for a chat model: its vision tower if it has one, else `imagebind` (an ImageBind vision
        model, or a converted ImageBind folder loaded on `device` in `dtype`), else embedding files only. Raw images
        and videos are preprocessed by the processor's `image_processor`, with the encoder's image size. An
        `imagebind` folder that also holds the audio model (`convert-imagebind --modality all`) embeds raw audio."""
        encoder = getattr(model, "vision_tower", None)
        audio_encoder = audio_processor = None
        if encoder is None and isinstance(imagebind, torch.nn.Module):
            encoder = imagebind.eval()
        elif encoder is None and imagebind is not None and imagebind_folder(imagebind, "vision") is not None:
            encoder = load_imagebind(imagebind, device=device, dtype=dtype)
        if isinstance(imagebind, (str, Path)) and imagebind_folder(imagebind, "audio") is not None:
            from .imagebind import ImageBindAudioProcessor

            audio_encoder = load_imagebind(imagebind, modality="audio", device=device, dtype=dtype)
            audio_processor = ImageBindAudioProcessor.from_pretrained(str(imagebind_folder(imagebind, "audio")))
        if isinstance(imagebind, (str, Path)) and encoder is None and audio_encoder is None:
            load_imagebind(imagebind)  # a folder with neither model: raises the error that says what it lacks
        image_processor = None
        if encoder is not None:
            image_processor = processor.image_processor
            if image_processor.image_size != encoder.config.image_size:
                # The encoder's own input size wins (e.g. a tiny ImageBind trained at 112 px).
                image_processor = ImageBindProcessor(**{**image_processor.to_dict(),
                                                        "image_size": encoder.config.image_size})
        return cls(model.config.media_embed_dim, model.config.tokens_per_media, encoder, image_processor,
                   audio_encoder, audio_processor, cache_size)

    def embed(self, media: dict) -> torch.Tensor:
        """One content part / record media item -> float32 `[tokens_per_media, media_embed_dim]`.

        Accepted keys: "embeds" (a tensor), or a source under "path" / "url" / the type name ("image": a path or
        PIL image; "video" / "audio": a path) that is either an embedding file or a raw media file.
        """
        media_type = media.get("type")
        if media_type not in MEDIA_TYPES:
            raise ValueError(f"Unknown media type {media_type!r}; use 'image', 'video' or 'audio'.")
        if media.get("embeds") is not None:
            return check_embedding(media["embeds"], self.media_embed_dim, self.tokens_per_media,
                                   where=f"The {media_type} embedding")
        source = next((media[key] for key in (media_type, "path", "url") if media.get(key) is not None), None)
        if source is None:
            raise ValueError(f"A {media_type} item needs 'path' (a media or embedding file) or 'embeds': got {media}.")
        key = (media_type, str(source)) if isinstance(source, (str, Path)) else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if isinstance(source, (str, Path)):
            # Checked first, so a mistyped path says so rather than "no encoder" or a decoder error.
            check_media_file(source, media_type.capitalize())
        if isinstance(source, (str, Path)) and is_embedding_file(source):
            embedding = load_embedding_file(source, self.media_embed_dim, self.tokens_per_media)
        else:
            embedding = check_embedding(self.encode_raw(media_type, source), self.media_embed_dim,
                                        self.tokens_per_media, where=f"The {media_type} {source!r}")
        if key is not None:
            self._cache[key] = embedding
            if self.cache_size is not None and len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # the least recently used
        return embedding

    def embed_all(self, media: Sequence[dict]) -> torch.Tensor | None:
        """Media items in placeholder order -> `[len(media), tokens_per_media, media_embed_dim]`, or None if empty."""
        if not media:
            return None
        return torch.stack([self.embed(item) for item in media])

    def encode_raw(self, media_type: str, source: Any) -> torch.Tensor:
        """A raw image (path or PIL image), video or audio (path) -> its ImageBind embedding `[media_embed_dim]`."""
        if media_type == "audio":
            if self.audio_encoder is None:
                raise ValueError(
                    f"{source!r} is raw audio, but no ImageBind audio model was given: pass --imagebind FOLDER "
                    "converted with `mm-llama convert-imagebind --modality all` (or audio), or an embedding file."
                )
            features = self.audio_processor(audio=[source])["input_features"]  # [1, clips, 1, mel, frames]
            parameter = next(self.audio_encoder.parameters())
            with torch.no_grad():
                return self.audio_encoder.embed_media(features.to(device=parameter.device, dtype=parameter.dtype))[0]
        if self.encoder is None:
            raise ValueError(
                f"{source!r} is a raw {media_type}, but this model has no vision tower and no ImageBind model was "
                "given: pass --imagebind FOLDER (an ImageBind vision model folder), or a precomputed embedding file "
                "(.pt/.npy/.safetensors)."
            )
        pixels = self.image_processor(**{f"{media_type}s": [source]})
        parameter = next(self.encoder.parameters())
        pixels = {name: value.to(device=parameter.device, dtype=parameter.dtype) for name, value in pixels.items()}
        with torch.no_grad():
            return self.encoder.embed_media(**pixels)[0]


# ---------------------------------------------------------------------------------------------------- inputs


def user_message(text: str, media: dict | None = None) -> dict:
    """An HF chat user message: text, plus at most one media content part (placed after the text, as rendered)."""
    content: list[dict] = [{"type": "text", "text": text}]
    if media is not None:
        content.append(media)
    return {"role": "user", "content": content}


def prompt_conversation(prompt: str, media: dict | None = None, system: str | None = None) -> list[dict]:
    """A one-question conversation: optional system prompt, then the user prompt with optional media."""
    system_messages = [{"role": "system", "content": system}] if system else []
    return system_messages + [user_message(prompt, media)]


def embedded_prompt_conversation(embedder: MediaEmbedder, prompt: str, media_type: str | None = None,
                                 path: str | Path | None = None, system: str | None = None) -> list[dict]:
    """`prompt_conversation` with its media item (if `media_type`) embedded now, so that a batch job finds an
    unusable file before generating anything. Raises MediaLoadError / ValueError / FileNotFoundError naming it."""
    media = None
    if media_type is not None:
        media = {"type": media_type, "path": path}
        media["embeds"] = embedder.embed(media)
    return prompt_conversation(prompt, media, system)


def build_generation_inputs(processor: MMLlamaProcessor, conversations: Sequence[dict | Sequence[dict]],
                            embedder: MediaEmbedder) -> BatchFeature:
    """Left-padded generation inputs for a batch of conversations that each end with a user turn.

    Returns:
        BatchFeature with input_ids / attention_mask `[batch, seq_len]` and, when there is media, media_embeds
        `[total_media, tokens_per_media, media_embed_dim]` and media_type_ids `[total_media]`.
    """
    normalised: list[list[Turn]] = [normalize_conversation(conversation) for conversation in conversations]
    media = [turn.media for turns in normalised for turn in turns if turn.media is not None]
    return processor(normalised, media_embeds=embedder.embed_all(media), add_generation_prompt=True,
                     padding_side="left")


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


def generate(model: torch.nn.Module, processor: MMLlamaProcessor, inputs: BatchFeature,
             settings: GenerationSettings, streamer: Any | None = None,
             stopping_criteria: Sequence[Any] | None = None) -> list[str]:
    """Runs `model.generate` on prepared inputs; returns each row's new text (special tokens dropped, stripped).

    `stopping_criteria`: extra transformers `StoppingCriteria`; one that returns a `[batch]` bool tensor finishes
    those rows only (a server ends a cancelled request's row this way while the rest of the batch goes on)."""
    model_inputs = inputs.to(next(model.parameters()).device)  # the model casts media to its projector's dtype
    extra: dict[str, Any] = {}
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    with torch.no_grad():
        sequences = model.generate(**model_inputs, **settings.generate_kwargs(processor), streamer=streamer, **extra)
    new_tokens = sequences[:, model_inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_batched(model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
                     conversations: Sequence[Sequence[dict]], settings: GenerationSettings, batch_size: int = 8,
                     on_batch: Callable[[int, list[str]], None] | None = None) -> list[str]:
    """Answers conversations in left-padded batches of `batch_size`; `on_batch(start, answers)` after each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        batch_answers = generate(model, processor, build_generation_inputs(processor, chunk, embedder), settings)
        answers += batch_answers
        if on_batch is not None:
            on_batch(start, batch_answers)
    return answers


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


def stream(model: torch.nn.Module, processor: MMLlamaProcessor, inputs: BatchFeature, settings: GenerationSettings,
           timeout: float | None = None) -> Iterator[str]:
    """Generates for one conversation and yields text pieces as they are decoded (`TextIteratorStreamer`)."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("Streaming works on one conversation at a time; use generate for batches.")
    return stream_in_thread(processor.tokenizer,
                            lambda streamer: generate(model, processor, inputs, settings, streamer=streamer),
                            timeout=timeout)


__all__ = [
    "AUDIO_SUFFIXES",
    "EMBEDDING_SUFFIXES",
    "MEDIA_TYPES",
    "GenerationSettings",
    "MediaEmbedder",
    "VIDEO_SUFFIXES",
    "build_generation_inputs",
    "check_embedding",
    "generate",
    "generate_batched",
    "infer_media_type",
    "is_embedding_file",
    "load_embedding_file",
    "embedded_prompt_conversation",
    "prompt_conversation",
    "stream",
    "stream_in_thread",
    "user_message",
]
