#!/usr/bin/env python
"""The built-in demo: the whole MM-LLaMA pipeline on tiny stand-in models, on a laptop CPU, with no downloads.

    python scripts/demo.py --output demo                 # the full demo (target: < 10 min on 2 CPU cores)
    python scripts/demo.py --output demo-smoke --size smoke   # a faster run (what the tests run)
    python scripts/demo.py --output demo --device cuda   # the same on a GPU

It generates a synthetic corpus (coloured shapes, mp4 clips, upstream-format conversations), makes tiny LLaMA and
ImageBind stand-ins in Meta's checkpoint formats, then runs the real steps (conversion, build_datasets, stage 1 and
stage 2 training with recipes/demo/*.yaml, LoRA merge, generation eval) and prints held-out accuracy per question
type next to chance level.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for every artefact (created; reused files are replaced)")
    parser.add_argument("--size", choices=["tiny", "smoke", "full"], default="full",
                        help="full: README's demo; smoke: ~2-4x faster, used by the tests; tiny: seconds, learns little")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each stage for exactly this many optimizer steps (overrides the size's epochs)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="corpus, stand-in and training seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch CPU threads (default: PyTorch's choice). On a machine shared with other jobs, "
                             "--threads 1 avoids threads waiting on each other and can be many times faster")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding processes of build_datasets")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (summaries only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Hide GPUs before torch is imported, so that the steps that pick "the GPU when present" (build_datasets,
        # the Trainer) stay on the CPU as asked.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from mm_llama.demo.pipeline import DemoConfig, StepError, run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(output=args.output, size=args.size, steps=args.steps, device=args.device, seed=args.seed,
                        progress=not args.no_progress, num_workers=args.num_workers)
    try:
        run_demo(config)
    except (StepError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
