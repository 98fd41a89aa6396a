#!/usr/bin/env python
"""Converts MM-LLaMA training outputs.

  stage-2 output (PEFT LoRA adapter + projector)  ->  one merged MMLlamaForCausalLM folder (loads with
                                                      AutoModelForCausalLM.from_pretrained; same logits)
  stage-1 output (full model)                     ->  the stage-2 starting point (fresh LoRA adapter folder)

Examples:
  python scripts/convert_lora_checkpoint.py outputs/stage2 outputs/mm-llama-merged [--push_to_hub me/mm-llama]
  python scripts/convert_lora_checkpoint.py outputs/stage1 outputs/stage2-start --lora_r 8
"""

from __future__ import annotations

import argparse
import sys

from mm_llama.inference import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="stage-2 output (adapter) or stage-1 output (full model) folder")
    parser.add_argument("output_dir", help="folder to write (created)")
    parser.add_argument("--mode", choices=["auto", "merge", "stage2-start"], default="auto",
                        help="auto: merge an adapter folder, make a stage-2 start from a full model folder")
    parser.add_argument("--base_model", help="merge: the stage-1 folder, if the adapter's recorded one is not here")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="merge: dtype to merge and save in (default: as saved)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="merge: also upload the merged folder to this Hub repo")
    parser.add_argument("--public", action="store_true", help="with --push_to_hub: create a public repo")
    parser.add_argument("--lora_r", type=int, default=8, help="stage2-start: LoRA rank")
    parser.add_argument("--lora_alpha", type=int, default=16, help="stage2-start: LoRA alpha")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="stage2-start: LoRA dropout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_llama.inference import is_adapter_folder
    from mm_llama.merge import convert_checkpoint

    try:
        merging = args.mode == "merge" or (args.mode == "auto" and is_adapter_folder(args.input_dir))
        if merging:
            kwargs = dict(base_model=args.base_model, dtype=DTYPES[args.dtype] if args.dtype else None,
                          push_to_hub=args.push_to_hub, private=not args.public)
        else:
            kwargs = dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        mode, output = convert_checkpoint(args.input_dir, args.output_dir, mode=args.mode, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{mode}: wrote {output}" + (f" and pushed it to {args.push_to_hub}" if mode == "merge" and args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
