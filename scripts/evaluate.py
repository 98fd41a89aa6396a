#!/usr/bin/env python
"""Evaluates an MM-LLaMA model and writes the results as JSON.

  loss / token accuracy on a built dataset's split:
    python scripts/evaluate.py MODEL --dataset data/built/llava --split validation --output eval.json
  generation on questions about media (JSONL {"media", "question", "answers": [...]}), exact / contains match:
    python scripts/evaluate.py MODEL --qa_file qa.jsonl --imagebind checkpoints/imagebind_huge_hf --output eval.json
Both can run in one call. MODEL is a merged or stage-1 folder, or a stage-2 adapter folder.
"""

from __future__ import annotations

import argparse
import json
import sys

from mm_llama.inference import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="MM-LLaMA model folder")
    parser.add_argument("--dataset", help="built dataset folder (datasets.save_to_disk) for loss/accuracy")
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
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--load_in_4bit", action="store_true")
    parser.add_argument("--imagebind", help="ImageBind model folder, for raw media when the model has no tower")
    parser.add_argument("--base_model", help="stage-1 folder for a stage-2 adapter MODEL, if not the recorded one")
    args = parser.parse_args(argv)
    if not args.dataset and not args.qa_file:
        parser.error("give --dataset (loss/accuracy), --qa_file (generation), or both.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_llama import evaluation, inference
    from mm_llama.imagebind import MediaLoadError

    try:
        model, processor = inference.load_model_for_chat(args.model, device=args.device, dtype=args.dtype,
                                                         load_in_4bit=args.load_in_4bit, base_model=args.base_model)
        results: dict = {"model": str(args.model)}
        if args.dataset:
            results["loss_eval"] = evaluation.evaluate_loss(
                model, processor, args.dataset, split=args.split, batch_size=args.batch_size,
                max_examples=args.max_examples, train_on=args.train_on, prompt_loss_weight=args.prompt_loss_weight,
                max_seq_len=args.max_seq_len, truncation=args.truncation,
            )
        if args.qa_file:
            embedder = inference.MediaEmbedder.for_model(model, processor, imagebind=args.imagebind,
                                                         device=args.device, dtype=args.dtype)
            results["generation_eval"] = evaluation.evaluate_generation(
                model, processor, embedder, args.qa_file, system=args.system, batch_size=args.batch_size,
                max_examples=args.max_examples,
                settings=inference.GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0),
            )
    except (MediaLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    evaluation.write_results(results, args.output)
    summary = {name: {k: v for k, v in part.items() if k != "examples"} for name, part in results.items()
               if isinstance(part, dict)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
