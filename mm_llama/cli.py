"""`mm-llama <command>`: every MM-LLaMA tool behind one entry point (setup.cfg console_scripts), in the style of
`accelerate` and `llamafactory-cli`. `scripts/*.py` call the same commands (`main(["chat", ...])`).

Each command has an argument parser that imports nothing heavy, so `--help` and argument errors answer at once; torch
and transformers are imported (and the Auto classes registered) only when the command runs. Errors that are the
user's to fix print one `error: ...` line (exit status 2 for bad arguments or recipe keys, 1 for everything else).

Why one module of ~600 lines: it is the table of every command's options and nothing else (each run function is a
few lines that call the library), and it must import nothing heavy; splitting it would scatter that table.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .cli_shared import DTYPE_CHOICES, CommandError, check_port_available, load_for_inference, model_arguments

SOURCE_KINDS = ("llava", "videochat", "records")  # mm_llama.data.sources.SOURCE_KINDS (a test keeps them equal)


@dataclass(frozen=True)
class Command:
    summary: str
    build_parser: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _parser(name: str, command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"mm-llama {name}", description=command.summary,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.build_parser(parser)
    return parser


# ---------------------------------------------------------------------------------------------------- train

TRAIN_HELP = """\
usage: mm-llama train RECIPE.yaml [--key value ...]

Trains one stage (projector alone, or LoRA + projector) with the HF Trainer. The recipe's keys are the fields of
mm_llama.training's ModelArguments / DataArguments / LoraArguments and transformers' TrainingArguments; `--key value`
after the recipe overrides it. Many GPUs: `accelerate launch scripts/train.py RECIPE.yaml`.

examples:
  mm-llama train recipes/stage1.yaml --model_name_or_path outputs/llama-2-7b-chat-hf
  mm-llama train recipes/original/stage2.yaml --resume_from_checkpoint latest

options:
  -h, --help    show this message
  --help-keys   list every recipe key with its help (imports transformers: a few seconds)
"""


def _run_train(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_HELP, end="")
        return 0
    from .training.arguments import UnknownKeyError, recipe_parser
    from .training.run import train

    if argv[0] == "--help-keys":
        recipe_parser().print_help()
        return 0
    try:
        train(list(argv))
    except UnknownKeyError as error:
        raise CommandError(str(error), status=2) from error
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    return 0


# ---------------------------------------------------------------------------------------------------- datasets


def _build_datasets_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  mm-llama build-datasets --source llava --json cc3m/chat.json --media-dir cc3m/images \\\n"
        "      --encoder checkpoints/imagebind_huge --output outputs/datasets/cc3m\n"
        "  accelerate launch scripts/build_datasets.py --source llava --json llava_instruct_150k.json \\\n"
        "      --media-dir coco/train2017 --source videochat --json videochat_instruct_11k.json --media-dir webvid \\\n"
        "      --encoder checkpoints/imagebind_huge --dtype bfloat16 --output outputs/datasets/stage2\n"
        "Each --source takes the next --json and --media-dir. A killed build resumes when re-run with the same\n"
        "arguments; --overwrite starts again. Several CPU processes: torchrun --nproc_per_node N\n"
        "scripts/build_datasets.py --cpu ..."
    )
    group = parser.add_argument_group("sources (repeat the three flags for several sources)")
    group.add_argument("--source", action="append", required=True, choices=SOURCE_KINDS,
                       help="llava (CC3M-595K chat.json, LLaVA-Instruct-150K), videochat (VideoChat-11K), "
                            "records (our JSON/JSONL format)")
    group.add_argument("--json", action="append", required=True, help="the source's JSON/JSONL file")
    group.add_argument("--media-dir", action="append", default=None,
                       help="folder the media paths are relative to (default: the JSON file's folder)")
    group.add_argument("--max-samples", type=int, default=None, help="keep the first N valid records per source")
    group.add_argument("--max-turns", type=int, default=None,
                       help="VideoChat: split each dialog into consecutive chunks of at most N question/answer pairs, "
                            "each a record of its own with the video on its first question; every pair is kept "
                            "(default: whole dialogs). The original MM-LLaMA kept dialogs of up to 5 pairs whole and "
                            "only the first 3 pairs of longer ones.")
    encoder = parser.add_argument_group("encoder")
    encoder.add_argument("--encoder", default=None,
                         help="converted ImageBind folder (mm-llama convert-imagebind; --modality all also embeds the "
                              "audio of `records` sources)")
    encoder.add_argument("--encoder-preset", default=None, help="random-init preset instead (e.g. tiny, for tests)")
    encoder.add_argument("--image-size", type=int, default=None, help="image size of a random-init preset")
    encoder.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    encoder.add_argument("--cpu", action="store_true",
                         help="run the encoder on CPU even where a GPU exists (and allow several CPU processes)")
    build = parser.add_argument_group("build")
    build.add_argument("--output", required=True, help="output folder (DatasetDict + manifest.json)")
    build.add_argument("--batch-size", type=int, default=32, help="media items per encoder call")
    build.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding media")
    build.add_argument("--shard-size", type=int, default=1024, help="media items per resumable shard")
    build.add_argument("--validation-ratio", type=float, default=0.05,
                       help="fraction of records held out as the validation split (default 0.05, as the original "
                            "MM-LLaMA; the recipes evaluate on it); 0: no validation split")
    build.add_argument("--seed", type=int, default=42, help="split seed (and random-init encoder seed)")
    build.add_argument("--overwrite", action="store_true", help="delete an earlier build in --output and restart")
    build.add_argument("--keep-shards", action="store_true", help="keep the embedding shards after success")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_build_datasets(args: argparse.Namespace) -> int:
    if len(args.json) != len(args.source):
        raise CommandError(f"give one --json per --source ({len(args.source)} sources, {len(args.json)} --json)", 2)
    if args.media_dir is not None and len(args.media_dir) != len(args.source):
        raise CommandError(f"give one --media-dir per --source, or none ({len(args.source)} sources, "
                           f"{len(args.media_dir)} --media-dir)", 2)
    import logging

    from accelerate import PartialState

    from .data.build import build_dataset, format_summary
    from .data.embed import load_encoder
    from .data.sources import SourceSpec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    media_dirs = args.media_dir or [None] * len(args.source)
    # Sources are named kind:file name in the manifest; two files of the same name get their paths instead.
    short = [f"{kind}:{os.path.basename(path)}" for kind, path in zip(args.source, args.json)]
    names = [n if short.count(n) == 1 else f"{kind}:{path}" for n, kind, path in zip(short, args.source, args.json)]
    sources = [
        SourceSpec(kind=kind, json_path=path, media_dir=media_dir, name=name, max_samples=args.max_samples,
                   max_turns=args.max_turns if kind == "videochat" else None)
        for kind, path, media_dir, name in zip(args.source, args.json, media_dirs, names)
    ]
    model = load_encoder(args.encoder, args.encoder_preset, args.image_size, seed=args.seed)
    audio_model = load_encoder(args.encoder, args.encoder_preset, seed=args.seed, modality="audio")
    manifest = build_dataset(
        sources, model, args.output, batch_size=args.batch_size, num_workers=args.num_workers, dtype=args.dtype,
        shard_size=args.shard_size, validation_ratio=args.validation_ratio, seed=args.seed,
        overwrite=args.overwrite, keep_shards=args.keep_shards, progress=not args.no_progress,
        device="cpu" if args.cpu else None, audio_model=audio_model,
    )
    if PartialState().is_main_process:
        print(f"Built {args.output}")
        print(format_summary(manifest))
    return 0


# ---------------------------------------------------------------------------------------------------- inference


def _chat_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Interactive (stdin; /image PATH, /video PATH, /audio PATH, /reset, /quit; history kept across turns):\n"
        "  mm-llama chat outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge\n"
        "One-shot:  mm-llama chat MODEL --prompt \"What is in the image?\" --image cat.jpg\n"
        "Batched one-shot prompts (JSONL lines {\"prompt\", \"image\"|\"video\"?, \"system\"?, \"id\"?}):\n"
        "  mm-llama chat MODEL --batch_file prompts.jsonl --output answers.jsonl\n"
        "Media are raw image/video/audio files or precomputed embedding files (.pt/.npy/.safetensors holding a\n"
        "[1024] vector). Raw audio needs an --imagebind folder converted with --modality all (zero-shot: the\n"
        "projector was trained on images and videos). --temperature 0 decodes greedily."
    )
    model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print the answer as it is generated (interactive and one-shot modes)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="one-shot: answer this message and exit")
    mode.add_argument("--batch_file", help="one-shot prompts from a JSONL file, answered in batches; a bad line "
                                           "gets an error record and the others are answered")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", help="one-shot: image file or embedding file for --prompt")
    media.add_argument("--video", help="one-shot: video file or embedding file for --prompt")
    media.add_argument("--audio", help="one-shot: audio file (or a video's sound track) or embedding file for --prompt")
    parser.add_argument("--batch_size", type=int, default=8, help="--batch_file: prompts per batch")
    parser.add_argument("--output", help="--batch_file: JSONL to write (default: stdout)")


def _run_chat(args: argparse.Namespace) -> int:
    media_type = next((kind for kind in ("image", "video", "audio") if getattr(args, kind)), None)
    if media_type and not args.prompt:
        raise CommandError("--image/--video/--audio go with --prompt (in interactive mode, use /image PATH).", 2)
    from .chat import ChatSession, answer_batch_file, run_interactive
    from .generation import GenerationSettings
    from .imagebind.processing_imagebind import check_media_file

    media_path = getattr(args, media_type) if media_type else None
    if media_path:  # fail before spending minutes loading a 7B model
        check_media_file(media_path, media_type.capitalize())
    if args.batch_file and not Path(args.batch_file).is_file():
        raise CommandError(f"Batch file {args.batch_file} does not exist.")
    model, processor, embedder = load_for_inference(args)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    if args.batch_file:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            answered, failed = answer_batch_file(model, processor, embedder, args.batch_file, out, settings,
                                                 args.batch_size, system=args.system)
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"answered {answered}, failed {failed} (error records name their line)", file=sys.stderr)
        return 0 if answered or not failed else 1
    session = ChatSession(model, processor, embedder, settings, system=args.system)
    if args.prompt is not None:
        if media_path:
            session.attach(media_type, media_path)
        if args.stream:
            session.respond(args.prompt, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            print()
        else:
            print(session.respond(args.prompt))
        return 0
    run_interactive(session, sys.stdin, sys.stdout, sys.stderr, stream_answers=args.stream,
                    show_prompt=sys.stdin.isatty())
    return 0


def _web_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "A browser chat (Gradio) in one process: the model is loaded once, answers are streamed, requests wait in a\n"
        "queue (--concurrency at a time). Needs the web extra: pip install \"mm-llama[web]\".\n"
        "  mm-llama web outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge   # open http://127.0.0.1:7860\n"
        "  mm-llama web outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge --load_in_4bit --host 0.0.0.0"
    )
    model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--system", default="", help="the system prompt box's initial value")
    parser.add_argument("--temperature", type=float, default=0.6, help="initial sampling temperature; 0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.9, help="initial top-p")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="initial answer length limit")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="generations run at the same time (default 1: one GPU); others wait in the queue")
    parser.add_argument("--max_queue", type=int, default=None, help="waiting requests before new ones are refused "
                                                                    "(default: unlimited)")
    parser.add_argument("--max_media", type=int, default=1,
                        help="media files per conversation (default 1, as the original MM-LLaMA's demo)")


def _run_web(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # before minutes of model loading
        raise CommandError('gradio is not installed; the web demo needs it: pip install "mm-llama[web]"')
    if args.concurrency < 1:
        raise CommandError(f"--concurrency must be >= 1, got {args.concurrency}", 2)
    check_port_available(args.host, args.port)
    from .generation import GenerationSettings
    from .web import WebChat, build_app, launch

    # A long-running server keeps the embeddings of the 4096 most recently used uploads, not of every upload.
    model, processor, embedder = load_for_inference(args, cache_size=4096)
    chat = WebChat(model, processor, embedder, max_media=args.max_media)
    defaults = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    chat.settings(defaults.temperature, defaults.top_p, defaults.max_new_tokens)  # bad defaults fail here, not later
    app = build_app(chat, title=f"MM-LLaMA: {Path(args.model).resolve().name}", system_prompt=args.system,
                    defaults=defaults, concurrency_limit=args.concurrency, max_queue=args.max_queue)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


def _evaluate_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "loss / answer-token accuracy on a built dataset's split (the training metrics, same code):\n"
        "  mm-llama evaluate MODEL --dataset outputs/datasets/cc3m --output eval.json\n"
        "generation on questions about media (JSONL {\"media\", \"question\", \"answers\": [...]}):\n"
        "  mm-llama evaluate MODEL --qa_file qa.jsonl --imagebind checkpoints/imagebind_huge --output eval.json"
    )
    model_arguments(parser)
    parser.add_argument("--dataset", help="built dataset folder for loss / token accuracy")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--train_on", choices=["all", "last"], default="all",
                        help="which answers are trained answers (as in the recipe); 'last': earlier ones are prompt")
    parser.add_argument("--prompt_loss_weight", type=float, default=0.0,
                        help="as in the recipe, so that 'loss' equals the run's eval_loss (accuracy counts answers only)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="as in the recipe (default: whole conversations)")
    parser.add_argument("--truncation", choices=["truncate", "drop"], default="truncate", help="as in the recipe")
    parser.add_argument("--qa_file", help="JSONL of {media, question, answers} for the generation eval")
    parser.add_argument("--system", default=None, help="system prompt for the generation eval")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_examples", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--output", required=True, help="JSON file to write")


def _run_evaluate(args: argparse.Namespace) -> int:
    if not args.dataset and not args.qa_file:
        raise CommandError("give --dataset (loss/accuracy), --qa_file (generation), or both.", 2)
    from . import evaluation
    from .generation import GenerationSettings

    model, processor, embedder = load_for_inference(args, with_media=bool(args.qa_file))
    results: dict = {"model": str(args.model)}
    if args.dataset:
        results["loss_eval"] = evaluation.evaluate_loss(
            model, processor, args.dataset, split=args.split, batch_size=args.batch_size,
            max_examples=args.max_examples, train_on=args.train_on, prompt_loss_weight=args.prompt_loss_weight,
            max_seq_len=args.max_seq_len, truncation=args.truncation,
        )
    if args.qa_file:
        results["generation_eval"] = evaluation.evaluate_generation(
            model, processor, embedder, args.qa_file, system=args.system, batch_size=args.batch_size,
            max_examples=args.max_examples, progress=args.progress,
            settings=GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0),
        )
        for failure in results["generation_eval"]["media_errors"]:
            print(f"warning: question {failure['id']}: {failure['error']} (answered with '', scored wrong)",
                  file=sys.stderr)
    evaluation.write_results(results, args.output)
    summary = {name: {k: v for k, v in part.items() if k not in ("examples", "media_errors")}
               for name, part in results.items() if isinstance(part, dict)}
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------- checkpoints


def _convert_meta_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Meta's download puts tokenizer.model beside the model folders; it is found there or inside\n"
                     "--input_dir, or given with --tokenizer_path. The output loads with LlamaForCausalLM.")
    parser.add_argument("--input_dir", required=True, help="Meta model folder with params.json and consolidated.*.pth")
    parser.add_argument("--output_dir", required=True, help="Hugging Face output folder")
    parser.add_argument("--tokenizer_path", default=None,
                        help="Meta's tokenizer.model (or its folder); default: --input_dir, then its parent folder")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float16", help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="largest weight file, e.g. 5GB or 2GiB")
    parser.add_argument("--max_position_embeddings", type=int, default=4096,
                        help="context length (not stored in params.json; LLaMA-2: 4096)")
    parser.add_argument("--no_safe_serialization", dest="safe_serialization", action="store_false",
                        help="write PyTorch .bin files instead of safetensors")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")


def _run_convert_meta(args: argparse.Namespace) -> int:
    import logging

    from .conversion.meta_llama import convert_meta_llama

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = convert_meta_llama(args.input_dir, args.output_dir, tokenizer_path=args.tokenizer_path, dtype=args.dtype,
                                safe_serialization=args.safe_serialization, max_shard_size=args.max_shard_size,
                                max_position_embeddings=args.max_position_embeddings, progress=args.progress)
    print(f"Saved the Hugging Face model to {output}")
    return 0


def _convert_imagebind_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Meta's imagebind_huge.pth (flat state dict).")
    parser.add_argument("--output_dir", required=True, help="Folder to write config.json + model.safetensors into.")
    parser.add_argument("--modality", choices=["vision", "audio", "all"], default="vision",
                        help="vision (default): the vision tower; audio: the audio tower; all: both, into "
                             "OUTPUT_DIR/vision and OUTPUT_DIR/audio (what --imagebind takes for raw audio)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="Dtype of the saved weights.")
    parser.add_argument("--preset", choices=["huge", "tiny"], default=None,
                        help="Architecture preset (of every converted tower); inferred from the weight shapes when "
                             "omitted.")
    parser.add_argument("--image_size", type=int, default=None, help="Override the vision preset's image size.")


def _run_convert_imagebind(args: argparse.Namespace) -> int:
    import torch

    from .imagebind import ImageBindAudioConfig, ImageBindVisionConfig, convert_imagebind_checkpoint

    config = audio_config = None
    if args.preset is not None and args.modality in ("vision", "all"):
        overrides = {} if args.image_size is None else {"image_size": args.image_size}
        config = ImageBindVisionConfig.from_preset(args.preset, **overrides)
    if args.preset is not None and args.modality in ("audio", "all"):
        audio_config = ImageBindAudioConfig.from_preset(args.preset)
    output = convert_imagebind_checkpoint(args.checkpoint, args.output_dir, config=config,
                                          dtype=getattr(torch, args.dtype), modality=args.modality,
                                          audio_config=audio_config)
    print(f"Wrote {output}")
    return 0


def _merge_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "stage-2 output (PEFT LoRA adapter + projector) -> one merged MMLlamaForCausalLM folder;\n"
        "stage-1 output (full model) -> the stage-2 starting point (a fresh LoRA adapter folder).\n"
        "  mm-llama merge outputs/stage2 outputs/mm-llama-7b [--push_to_hub me/mm-llama-7b]"
    )
    parser.add_argument("input_dir", help="stage-2 output (adapter) or stage-1 output (full model) folder")
    parser.add_argument("output_dir", help="folder to write (created)")
    parser.add_argument("--mode", choices=["auto", "merge", "stage2-start"], default="auto",
                        help="auto: merge an adapter folder, make a stage-2 start from a full model folder")
    parser.add_argument("--base_model", help="merge: the stage-1 folder, if the adapter's recorded one is not here")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="merge: dtype to merge and save in (default: as saved)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="merge: also upload the merged folder to this Hub repo")
    parser.add_argument("--public", action="store_true", help="with --push_to_hub: create a public repo")
    # No defaults here: unset values fall back to mm_llama.loading.LORA_DEFAULTS (the recipes' LoRA), declared once.
    parser.add_argument("--lora_r", type=int, help="stage2-start: LoRA rank (default: the recipes' LoRA)")
    parser.add_argument("--lora_alpha", type=float, help="stage2-start: LoRA alpha (default: the recipes' LoRA)")
    parser.add_argument("--lora_dropout", type=float, help="stage2-start: LoRA dropout (default: the recipes' LoRA)")


def _run_merge(args: argparse.Namespace) -> int:
    import torch

    from .loading import is_adapter_folder
    from .merge import convert_checkpoint

    merging = args.mode == "merge" or (args.mode == "auto" and is_adapter_folder(args.input_dir))
    if merging:
        kwargs = dict(base_model=args.base_model, dtype=getattr(torch, args.dtype) if args.dtype else None,
                      push_to_hub=args.push_to_hub, private=not args.public)
    else:
        given = dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        kwargs = {name: value for name, value in given.items() if value is not None}
    mode, output = convert_checkpoint(args.input_dir, args.output_dir, mode=args.mode, **kwargs)
    pushed = f" and pushed it to {args.push_to_hub}" if mode == "merge" and args.push_to_hub else ""
    print(f"{mode}: wrote {output}{pushed}")
    return 0


# ---------------------------------------------------------------------------------------------------- downloads


def _download_imagebind_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="imagebind_huge.pth", help="Destination file.")
    parser.add_argument("--url", default=None, help="Source URL (default: Meta's public URL, about 4.5 GB).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Network timeout in seconds.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


def _run_download_imagebind(args: argparse.Namespace) -> int:
    from .imagebind.download_imagebind import IMAGEBIND_HUGE_URL, download_imagebind_checkpoint

    path = download_imagebind_checkpoint(args.output, args.url or IMAGEBIND_HUGE_URL, timeout=args.timeout,
                                         progress=not args.no_progress)
    print(f"Saved {path}")
    return 0


def _download_webvid_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Re-running skips videos already downloaded; failures are listed in "
                     "<output>/download_failures.json.")
    parser.add_argument("--videochat-json", required=True, help="videochat_instruct_11k.json")
    parser.add_argument("--metadata", required=True, help="WebVid-10M metadata CSV (videoid, contentUrl, page_dir)")
    parser.add_argument("--output", required=True, help="folder receiving the videos")
    parser.add_argument("--layout", default="folder", choices=("folder", "flat"),
                        help="folder: <page_dir>/<videoid>.mp4 as the JSON names them; flat: <videoid>.mp4")
    parser.add_argument("--threads", type=int, default=16, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=3, help="retries per video on transient errors")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--failures-json", default=None, help="default: <output>/download_failures.json")


def _run_download_webvid(args: argparse.Namespace) -> int:
    from .data.webvid import download_webvid

    report = download_webvid(
        args.videochat_json, args.metadata, args.output, layout=args.layout, failures_json=args.failures_json,
        num_threads=args.threads, retries=args.retries, backoff=args.backoff, timeout=args.timeout,
    )
    print(f"needed {report.needed}: downloaded {report.downloaded}, already present {report.skipped_existing}, "
          f"failed {len(report.failed)}, not in metadata {len(report.missing_in_metadata)}")
    if report.failed or report.missing_in_metadata:
        print(f"see {args.failures_json or os.path.join(args.output, 'download_failures.json')}")
    return 1 if report.failed else 0


# ---------------------------------------------------------------------------------------------------- demo


def _demo_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The whole pipeline on tiny stand-in models, on a laptop CPU, no downloads:\n"
        "  mm-llama demo --output demo --threads 1                  # the full demo\n"
        "  mm-llama demo --output demo-smoke --size smoke           # faster (what the tests run)\n"
        "  mm-llama demo --output demo --device cuda                # the same on a GPU"
    )
    parser.add_argument("--output", default="demo", help="folder for every artefact (created; reused files are "
                                                          "replaced)")
    parser.add_argument("--size", choices=["tiny", "smoke", "full"], default="full",
                        help="full: the demo of docs/demo.md; smoke: faster, what the tests run; tiny: seconds, learns little")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each stage for exactly this many optimizer steps (overrides the size's epochs)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="corpus, stand-in and training seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch CPU threads (default: PyTorch's choice). On a machine shared with other jobs, "
                             "--threads 1 avoids threads waiting on each other and can be many times faster")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding processes of build-datasets")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (summaries only)")


def _run_demo(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        # Hide GPUs before torch starts CUDA, so that the steps that pick "the GPU when present" stay on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from .demo.pipeline import DemoConfig, run_demo
    from .demo.reporting import StepError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(output=args.output, size=args.size, steps=args.steps, device=args.device, seed=args.seed,
                        progress=not args.no_progress, num_workers=args.num_workers)
    try:
        run_demo(config, run_command)
    except StepError as error:
        raise CommandError(str(error)) from error
    return 0


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    from .serving.command import build_parser  # argparse only: nothing heavy

    build_parser(parser)


def _run_serve(args: argparse.Namespace) -> int:
    from .serving.command import run

    return run(args)


# ---------------------------------------------------------------------------------------------------- dispatch

COMMANDS: dict[str, Command] = {
    "train": Command("Train a stage from a YAML recipe (HF Trainer; accelerate for many GPUs).", lambda p: None,
                     lambda a: 0),  # parses its own arguments: see _run_train
    "build-datasets": Command("Embed the media of LLaVA / VideoChat / JSONL sources with ImageBind into Arrow "
                              "datasets (resumable).", _build_datasets_parser, _run_build_datasets),
    "chat": Command("Chat with a model: interactive, one-shot, or a batch file.", _chat_parser, _run_chat),
    "web": Command("Browser chat demo (Gradio): one process, streamed answers, a queue for concurrent users.",
                   _web_parser, _run_web),
    "serve": Command("OpenAI-compatible HTTP API (chat completions, streaming, batched decoding) in one process.",
                     _serve_parser, _run_serve),
    "evaluate": Command("Loss / answer-token accuracy on a dataset split, and generation QA.", _evaluate_parser,
                        _run_evaluate),
    "convert-meta": Command("Meta LLaMA-2 checkpoint (consolidated.*.pth) -> Hugging Face LLaMA folder.",
                            _convert_meta_parser, _run_convert_meta),
    "convert-imagebind": Command("Meta's imagebind_huge.pth -> ImageBind vision model folder (safetensors).",
                                 _convert_imagebind_parser, _run_convert_imagebind),
    "merge": Command("Merge a stage-2 LoRA adapter into one model folder (or start stage 2 from stage 1).",
                     _merge_parser, _run_merge),
    "download-imagebind": Command("Download Meta's imagebind_huge.pth (resumable).", _download_imagebind_parser,
                                  _run_download_imagebind),
    "download-webvid": Command("Download the WebVid videos that VideoChat-11K uses (resumable).",
                               _download_webvid_parser, _run_download_webvid),
    "demo": Command("The built-in demo: the whole pipeline on tiny stand-ins, on a CPU, no downloads.", _demo_parser,
                    _run_demo),
}


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
        if name == "train":
            return _run_train(argv)
        command = COMMANDS[name]
        args = _parser(name, command).parse_args(list(argv))  # --help and argument errors exit here, fast
        try:
            return command.run(args)
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


__all__ = ["COMMANDS", "CommandError", "main", "run_command"]
