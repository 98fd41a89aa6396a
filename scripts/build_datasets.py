#!/usr/bin/env python
"""Builds an MM-LLaMA training dataset (Arrow, with precomputed ImageBind embeddings) from raw sources.

Examples:
    # Stage 1: LLaVA CC3M-595K
    python scripts/build_datasets.py --source llava --json cc3m/chat.json --media-dir cc3m/images \\
        --encoder checkpoints/imagebind_huge --output data/stage1

    # Stage 2: LLaVA-Instruct-150K + VideoChat-11K on every GPU of the machine
    accelerate launch scripts/build_datasets.py \\
        --source llava --json llava_instruct_150k.json --media-dir coco/train2017 \\
        --source videochat --json videochat_instruct_11k.json --media-dir webvid \\
        --max-turns 4 --encoder checkpoints/imagebind_huge --dtype bfloat16 --output data/stage2

Several processes without GPUs: `torchrun --nproc_per_node N scripts/build_datasets.py --cpu ...`.
Each --source takes the next --json and --media-dir (in order). A killed build resumes when re-run with the same
arguments; --overwrite starts again.
"""

from __future__ import annotations

import argparse
import logging
import os

from accelerate import PartialState

from mm_llama.data import DEFAULT_VALIDATION_RATIO, SOURCE_KINDS, SourceSpec, build_dataset, format_summary
from mm_llama.data.embed import DTYPES, load_encoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    encoder.add_argument("--encoder", default=None, help="ImageBindVisionModel checkpoint folder")
    encoder.add_argument("--encoder-preset", default=None, help="random-init preset instead (e.g. tiny, for tests)")
    encoder.add_argument("--image-size", type=int, default=None, help="image size of a random-init preset")
    encoder.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    encoder.add_argument("--cpu", action="store_true",
                         help="run the encoder on CPU even where a GPU exists (and allow several CPU processes)")
    build = parser.add_argument_group("build")
    build.add_argument("--output", required=True, help="output folder (DatasetDict + manifest.json)")
    build.add_argument("--batch-size", type=int, default=32, help="media items per encoder call")
    build.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding media")
    build.add_argument("--shard-size", type=int, default=1024, help="media items per resumable shard")
    build.add_argument("--validation-ratio", type=float, default=DEFAULT_VALIDATION_RATIO,
                       help="fraction of records held out as the validation split (default 0.05, as the original "
                            "MM-LLaMA; the recipes evaluate on it); 0: no validation split")
    build.add_argument("--seed", type=int, default=42, help="split seed (and random-init encoder seed)")
    build.add_argument("--overwrite", action="store_true", help="delete an earlier build in --output and restart")
    build.add_argument("--keep-shards", action="store_true", help="keep the embedding shards after success")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if len(args.json) != len(args.source):
        parser.error(f"give one --json per --source ({len(args.source)} sources, {len(args.json)} --json)")
    if args.media_dir is not None and len(args.media_dir) != len(args.source):
        parser.error(f"give one --media-dir per --source, or none ({len(args.source)} sources, "
                     f"{len(args.media_dir)} --media-dir)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    manifest = build_dataset(
        sources, model, args.output, batch_size=args.batch_size, num_workers=args.num_workers, dtype=args.dtype,
        shard_size=args.shard_size, validation_ratio=args.validation_ratio, seed=args.seed,
        overwrite=args.overwrite, keep_shards=args.keep_shards, progress=not args.no_progress,
        device="cpu" if args.cpu else None,
    )
    if PartialState().is_main_process:
        print(f"Built {args.output}")
        print(format_summary(manifest))


if __name__ == "__main__":
    main()
