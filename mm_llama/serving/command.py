"""`mm-llama serve`: arguments (argparse only: `--help` must answer without importing torch) and `run`."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "MM_LLAMA_API_KEY"


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the serve options (and the model options every inference command shares) to `parser`."""
    from ..cli_shared import model_arguments  # argparse only

    parser.epilog = (
        "An OpenAI-compatible API in one process (the model is loaded once); concurrent requests are decoded\n"
        "together in batches. Needs the serve extra: pip install \"mm-llama[serve]\".\n"
        "  mm-llama serve outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge\n"
        "  mm-llama serve outputs/mm-llama-7b --load_in_4bit --host 0.0.0.0 --api_key $KEY\n"
        "then: OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=KEY).chat.completions.create(...)\n"
        "Media: data: URLs (image_url, video_url) and input_audio; local files only under --allowed_media_dir."
    )
    model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    server.add_argument("--served_model_name", default=None,
                        help="the model id clients send and /v1/models lists (default: the MODEL folder's name)")
    server.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max_batch_size", type=int, default=8,
                          help="requests decoded together (1: one after another)")
    batching.add_argument("--batch_window_ms", type=float, default=10.0,
                          help="how long a request waits for others to share its batch")
    batching.add_argument("--max_queue", type=int, default=256,
                          help="waiting requests before new ones get 429 (0: unlimited)")
    limits = parser.add_argument_group("limits and defaults")
    limits.add_argument("--max_body_mb", type=float, default=64.0, help="largest request body (413 above)")
    limits.add_argument("--max_media_mb", type=float, default=20.0, help="largest media item, decoded (413 above)")
    limits.add_argument("--allowed_media_dir", action="append", default=[], metavar="FOLDER",
                        help="let requests name local files under FOLDER (file:// URL or absolute path; repeatable; "
                             "default: none, only data: URLs)")
    limits.add_argument("--context_length", type=int, default=None,
                        help="prompt + answer tokens (default: the model's max_position_embeddings)")
    limits.add_argument("--max_new_tokens", type=int, default=256,
                        help="answer length for requests without max_tokens")
    limits.add_argument("--temperature", type=float, default=0.6,
                        help="temperature for requests without one (0: greedy)")
    limits.add_argument("--top_p", type=float, default=0.9, help="top_p for requests without one")


def _check(args: argparse.Namespace) -> None:
    from ..cli_shared import CommandError

    rules = [(args.max_batch_size >= 1, "--max_batch_size must be >= 1"),
             (args.batch_window_ms >= 0, "--batch_window_ms must be >= 0"),
             (args.max_queue >= 0, "--max_queue must be >= 0"),
             (args.max_body_mb > 0 and args.max_media_mb > 0, "--max_body_mb and --max_media_mb must be > 0"),
             (args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
             (0 <= args.temperature <= 2, "--temperature must be between 0 and 2"),
             (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
             (args.context_length is None or args.context_length > 1, "--context_length must be > 1")]
    for ok, message in rules:
        if not ok:
            raise CommandError(message, 2)
    for folder in args.allowed_media_dir:
        if not os.path.isdir(folder):
            raise CommandError(f"--allowed_media_dir {folder!r} is not a folder", 2)


def run(args: argparse.Namespace) -> int:
    """Loads the model once and serves until SIGINT / SIGTERM (running requests are finished first)."""
    import importlib.util
    import logging
    from pathlib import Path

    from ..cli_shared import CommandError, check_port_available, load_for_inference

    _check(args)
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # before minutes of model loading
        raise CommandError(f"{' and '.join(missing)} not installed; the server needs them: "
                           'pip install "mm-llama[serve]"')
    check_port_available(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from ..generation import GenerationSettings
    from .app import ServerConfig, create_app
    from .engine import BatchingEngine
    from .media import MediaResolver

    # A long-running server keeps the embeddings of the 4096 most recently used media, not of every one.
    model, processor, embedder = load_for_inference(args, cache_size=4096)
    text_config = getattr(model.config, "text_config", model.config)
    config = ServerConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        context_length=args.context_length or text_config.max_position_embeddings,
        defaults=GenerationSettings(args.max_new_tokens, args.temperature, args.top_p),
        api_key=args.api_key or None, max_body_bytes=int(args.max_body_mb * 2**20))
    engine = BatchingEngine(model, processor, embedder, args.max_batch_size, args.batch_window_ms / 1000,
                            args.max_queue or None)
    resolver = MediaResolver(embedder, args.allowed_media_dir, int(args.max_media_mb * 2**20))
    app = create_app(engine, resolver, config)
    logging.getLogger("mm_llama.serving").info(
        "serving %r on http://%s:%d/v1 (max_batch_size %d, api key %s)", config.model_name, args.host, args.port,
        args.max_batch_size, "required" if config.api_key else "off")
    # access_log off: the app logs one line per request itself, with its tokens and latency.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


__all__ = ["build_parser", "run"]
