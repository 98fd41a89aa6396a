"""What the `mm-llama` commands share: the error type that `mm_llama.cli.main` prints as one line, the loading of a
trained model for inference (chat, web, evaluate, serve) and its sampling settings, and the port check of the
servers. Imports nothing heavy at module level, so that every command's `--help` answers at once."""

from __future__ import annotations

import logging
import sys

from .cli_arguments import DTYPE_CHOICES, GenerationArguments, ModelLoadingArguments


class CommandError(Exception):
    """A failure the user can fix; `main` prints its message on one line and exits with `status`."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def load_for_inference(model_path: str, loading: ModelLoadingArguments, generation: GenerationArguments | None = None,
                       with_media: bool = True, cache_size: int | None = None):
    """(model, processor, embedder) for the inference commands: MODEL loaded with `loading`'s options, decoding with
    `generation`'s --compile / --prompt_lookup_num_tokens (`generation.set_decoding_options`)."""
    from .generation import DecodingOptions, MediaEmbedder, set_decoding_options
    from .loading import load_model

    generation = generation or GenerationArguments()
    model, processor = load_model(model_path, device=loading.device, dtype=loading.dtype,
                                  load_in_4bit=loading.load_in_4bit, base_model=loading.base_model)
    options = set_decoding_options(model, DecodingOptions(compile=generation.compile,
                                                          prompt_lookup_num_tokens=generation.prompt_lookup_num_tokens))
    if options.compile:  # say when an answer waits for a compilation (once per batch size and cache length)
        generation_logger = logging.getLogger("mm_llama.generation")
        generation_logger.setLevel(logging.INFO)
        if not logging.getLogger().handlers and not generation_logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            generation_logger.addHandler(handler)
    embedder = MediaEmbedder.for_model(model, processor, imagebind=loading.imagebind, device=loading.device,
                                       dtype=loading.dtype, cache_size=cache_size) if with_media else None
    return model, processor, embedder


def generation_settings(model, generation: GenerationArguments):
    """The sampling settings of a chat front end: the flags given, then the model's generation_config.json, then
    LLaMA-2-chat's defaults (`GenerationSettings`)."""
    from .generation import GenerationSettings

    return GenerationSettings.from_generation_config(getattr(model, "generation_config", None),
                                                     **generation.sampling())


def check_port_available(host: str, port: int, flag: str = "--port") -> None:
    """Raises CommandError naming `flag` when `host:port` cannot be bound (busy, or not an address of this machine),
    so that a server fails before minutes of model loading rather than after."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CommandError(f"cannot serve on {host}:{port}: {error.strerror}; check --host", 2) from error
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as servers set it: a port in TIME_WAIT from a server that just stopped counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise CommandError(f"cannot serve on {host}:{port} ({error.strerror}): another program uses that port; "
                               f"pick a free one with {flag} PORT", 2) from error


__all__ = ["DTYPE_CHOICES", "CommandError", "check_port_available", "generation_settings", "load_for_inference"]
