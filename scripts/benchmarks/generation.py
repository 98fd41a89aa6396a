#!/usr/bin/env python
"""Generation speed: eager vs static-cache vs compiled decoding (`mm_llama.generation.DecodingOptions`), through the
project's one decoding route (`generation.generate_tokens`), on random weights.

    python scripts/benchmarks/generation.py                     # a GPU: LLaMA-2-7B shapes in bfloat16
    python scripts/benchmarks/generation.py --tiny --threads 1  # the CPU figure: a tiny, launch-bound model

For each route and batch size (default 1, 8, 32): the first answer (which includes any compilation), then
`--repeats` timed answers of exactly `--new_tokens` greedy tokens after a `--prompt_length`-token prompt:
  - ttft_s: time to first token (the prefill; what a chat user waits for before text appears),
  - step_ms: per decoding step after the first token (launch-bound when it does not grow with the batch),
  - tokens_per_s: batch x new tokens / the whole answer time,
  - identical_to_eager: whether the greedy tokens equal the eager route's (bfloat16 kernels may differ on a GPU).
Prints one JSON object (also written to --output).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import build_model

from mm_llama.generation import DecodingOptions, generate_tokens

ROUTES = ("eager", "static", "compiled")


class TokenClock:
    """A streamer that timestamps tokens: `generate` puts the prompt first, then each step's new tokens."""

    def __init__(self):
        self.start = time.perf_counter()
        self.puts: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass


def route_arguments(route: str, new_tokens: int, pad_token_id: int) -> tuple[dict[str, Any], DecodingOptions]:
    """`generate` keyword arguments and decoding options of a route: exactly `new_tokens` greedy tokens."""
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                "pad_token_id": pad_token_id}
    if route == "static":
        settings["cache_implementation"] = "static"
    return settings, DecodingOptions(compile=route == "compiled")


def timed_answer(model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: dict[str, Any],
                 options: DecodingOptions) -> tuple[dict[str, float], torch.Tensor]:
    """One answer: ({"total_s", "ttft_s", "step_ms"}, new tokens `[batch, new_tokens]`)."""
    clock = TokenClock()
    tokens = generate_tokens(model, None, inputs, {**settings, "streamer": clock}, decoding=options)
    end = time.perf_counter()
    first = clock.puts[1]  # puts[0] is the prompt
    steps = max(tokens.shape[1] - 1, 1)
    return {"total_s": end - clock.start, "ttft_s": first - clock.start,
            "step_ms": (end - first) / steps * 1000}, tokens


def measure_route(model: torch.nn.Module, route: str, batch_size: int, args: argparse.Namespace,
                  reference: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    vocab = model.config.text_config.vocab_size
    input_ids = torch.randint(3, vocab, (batch_size, args.prompt_length), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    settings, options = route_arguments(route, args.new_tokens, pad_token_id=2)
    first, tokens = timed_answer(model, inputs, settings, options)
    runs = [timed_answer(model, inputs, settings, options)[0] for _ in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result = {"first_answer_s": round(first["total_s"], 3), "first_ttft_s": round(first["ttft_s"], 3),
              "ttft_s": round(median["ttft_s"], 4), "step_ms": round(median["step_ms"], 3),
              "tokens_per_s": round(batch_size * args.new_tokens / median["total_s"], 1)}
    if reference is not None:
        result["identical_to_eager"] = bool(torch.equal(tokens.cpu(), reference.cpu()))
    return result, tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny launch-bound model (default off a GPU)")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="the model's depth (default: 2 for --tiny, 32 for LLaMA-2-7B shapes); the CPU figure of "
                             "docs/generation.md uses --tiny --num_layers 32, where per-layer launch costs dominate")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--prompt_length", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(tiny, device, dtype, args.num_layers).eval()
    # The builder's config is a training one (use_cache False); decoding uses the KV cache.
    model.config.text_config.use_cache = model.generation_config.use_cache = True
    model.generation_config.eos_token_id = 2
    results: dict[str, Any] = {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": f"{'tiny, hidden 64' if tiny else 'LLaMA-2-7B shapes (random weights)'}, "
                 f"{model.config.text_config.num_hidden_layers} layers", "dtype": str(dtype),
        "torch": torch.__version__, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "runs": {}}
    for batch_size in args.batch_sizes:
        reference = None
        for route in args.routes:
            result, tokens = measure_route(model, route, batch_size, args, reference)
            reference = tokens if route == "eager" else reference
            results["runs"][f"{route}_batch{batch_size}"] = result
            print(f"{route:>8} batch {batch_size:>2}: {result}", file=sys.stderr, flush=True)
        for route in set(args.routes) - {"eager"}:
            if "eager" in args.routes:
                speedup = results["runs"][f"eager_batch{batch_size}"]["step_ms"] / \
                    results["runs"][f"{route}_batch{batch_size}"]["step_ms"]
                results["runs"][f"{route}_batch{batch_size}"]["step_speedup_vs_eager"] = round(speedup, 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
