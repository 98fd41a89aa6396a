#!/usr/bin/env python
"""Chat with an MM-LLaMA model (the original's chat_completion.py), on CPU or GPU.

Interactive (stdin; /image PATH, /video PATH, /reset, /quit; history kept across turns):
  python scripts/chat.py outputs/mm-llama-merged --imagebind checkpoints/imagebind_huge_hf
One-shot:
  python scripts/chat.py MODEL --prompt "What is in the image?" --image cat.jpg
Batched one-shot prompts (JSONL lines {"prompt", "image"|"video"?, "system"?, "id"?}; left-padded batches):
  python scripts/chat.py MODEL --batch_file prompts.jsonl --output answers.jsonl

MODEL is a merged or stage-1 folder, or a stage-2 adapter folder. Media are raw image/video files (embedded by the
model's vision tower, or by --imagebind when the model has none) or precomputed embedding files (.pt/.npy/.safetensors
holding a [1024] or [1, 1024] vector). --temperature 0 decodes greedily.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_llama.inference import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="MM-LLaMA model folder (merged, stage-1, or stage-2 adapter)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print the answer as it is generated (interactive and one-shot modes)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="one-shot: answer this message and exit")
    mode.add_argument("--batch_file", help="one-shot prompts from a JSONL file, answered in batches")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", help="one-shot: image file or embedding file for --prompt")
    media.add_argument("--video", help="one-shot: video file or embedding file for --prompt")
    parser.add_argument("--batch_size", type=int, default=8, help="--batch_file: prompts per batch")
    parser.add_argument("--output", help="--batch_file: JSONL to write (default: stdout)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--load_in_4bit", action="store_true", help="quantise the language model to 4-bit (nf4)")
    parser.add_argument("--imagebind", help="ImageBind model folder, to embed raw media for a model without a tower")
    parser.add_argument("--base_model", help="stage-1 folder for a stage-2 adapter MODEL, if not the recorded one")
    args = parser.parse_args(argv)
    if (args.image or args.video) and not args.prompt:
        parser.error("--image/--video go with --prompt (in interactive mode, use /image PATH).")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_llama import inference
    from mm_llama.imagebind import MediaLoadError

    try:
        media_path = args.image or args.video
        if media_path and not Path(media_path).is_file():  # fail before spending minutes loading a 7B model
            raise MediaLoadError(f"{'Image' if args.image else 'Video'} file {media_path!r} does not exist; check the path.")
        model, processor = inference.load_model_for_chat(
            args.model, device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
            base_model=args.base_model,
        )
        embedder = inference.MediaEmbedder.for_model(model, processor, imagebind=args.imagebind,
                                                     device=args.device, dtype=args.dtype)
        settings = inference.GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
        session = inference.ChatSession(model, processor, embedder, settings, system=args.system)
        if args.batch_file:
            return run_batch_file(args, model, processor, embedder, settings)
        if args.prompt is not None:
            if args.image or args.video:
                session.attach("image" if args.image else "video", args.image or args.video)
            if args.stream:
                session.respond(args.prompt, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
                print()
            else:
                print(session.respond(args.prompt))
            return 0
    except (MediaLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    inference.run_interactive(session, sys.stdin, sys.stdout, sys.stderr, stream=args.stream,
                              show_prompt=sys.stdin.isatty())
    return 0


def run_batch_file(args, model, processor, embedder, settings) -> int:
    from mm_llama import inference

    rows = inference.read_jsonl(args.batch_file)
    conversations = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{args.batch_file}, row {number}: needs a string 'prompt'.")
        if row.get("image") and row.get("video"):
            raise ValueError(f"{args.batch_file}, row {number}: give 'image' or 'video', not both.")
        media_type = "image" if row.get("image") else "video" if row.get("video") else None
        media = {"type": media_type, "path": row[media_type]} if media_type else None
        conversations.append(inference.prompt_conversation(row["prompt"], media, row.get("system", args.system)))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        def write(start: int, answers: list[str]) -> None:
            for offset, answer in enumerate(answers):
                row = rows[start + offset]
                record = {"id": row.get("id", start + offset), "prompt": row["prompt"], "response": answer}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()

        inference.generate_batched(model, processor, embedder, conversations, settings, args.batch_size, on_batch=write)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
