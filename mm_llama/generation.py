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

Decoding speed (static KV cache + compiled decoding step, prompt-lookup decoding) is `DecodingOptions`; see
docs/generation.md. (Over 400 lines: media, inputs and the one decoding route every front end shares.)
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import BatchFeature, CompileConfig, TextIteratorStreamer

from .imagebind.processing_imagebind import (
    ImageBindProcessor,
    MediaLoadError,
    check_media_file,
)
from .loading import imagebind_folder, load_imagebind
from .model.processing_mm_llama import MMLlamaProcessor, Turn, normalize_conversation

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".npy", ".safetensors")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma")
MEDIA_TYPES = ("image", "video", "audio")

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_generation_config(cls, generation_config: Any | None, **given: Any) -> "GenerationSettings":
        """The settings a front end uses: each of `given` (max_new_tokens, temperature, top_p: the user's flags) wins,
        then what the checkpoint's `generation_config` (transformers `GenerationConfig`) sets, then these defaults.
        A generation_config with `do_sample: false` means greedy (temperature 0); its `max_length` (the context
        length in LLaMA's) is not an answer length and is not used."""
        unknown = set(given) - {"max_new_tokens", "temperature", "top_p"}
        if unknown:
            raise TypeError(f"from_generation_config got unknown settings {sorted(unknown)}")
        saved: dict[str, Any] = {}
        if generation_config is not None:
            saved = {name: getattr(generation_config, name, None) for name in ("max_new_tokens", "temperature",
                                                                                 "top_p")}
            if getattr(generation_config, "do_sample", None) is False:
                saved["temperature"] = 0.0
        values = {name: value for name, value in saved.items() if value is not None}
        values.update({name: value for name, value in given.items() if value is not None})
        return cls(**values)

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


@dataclass
class DecodingOptions:
    """How `generate` decodes (GenerationSettings say what): the same answers, different speed. Set once per model
    with `set_decoding_options` (the CLI's `--compile` / `--prompt_lookup_num_tokens`), so that every front end
    (chat, pipeline, web demo, server, lmms-eval) that calls `generate` decodes the same way.

    compile: decode with transformers' static KV cache (`cache_implementation="static"`) and a `torch.compile`d
        decoding step (inductor; CUDA graphs on a GPU). The prefill (which merges the media) stays eager. Each new
        (batch size, cache length) compiles once; cache lengths are rounded up to a power of two (at least
        `min_cache_length`) and only ever grow, so a session compiles a handful of times. Ignored, with a warning,
        for bitsandbytes 4-bit models, which torch.compile cannot trace.
    prompt_lookup_num_tokens: prompt-lookup decoding (speculative, no draft model): up to this many tokens copied
        from earlier n-gram matches in the prompt are verified in one forward; pays for long answers that quote the
        prompt (summaries, code edits). Batch 1 only (transformers' assisted decoding); larger batches decode as
        usual. Greedy answers are identical.
    """

    compile: bool = False
    prompt_lookup_num_tokens: int | None = None
    min_cache_length: int = 256  # the smallest static cache (prompt + new tokens), in tokens
    compile_backend: str | Callable = "inductor"


_OPTIONS_ATTRIBUTE = "_mm_llama_decoding"


def set_decoding_options(model: torch.nn.Module, options: DecodingOptions) -> DecodingOptions:
    """Validates `options` and makes them `model`'s (every later `generate` on it uses them); returns them, with
    `compile` turned off (and a warning saying why) where the model cannot be compiled."""
    if options.prompt_lookup_num_tokens is not None and options.prompt_lookup_num_tokens < 1:
        raise ValueError(f"prompt_lookup_num_tokens must be >= 1 (or None to turn it off), "
                         f"got {options.prompt_lookup_num_tokens}.")
    if options.min_cache_length < 1:
        raise ValueError(f"min_cache_length must be >= 1, got {options.min_cache_length}.")
    quantizer = getattr(model, "hf_quantizer", None)
    if options.compile and quantizer is not None and not quantizer.is_compileable:
        logger.warning("--compile is ignored for this quantised model (%s): torch.compile cannot trace its "
                       "quantised layers, so it decodes eagerly (load it without --load_in_4bit to compile).",
                       type(quantizer).__name__)
        options = replace(options, compile=False)
    setattr(model, _OPTIONS_ATTRIBUTE, options)
    return options


def decoding_options(model: torch.nn.Module) -> DecodingOptions:
    """The options `set_decoding_options` gave `model` (defaults: eager decoding)."""
    return getattr(model, _OPTIONS_ATTRIBUTE, None) or DecodingOptions()


def static_cache_length(tokens: int, min_length: int = 256) -> int:
    """The static KV cache length for `tokens` (prompt + new tokens): the next power of two, at least `min_length`,
    so that every compiled shape serves a range of prompt lengths and at most a handful are ever compiled."""
    return max(min_length, 1 << max(tokens - 1, 0).bit_length())


def _compile_config(model: torch.nn.Module, options: DecodingOptions) -> CompileConfig:
    """One `CompileConfig` per model (transformers recompiles when the config changes). Static shapes
    (`dynamic=False`): the cache lengths are bucketed, so each shape compiles once into its fastest code."""
    config = getattr(model, "_mm_llama_compile_config", None)
    if config is None or config.backend != options.compile_backend:
        on_gpu = next(model.parameters()).device.type == "cuda"
        config = CompileConfig(fullgraph=True, dynamic=False, backend=options.compile_backend,
                               mode="reduce-overhead" if on_gpu else None)
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told otherwise
        model._mm_llama_compile_config = config
    return config


def _requested_length(model: torch.nn.Module, prompt_length: int, generate_kwargs: dict[str, Any]) -> int:
    """Prompt + new tokens that `model.generate(**generate_kwargs)` may reach (what the static cache must hold)."""
    config = generate_kwargs.get("generation_config") or model.generation_config
    new_tokens = generate_kwargs.get("max_new_tokens", config.max_new_tokens)
    if new_tokens is None:
        return max(generate_kwargs.get("max_length", config.max_length), prompt_length + 1)
    return prompt_length + new_tokens


def _decoding_kwargs(model: torch.nn.Module, input_ids: torch.Tensor, generate_kwargs: dict[str, Any],
                     options: DecodingOptions) -> dict[str, Any]:
    """`model.generate` keyword arguments that carry out `options` for this batch (`input_ids` `[batch, prompt]`)."""
    batch_size, prompt_length = input_ids.shape
    if options.prompt_lookup_num_tokens is not None and batch_size == 1:
        # Verifying a varying number of drafted tokens per step would recompile a static-shape step: eager.
        return {"prompt_lookup_num_tokens": options.prompt_lookup_num_tokens}
    if not options.compile:
        return {}
    # The cache only grows, so a shorter request after a longer one reuses the compiled longer shape (transformers
    # keeps the longest static cache it made in `_previous_max_cache_length` and never makes a shorter one).
    length = max(static_cache_length(_requested_length(model, prompt_length, generate_kwargs),
                                     options.min_cache_length), getattr(model, "_mm_llama_cache_length", 0),
                 getattr(model, "_previous_max_cache_length", 0))
    model._mm_llama_cache_length = length
    shapes: set = model.__dict__.setdefault("_mm_llama_compiled_shapes", set())
    if (batch_size, length) not in shapes:
        shapes.add((batch_size, length))
        logger.info("Compiling the decoding step for batch size %d, cache length %d (once per shape; this answer "
                    "waits for it).", batch_size, length)
        limit = torch._dynamo.config.recompile_limit
        if len(shapes) > limit:
            logger.warning("More than %d decoding shapes (batch size x cache length) were compiled; further ones "
                           "decode eagerly (torch._dynamo.config.recompile_limit).", limit)
    return {"cache_implementation": "static", "max_cache_len": length,
            "compile_config": _compile_config(model, options)}


def generate(model: torch.nn.Module, processor: MMLlamaProcessor, inputs: BatchFeature,
             settings: GenerationSettings, streamer: Any | None = None,
             stopping_criteria: Sequence[Any] | None = None, decoding: DecodingOptions | None = None) -> list[str]:
    """Runs `model.generate` on prepared inputs; returns each row's new text (special tokens dropped, stripped).

    `stopping_criteria`: extra transformers `StoppingCriteria`; one that returns a `[batch]` bool tensor finishes
    those rows only (a server ends a cancelled request's row this way while the rest of the batch goes on).
    `decoding`: how to decode (`DecodingOptions`); default: the model's (`set_decoding_options`)."""
    new_tokens = generate_tokens(model, processor, inputs, settings, streamer, stopping_criteria, decoding)
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_tokens(model: torch.nn.Module, processor: MMLlamaProcessor, inputs: BatchFeature | dict,
                    settings: GenerationSettings | dict[str, Any], streamer: Any | None = None,
                    stopping_criteria: Sequence[Any] | None = None,
                    decoding: DecodingOptions | None = None) -> torch.Tensor:
    """The one decoding route: `generate` without the decoding to text. `settings` may also be a dict of
    `model.generate` keyword arguments (the pipeline's). Returns the new tokens `[batch, new_tokens]` (rows that
    finished early are padded with the pad token)."""
    # The model casts media to its projector's dtype; the pipeline hands a plain dict.
    model_inputs = BatchFeature(dict(inputs)).to(next(model.parameters()).device)
    if isinstance(settings, GenerationSettings):
        generate_kwargs = settings.generate_kwargs(processor)
    else:
        generate_kwargs = dict(settings)
        streamer = generate_kwargs.pop("streamer", streamer)
    extra = _decoding_kwargs(model, model_inputs["input_ids"], generate_kwargs, decoding or decoding_options(model))
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    with torch.no_grad():
        sequences = model.generate(**model_inputs, **generate_kwargs, streamer=streamer, **extra)
    return sequences[:, model_inputs["input_ids"].shape[1]:]


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
           timeout: float | None = None, decoding: DecodingOptions | None = None) -> Iterator[str]:
    """Generates for one conversation and yields text pieces as they are decoded (`TextIteratorStreamer`)."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("Streaming works on one conversation at a time; use generate for batches.")
    return stream_in_thread(processor.tokenizer,
                            lambda streamer: generate(model, processor, inputs, settings, streamer=streamer,
                                                      decoding=decoding),
                            timeout=timeout)


__all__ = [
    "AUDIO_SUFFIXES",
    "EMBEDDING_SUFFIXES",
    "MEDIA_TYPES",
    "DecodingOptions",
    "GenerationSettings",
    "MediaEmbedder",
    "VIDEO_SUFFIXES",
    "build_generation_inputs",
    "check_embedding",
    "generate",
    "decoding_options",
    "generate_batched",
    "generate_tokens",
    "infer_media_type",
    "is_embedding_file",
    "load_embedding_file",
    "embedded_prompt_conversation",
    "prompt_conversation",
    "set_decoding_options",
    "static_cache_length",
    "stream",
    "stream_in_thread",
    "user_message",
]
