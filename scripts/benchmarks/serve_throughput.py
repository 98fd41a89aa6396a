#!/usr/bin/env python
"""Benchmark: `mm-llama serve` throughput with batching vs `--max_batch_size 1`, under concurrent clients.

For each max batch size, starts `scripts/serve.py` as a subprocess on 127.0.0.1 (greedy, stdin closed, as users run
it), waits for it, sends a few warm-up requests, then `--requests` chat completions from `--clients` concurrent
threads with the official `openai` client (loopback only; it stops by itself), and stops the server with SIGINT.
Reports requests/s, completion tokens/s and latency percentiles, and checks that no request was lost and that every
answer equals the same prompt's answer in the other run (batched greedy == one at a time).

The model is MODEL, or (default) a random-init stand-in built here in a temporary folder with the tests' tiny
tokenizer: `--hidden_size 64 --layers 2` is the built-in demo's LLaMA size. A random model rarely says EOS, so each
answer runs to `--max_tokens`.

    python scripts/benchmarks/serve_throughput.py --requests 32 --clients 16 --output serve_throughput.json
    python scripts/benchmarks/serve_throughput.py --hidden_size 512 --layers 8     # a bigger stand-in
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "bench"


def build_stand_in(folder: Path, hidden_size: int, layers: int, seed: int = 0) -> Path:
    """A random-init stage-1 MM-LLaMA folder (model + processor) of the given width and depth."""
    from mm_llama import MMLlamaProcessor
    from mm_llama.testing_utils import (
        tiny_llama_config,
        tiny_mm_llama,
        train_tiny_tokenizer,
    )
    from mm_llama.model.tokenization_mm_llama import MMLlamaTokenizer

    tokenizer_model = train_tiny_tokenizer(folder / "tokenizer")
    heads = max(1, hidden_size // 64)
    model = tiny_mm_llama(seed, text_config=tiny_llama_config(hidden_size=hidden_size, num_layers=layers,
                                                              num_heads=heads, max_position_embeddings=1024))
    model.eval().save_pretrained(folder / "model")
    MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(tokenizer_model))).save_pretrained(folder / "model")
    return folder / "model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, max_batch_size: int, max_tokens: int, threads: int | None,
                 log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), str(model), "--device", "cpu", "--port",
               str(port), "--max_batch_size", str(max_batch_size), "--temperature", "0", "--max_new_tokens",
               str(max_tokens), "--served_model_name", SERVED_NAME, "--max_queue", "0"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, port


def wait_ready(client, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def run_load(model: Path, max_batch_size: int, prompts: list[str], clients: int, max_tokens: int,
             threads: int | None, work: Path) -> dict:
    """One server run: every prompt once, from `clients` concurrent clients. Returns figures and answers."""
    import openai

    log = work / f"serve_b{max_batch_size}.log"
    process, port = start_server(model, max_batch_size, max_tokens, threads, log)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        wait_ready(client, process, log)

        def ask(prompt: str) -> tuple[str, int, float]:
            started = time.perf_counter()
            answer = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_tokens, temperature=0)
            return answer.choices[0].message.content, answer.usage.completion_tokens, time.perf_counter() - started

        for prompt in prompts[:2]:  # warm-up: first-call allocations are not part of the figures
            ask(prompt)
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, prompts))
        wall = time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    latencies = sorted(latency for _, _, latency in results)
    tokens = sum(count for _, count, _ in results)
    batches = [line for line in log.read_text().splitlines() if "tokens_in=" in line]
    return {
        "max_batch_size": max_batch_size, "requests": len(results), "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1), "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "mean_batch_rows": round(statistics.mean(int(line.split("batch=")[1].split()[0]) for line in batches), 2),
        "answers": [answer for answer, _, _ in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a random stand-in)")
    parser.add_argument("--hidden_size", type=int, default=64, help="stand-in width (the demo's LLaMA: 64)")
    parser.add_argument("--layers", type=int, default=2, help="stand-in depth (the demo's LLaMA: 2)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max_tokens", type=int, default=32, help="answer length of every request")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 1], help="--max_batch_size values")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)

    import torch
    import transformers

    prompts = [f"Question {index}: describe a red circle on a blue background." for index in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        model = args.model or build_stand_in(work, args.hidden_size, args.layers)
        runs = [run_load(model, size, prompts, args.clients, args.max_tokens, args.threads, work)
                for size in args.batch_sizes]
    lost = [run["max_batch_size"] for run in runs if run["requests"] != len(prompts)]
    mismatched = [run["max_batch_size"] for run in runs[1:] if run["answers"] != runs[0]["answers"]]
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": str(args.model) if args.model else f"random stand-in, hidden {args.hidden_size}, {args.layers} layers",
        "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens, "threads": args.threads,
        "runs": [{key: value for key, value in run.items() if key != "answers"} for run in runs],
        "answers_equal_across_runs": not mismatched, "lost_requests": bool(lost),
    }
    if len(runs) > 1:
        report["speedup_requests_per_s"] = round(runs[0]["requests_per_s"] / runs[-1]["requests_per_s"], 2)
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if lost or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
