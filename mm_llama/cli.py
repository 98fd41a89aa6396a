"""`mm-llama <command>`: every MM-LLaMA tool behind one entry point (setup.cfg console_scripts), in the style of
`accelerate` and `llamafactory-cli`. `scripts/*.py` call the same commands (`main(["chat", ...])`).

A command is its options (dataclasses of `mm_llama.cli_arguments`, turned into flags by transformers'
`HfArgumentParser`) and a run function that maps them to library calls. `--help` and argument errors answer without
importing torch; torch is imported (and the Auto classes registered) only when the command runs. Errors that are the
user's to fix print one `error: ...` line (exit status 2 for bad arguments or recipe keys, 1 for everything else).
Flags are snake_case; a kebab-case spelling still works for one release, with a deprecation line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .cli_arguments import (EPILOGS, SOURCE_KINDS, ChatArguments, ConvertImageBindArguments, ConvertMetaArguments,
                            DemoArguments, DownloadImageBindArguments, DownloadWebvidArguments, EvaluateArguments,
                            GenerationArguments, MergeArguments, ModelLoadingArguments, ProgressArguments, WebArguments,
                            add_dataclass_arguments, build_datasets_arguments, deprecated_spellings_rewritten,
                            merge_arguments, model_argument, train_arguments)
from .cli_shared import CommandError, check_port_available, generation_settings, load_for_inference
from .data.build_config import BuildConfig
from .frontends.serving import command as serve_command
from .progress import progress_bars

INFERENCE = {"loading": ModelLoadingArguments, "generation": GenerationArguments}


@dataclass(frozen=True)
class Command:
    """One `mm-llama` command: `run` is called with each of `options` (name -> dataclass) parsed, and with the
    arguments `add_arguments` adds (positionals, repeatable flags) by their dest."""

    summary: str
    run: Callable[..., int]
    options: dict[str, type] = field(default_factory=dict)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    # The command parses its own arguments (train: transformers' HfArgumentParser over the recipe keys, which a YAML
    # file may give); `run` gets them as `argv`, and the parser only answers --help.
    own_arguments: bool = False
    epilog: str | None = None  # examples after the options; default: cli_arguments.EPILOGS[name]
    # The command draws progress bars: it takes ProgressArguments (`--no_progress`), which run_command applies to
    # mm_llama.progress's switch for the command's duration, so the run function and the library take no flag.
    progress_bars: bool = False

    def all_options(self) -> dict[str, type]:
        """`options`, and `progress` (ProgressArguments) for a command that draws bars."""
        return {**self.options, **({"progress": ProgressArguments} if self.progress_bars else {})}


# ---------------------------------------------------------------------------------------------------- train


def _run_train(argv: list[str]) -> int:
    from .training.arguments import UnknownKeyError, recipe_parser
    from .training.run import train

    parser = recipe_parser()
    argv = deprecated_spellings_rewritten(argv, _option_strings(parser) | {"--help_keys"})
    if argv[:1] == ["--help_keys"]:
        parser.print_help()
        return 0
    try:
        train(argv)
    except UnknownKeyError as error:
        raise CommandError(str(error), status=2) from error
    return 0


# ---------------------------------------------------------------------------------------------------- datasets


def _run_build_datasets(build: BuildConfig, source: list[str], json: list[str], media_dir: list[str] | None,
                        max_samples: int | None, max_turns: int | None, encoder: str | None,
                        encoder_preset: str | None, image_size: int | None, cpu: bool, output: str) -> int:
    if len(json) != len(source):
        raise CommandError(f"give one --json per --source ({len(source)} sources, {len(json)} --json)", 2)
    if media_dir is not None and len(media_dir) != len(source):
        raise CommandError(f"give one --media_dir per --source, or none ({len(source)} sources, "
                           f"{len(media_dir)} --media_dir)", 2)
    from accelerate import PartialState

    from .data.build import build_dataset, format_summary
    from .data.embed import load_encoder
    from .data.sources import SourceSpec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    media_dirs = media_dir or [None] * len(source)
    # Sources are named kind:file name in the manifest; two files of the same name get their paths instead.
    short = [f"{kind}:{os.path.basename(path)}" for kind, path in zip(source, json)]
    names = [n if short.count(n) == 1 else f"{kind}:{path}" for n, kind, path in zip(short, source, json)]
    sources = [SourceSpec(kind=kind, json_path=path, media_dir=folder, name=name, max_samples=max_samples,
                          max_turns=max_turns if kind == "videochat" else None)
               for kind, path, folder, name in zip(source, json, media_dirs, names)]
    model = load_encoder(encoder, encoder_preset, image_size, seed=build.seed)
    audio_model = load_encoder(encoder, encoder_preset, seed=build.seed, modality="audio")
    manifest = build_dataset(sources, model, output, build, device="cpu" if cpu else None, audio_model=audio_model)
    if PartialState().is_main_process:
        print(f"Built {output}")
        print(format_summary(manifest))
    return 0


# ---------------------------------------------------------------------------------------------------- inference


def _run_chat(model: str, loading: ModelLoadingArguments, generation: GenerationArguments,
              chat: ChatArguments) -> int:
    from .frontends.chat import run_chat
    from .imagebind.processing_imagebind import check_media_file

    if chat.media:  # fail before spending minutes loading a 7B model
        check_media_file(chat.media[1], chat.media[0].capitalize())
    if chat.batch_file and not Path(chat.batch_file).is_file():
        raise CommandError(f"Batch file {chat.batch_file} does not exist.")
    loaded, processor, embedder = load_for_inference(model, loading, generation)
    return run_chat(loaded, processor, embedder, generation_settings(loaded, generation), chat)


def _run_web(model: str, loading: ModelLoadingArguments, generation: GenerationArguments, web: WebArguments) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # before minutes of model loading
        raise CommandError('gradio is not installed; the web demo needs it: pip install "mm-llama[web]"')
    check_port_available(web.host, web.port)
    from .frontends.web import WebChat, build_app, launch

    # A long-running server keeps the embeddings of the 4096 most recently used uploads, not of every upload.
    loaded, processor, embedder = load_for_inference(model, loading, generation, cache_size=4096)
    chat = WebChat(loaded, processor, embedder, max_media=web.max_media)
    defaults = generation_settings(loaded, generation)
    chat.settings(defaults.temperature, defaults.top_p, defaults.max_new_tokens)  # bad defaults fail here, not later
    app = build_app(chat, title=f"MM-LLaMA: {Path(model).resolve().name}", system_prompt=web.system,
                    defaults=defaults, concurrency_limit=web.concurrency, max_queue=web.max_queue)
    launch(app, host=web.host, port=web.port, share=web.share)
    return 0


def _run_evaluate(model: str, loading: ModelLoadingArguments, generation: GenerationArguments,
                  evaluate: EvaluateArguments) -> int:
    from . import evaluation

    loaded, processor, embedder = load_for_inference(model, loading, generation, with_media=bool(evaluate.qa_file))
    settings = dataclasses.replace(evaluation.EVALUATION_SETTINGS, **generation.sampling())
    results = evaluation.run_evaluation(loaded, processor, embedder, model, evaluate, settings)
    print(json.dumps(evaluation.results_summary(results), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------- checkpoints


def _run_convert_meta(options: ConvertMetaArguments) -> int:
    from .conversion.meta_llama import convert_meta_llama

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = convert_meta_llama(**dataclasses.asdict(options))
    print(f"Saved the Hugging Face model to {output}")
    return 0


def _run_convert_imagebind(options: ConvertImageBindArguments) -> int:
    import torch

    from .imagebind import ImageBindAudioConfig, ImageBindVisionConfig, convert_imagebind_checkpoint

    config = audio_config = None
    if options.preset is not None and options.modality in ("vision", "all"):
        overrides = {} if options.image_size is None else {"image_size": options.image_size}
        config = ImageBindVisionConfig.from_preset(options.preset, **overrides)
    if options.preset is not None and options.modality in ("audio", "all"):
        audio_config = ImageBindAudioConfig.from_preset(options.preset)
    output = convert_imagebind_checkpoint(options.checkpoint, options.output_dir, config=config,
                                          dtype=getattr(torch, options.dtype), modality=options.modality,
                                          audio_config=audio_config)
    print(f"Wrote {output}")
    return 0


def _run_merge(input_dir: str, output_dir: str, options: MergeArguments) -> int:
    from .merge import convert_checkpoint

    kwargs = dataclasses.asdict(options)
    kwargs["private"] = not kwargs.pop("public")
    mode, output = convert_checkpoint(input_dir, output_dir, **kwargs)
    pushed = f" and pushed it to {options.push_to_hub}" if mode == "merge" and options.push_to_hub else ""
    print(f"{mode}: wrote {output}{pushed}")
    return 0


# ---------------------------------------------------------------------------------------------------- downloads


def _run_download_imagebind(options: DownloadImageBindArguments) -> int:
    from .imagebind.download_imagebind import IMAGEBIND_HUGE_URL, download_imagebind_checkpoint

    path = download_imagebind_checkpoint(options.output, options.url or IMAGEBIND_HUGE_URL, timeout=options.timeout)
    print(f"Saved {path}")
    return 0


def _run_download_webvid(options: DownloadWebvidArguments) -> int:
    from .data.webvid import download_webvid

    report = download_webvid(
        options.videochat_json, options.metadata, options.output, layout=options.layout,
        failures_json=options.failures_json, num_threads=options.threads, retries=options.retries,
        backoff=options.backoff, timeout=options.timeout,
    )
    print(f"needed {report.needed}: downloaded {report.downloaded}, already present {report.skipped_existing}, "
          f"failed {len(report.failed)}, not in metadata {len(report.missing_in_metadata)}")
    if report.failed or report.missing_in_metadata:
        print(f"see {options.failures_json or os.path.join(options.output, 'download_failures.json')}")
    return 1 if report.failed else 0


# ---------------------------------------------------------------------------------------------------- demo


def _run_demo(options: DemoArguments) -> int:
    if options.device == "cpu":
        # Hide GPUs before torch starts CUDA, so that the steps that pick "the GPU when present" stay on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if options.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(options.threads)
    import torch

    from .demo.pipeline import DemoConfig, run_demo
    from .demo.reporting import StepError

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    config = DemoConfig(output=options.output, size=options.size, steps=options.steps, device=options.device,
                        seed=options.seed, num_workers=options.num_workers)
    try:
        run_demo(config, run_command)
    except StepError as error:
        raise CommandError(str(error)) from error
    return 0


# ---------------------------------------------------------------------------------------------------- dispatch

COMMANDS: dict[str, Command] = {
    "train": Command("Train a stage from a YAML recipe (HF Trainer; accelerate for many GPUs).", _run_train,
                     add_arguments=train_arguments, own_arguments=True),
    "build-datasets": Command("Embed the media of LLaVA / VideoChat / JSONL sources with ImageBind into Arrow "
                              "datasets (resumable).", _run_build_datasets, {"build": BuildConfig},
                              build_datasets_arguments, progress_bars=True),
    "chat": Command("Chat with a model: interactive, one-shot, or a batch file.", _run_chat,
                    {**INFERENCE, "chat": ChatArguments}, model_argument),
    "web": Command("Browser chat demo (Gradio): one process, streamed answers, a queue for concurrent users.",
                   _run_web, {**INFERENCE, "web": WebArguments}, model_argument),
    "serve": Command("OpenAI-compatible HTTP API (chat completions, streaming, batched decoding) in one process.",
                     serve_command.run, {**INFERENCE, "serve": serve_command.ServeArguments},
                     serve_command.add_arguments, epilog=serve_command.EPILOG),
    "evaluate": Command("Loss / answer-token accuracy on a dataset split, and generation QA.", _run_evaluate,
                        {**INFERENCE, "evaluate": EvaluateArguments}, model_argument, progress_bars=True),
    "convert-meta": Command("Meta LLaMA-2 checkpoint (consolidated.*.pth) -> Hugging Face LLaMA folder.",
                            _run_convert_meta, {"options": ConvertMetaArguments}, progress_bars=True),
    "convert-imagebind": Command("Meta's imagebind_huge.pth -> ImageBind vision model folder (safetensors).",
                                 _run_convert_imagebind, {"options": ConvertImageBindArguments}),
    "merge": Command("Merge a stage-2 LoRA adapter into one model folder (or start stage 2 from stage 1).",
                     _run_merge, {"options": MergeArguments}, merge_arguments),
    "download-imagebind": Command("Download Meta's imagebind_huge.pth (resumable).", _run_download_imagebind,
                                  {"options": DownloadImageBindArguments}, progress_bars=True),
    "download-webvid": Command("Download the WebVid videos that VideoChat-11K uses (resumable).",
                               _run_download_webvid, {"options": DownloadWebvidArguments}, progress_bars=True),
    "demo": Command("The built-in demo: the whole pipeline on tiny stand-ins, on a CPU, no downloads.", _run_demo,
                    {"options": DemoArguments}, progress_bars=True),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The epilog as written, and each flag's default after its help unless it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or isinstance(action, argparse._StoreFalseAction):
            return action.help or ""
        return super()._get_help_string(action)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `mm-llama <name>`: a flag per field of its option dataclasses, then its other arguments."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"mm-llama {name}", description=command.summary,
                                     epilog=command.epilog or EPILOGS.get(name),
                                     formatter_class=_HelpFormatter)
    for options in command.all_options().values():
        add_dataclass_arguments(parser, options)
    if command.add_arguments is not None:
        command.add_arguments(parser)
    return parser


def parse_command(name: str, argv: Sequence[str]) -> dict[str, Any]:
    """`argv` parsed for `mm-llama <name>`: the run function's keyword arguments (each option dataclass built from
    its flags), and `progress` (ProgressArguments) for a command that draws bars. Kebab-case spellings are accepted
    with a deprecation line; bad values raise CommandError (status 2)."""
    parser = build_parser(name)
    if COMMANDS[name].own_arguments:
        if not argv or argv[0] in ("-h", "--help"):
            parser.parse_args(["--help"])  # prints the help and exits
        return {"argv": list(argv)}
    namespace = vars(parser.parse_args(deprecated_spellings_rewritten(argv, _option_strings(parser))))
    try:
        for key, options in COMMANDS[name].all_options().items():
            names = [item.name for item in dataclasses.fields(options) if item.init]
            namespace[key] = options(**{item: namespace.pop(item) for item in names})
    except ValueError as error:  # a dataclass's __post_init__ check: the user's value
        raise CommandError(str(error), 2) from error
    return namespace


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mm-llama <command> [options]   (mm-llama <command> --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def run_command(name: str, argv: Sequence[str]) -> int:
    """Runs one command with its arguments; returns the exit status (errors are printed as one line)."""
    # bitsandbytes warns when it is imported on a CPU with AVX512-BF16 that an optional kernel package (`kernels`,
    # fetched from the Hub) is missing: noise before every command's output, about a path no GPU run uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        arguments = parse_command(name, list(argv))  # --help and argument errors exit here, fast
        progress = arguments.pop("progress", None)
        # --no_progress: no bar during this command; otherwise the switch stays as the caller (or the environment
        # variable) left it. Restored afterwards: the demo and tests run commands in-process.
        bars = progress_bars(False) if progress is not None and not progress.progress else contextlib.nullcontext()
        try:
            with bars:
                return COMMANDS[name].run(**arguments)
        except (FileNotFoundError, ValueError, OSError) as error:  # MediaLoadError is a ValueError
            raise CommandError(str(error)) from error
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.status


def main(argv: Sequence[str] | None = None) -> int:
    """`mm-llama <command> [options]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"mm-llama {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; commands: {', '.join(COMMANDS)}"
        print(f"error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


__all__ = ["COMMANDS", "SOURCE_KINDS", "CommandError", "build_parser", "main", "parse_command", "run_command"]
