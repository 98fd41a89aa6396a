#!/usr/bin/env python
"""Convert a Meta LLaMA-2 download (`consolidated.NN.pth`, `params.json`, `tokenizer.model`) to a Hugging Face folder.

    python scripts/convert_meta_checkpoint.py --input_dir llama/llama-2-7b-chat --output_dir llama-2-7b-chat-hf

Meta's download script puts `tokenizer.model` beside the model folders (`llama/tokenizer.model`); it is found there
or inside `--input_dir`, or given with `--tokenizer_path`. The output loads with
`LlamaForCausalLM.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mm_llama.conversion.meta_llama import DTYPES, LLAMA2_MAX_POSITION_EMBEDDINGS, convert_meta_llama


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the converter."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="Meta model folder with params.json and consolidated.*.pth")
    parser.add_argument("--output_dir", required=True, help="Hugging Face output folder")
    parser.add_argument(
        "--tokenizer_path",
        default=None,
        help="Meta's tokenizer.model (or its folder); default: --input_dir, then its parent folder",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="largest weight file, e.g. 5GB or 2GiB")
    parser.add_argument(
        "--max_position_embeddings",
        type=int,
        default=LLAMA2_MAX_POSITION_EMBEDDINGS,
        help="context length (not stored in params.json; LLaMA-2: 4096)",
    )
    parser.add_argument(
        "--no_safe_serialization",
        dest="safe_serialization",
        action="store_false",
        help="write PyTorch .bin files instead of safetensors",
    )
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (errors are printed, not raised, for a clean CLI)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output = convert_meta_llama(
            args.input_dir,
            args.output_dir,
            tokenizer_path=args.tokenizer_path,
            dtype=args.dtype,
            safe_serialization=args.safe_serialization,
            max_shard_size=args.max_shard_size,
            max_position_embeddings=args.max_position_embeddings,
            progress=args.progress,
        )
    except (FileNotFoundError, ValueError) as err:  # MetaCheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Saved the Hugging Face model to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
