"""`mm-llama serve`: its options (standard library only: `--help` must answer without importing torch) and `run`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from ...cli_arguments import GenerationArguments, ModelLoadingArguments

API_KEY_ENV = "MM_LLAMA_API_KEY"


EPILOG = (
    "An OpenAI-compatible API in one process (the model is loaded once); concurrent requests are decoded\n"
    "together in batches. Needs the serve extra: pip install \"mm-llama[serve]\".\n"
    "  mm-llama serve outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge\n"
    "  mm-llama serve outputs/mm-llama-7b --load_in_4bit --host 0.0.0.0 --api_key $KEY\n"
    "then: OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=KEY).chat.completions.create(...)\n"
    "Media: data: URLs (image_url, video_url) and input_audio; local files only under --allowed_media_dir.\n"
    "Requests without max_tokens / temperature / top_p get the generation options' values."
)


@dataclass
class ServeArguments:
    """The server's own options (the model and generation options are the inference commands' shared ones)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "port to serve on"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model id clients send and /v1/models lists (default: the MODEL folder's name)"})
    log_level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error"),
                                                     "help": "server log level"})
    max_batch_size: int = field(default=8, metadata={"help": "requests decoded together (1: one after another)"})
    batch_window_ms: float = field(default=10.0, metadata={
        "help": "how long a request waits for others to share its batch"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests before new ones get 429 (0: unlimited)"})
    max_body_mb: float = field(default=64.0, metadata={"help": "largest request body (413 above)"})
    max_media_mb: float = field(default=20.0, metadata={"help": "largest media item, decoded (413 above)"})
    context_length: int | None = field(default=None, metadata={
        "help": "prompt + answer tokens (default: the model's max_position_embeddings)"})

    def __post_init__(self) -> None:
        rules = [(self.max_batch_size >= 1, "--max_batch_size must be >= 1"),
                 (self.batch_window_ms >= 0, "--batch_window_ms must be >= 0"),
                 (self.max_queue >= 0, "--max_queue must be >= 0"),
                 (self.max_body_mb > 0 and self.max_media_mb > 0, "--max_body_mb and --max_media_mb must be > 0"),
                 (self.context_length is None or self.context_length > 1, "--context_length must be > 1")]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve options that are not fields: the MODEL folder and the repeatable --allowed_media_dir."""
    parser.add_argument("model", help="MM-LLaMA model folder: merged, stage-1, or stage-2 adapter")
    parser.add_argument("--allowed_media_dir", action="append", default=[], metavar="FOLDER",
                        help="let requests name local files under FOLDER (file:// URL or absolute path; repeatable; "
                             "default: none, only data: URLs)")


def _check(serve: ServeArguments, generation: GenerationArguments, allowed_media_dir: list[str]) -> None:
    from ...cli_shared import CommandError

    if generation.temperature is not None and generation.temperature > 2:  # OpenAI's range
        raise CommandError("--temperature must be between 0 and 2", 2)
    for folder in allowed_media_dir:
        if not os.path.isdir(folder):
            raise CommandError(f"--allowed_media_dir {folder!r} is not a folder", 2)


def run(model: str, loading: ModelLoadingArguments, generation: GenerationArguments, serve: ServeArguments,
        allowed_media_dir: list[str]) -> int:
    """Loads the MODEL folder once and serves until SIGINT / SIGTERM (running requests are finished first)."""
    import importlib.util
    import logging
    from pathlib import Path

    from ...cli_shared import CommandError, check_port_available, generation_settings, load_for_inference

    model_path = model  # the name `model` is the loaded model below
    _check(serve, generation, allowed_media_dir)
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # before minutes of model loading
        raise CommandError(f"{' and '.join(missing)} not installed; the server needs them: "
                           'pip install "mm-llama[serve]"')
    check_port_available(serve.host, serve.port)
    logging.basicConfig(level=serve.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import ServerConfig, create_app
    from .engine import BatchingEngine
    from .media import MediaResolver

    # A long-running server keeps the embeddings of the 4096 most recently used media, not of every one.
    model, processor, embedder = load_for_inference(model_path, loading, generation, cache_size=4096)
    text_config = getattr(model.config, "text_config", model.config)
    config = ServerConfig(
        model_name=serve.served_model_name or Path(model_path).resolve().name,
        context_length=serve.context_length or text_config.max_position_embeddings,
        defaults=generation_settings(model, generation),
        api_key=serve.api_key or os.environ.get(API_KEY_ENV) or None, max_body_bytes=int(serve.max_body_mb * 2**20))
    engine = BatchingEngine(model, processor, embedder, serve.max_batch_size, serve.batch_window_ms / 1000,
                            serve.max_queue or None)
    resolver = MediaResolver(embedder, allowed_media_dir, int(serve.max_media_mb * 2**20))
    app = create_app(engine, resolver, config)
    logging.getLogger("mm_llama.frontends.serving").info(
        "serving %r on http://%s:%d/v1 (max_batch_size %d, api key %s)", config.model_name, serve.host, serve.port,
        serve.max_batch_size, "required" if config.api_key else "off")
    # access_log off: the app logs one line per request itself, with its tokens and latency.
    uvicorn.run(app, host=serve.host, port=serve.port, log_level=serve.log_level, access_log=False)
    return 0


__all__ = ["EPILOG", "ServeArguments", "add_arguments", "run"]
