"""What the `mm-llama` commands share: the error type that `mm_llama.cli.main` prints as one line, the options and the
loading of a trained model for inference (chat, web, evaluate, serve), and the port check of the servers. Imports
nothing heavy at module level, so that every command's `--help` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class CommandError(Exception):
    """A failure the user can fix; `main` prints its message on one line and exits with `status`."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of every command that loads a trained model for inference."""
    parser.add_argument("model", help="MM-LLaMA model folder: merged, stage-1, or stage-2 adapter")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU when present)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--load_in_4bit", action="store_true", help="quantise the language model to 4 bit (nf4)")
    parser.add_argument("--imagebind", help="converted ImageBind folder (mm-llama convert-imagebind): embeds raw "
                                            "images/videos for a model without a vision tower, and raw audio when "
                                            "converted with --modality all")
    parser.add_argument("--base_model", help="stage-1 folder for a stage-2 adapter MODEL, if not the recorded one")
    decoding = parser.add_argument_group("decoding speed (same answers; see docs/generation.md)")
    decoding.add_argument("--compile", action="store_true",
                          help="static KV cache + torch.compile'd decoding step (CUDA graphs on a GPU); the first "
                               "answer of each batch size waits for the compilation (ignored with --load_in_4bit)")
    decoding.add_argument("--prompt_lookup_num_tokens", type=int, default=None, metavar="N",
                          help="prompt-lookup decoding: verify up to N tokens copied from the prompt per step; pays "
                               "for long answers that quote the prompt (one conversation at a time)")


def load_for_inference(args: argparse.Namespace, with_media: bool = True, cache_size: int | None = None):
    """(model, processor, embedder) for a command's `model_arguments`; the model decodes with their --compile /
    --prompt_lookup_num_tokens (`generation.set_decoding_options`)."""
    from .generation import DecodingOptions, MediaEmbedder, set_decoding_options
    from .loading import load_model

    lookup = getattr(args, "prompt_lookup_num_tokens", None)
    if lookup is not None and lookup < 1:  # before minutes of model loading
        raise CommandError(f"--prompt_lookup_num_tokens must be >= 1, got {lookup}", 2)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype,
                                  load_in_4bit=args.load_in_4bit, base_model=args.base_model)
    options = set_decoding_options(model, DecodingOptions(compile=getattr(args, "compile", False),
                                                          prompt_lookup_num_tokens=lookup))
    if options.compile:  # say when an answer waits for a compilation (once per batch size and cache length)
        generation_logger = logging.getLogger("mm_llama.generation")
        generation_logger.setLevel(logging.INFO)
        if not logging.getLogger().handlers and not generation_logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            generation_logger.addHandler(handler)
    embedder = MediaEmbedder.for_model(model, processor, imagebind=args.imagebind, device=args.device,
                                       dtype=args.dtype, cache_size=cache_size) if with_media else None
    return model, processor, embedder


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


__all__ = ["DTYPE_CHOICES", "CommandError", "check_port_available", "load_for_inference", "model_arguments"]
