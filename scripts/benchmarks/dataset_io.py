#!/usr/bin/env python
"""Benchmark: opening a built dataset and reading a random batch, Arrow (ours) vs a pickled list (the original).

For each size N, writes N synthetic records twice:
  - arrow:  our built-dataset layout (`datasets.save_to_disk`, columns id/messages/media_types/media_embeds
            [1, 1, 1024] float32), opened with `load_from_disk` (memory-mapped);
  - pickle: the original MM-LLaMA approach, a pickled Python list of numpy arrays (token ids int64 + one 1024-d
            float32 embedding per record), loaded whole into memory with `pickle.load`.
Each measurement runs in a fresh Python process: time to open, time to read a random batch (median of repeats),
peak RSS, peak RSS above the process's RSS after imports, and anonymous RSS at the end (memory the process owns;
file pages of a memory map are not in it and the kernel can drop them). The files are fresh in the page cache (warm).

    python scripts/benchmarks/dataset_io.py --sizes 10000 100000 600000 --output dataset_io.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EMBED_DIM = 1024
TOKENS_PER_RECORD = 96  # a CC3M-like sample: short caption question + answer in LLaMA tokens


def synthetic_batch(start: int, count: int, rng: np.random.Generator) -> dict[str, list]:
    """Columns of `count` synthetic CC3M-like records (ids start..start+count-1)."""
    return {
        "id": [f"{i:09d}" for i in range(start, start + count)],
        "messages": [
            [{"role": "user", "content": f"Describe the image briefly. ({i})", "media_index": 0},
             {"role": "assistant", "content": "A photo of a dog running across a grassy field in the sun.",
              "media_index": None}]
            for i in range(start, start + count)
        ],
        "media_types": [["image"]] * count,
        "media_embeds": list(rng.standard_normal((count, 1, 1, EMBED_DIM), dtype=np.float32)),
    }


def write_arrow(path: Path, size: int, chunk: int = 10_000) -> None:
    """Our layout: written in chunks with `ArrowWriter`, then `save_to_disk` as the builder does."""
    from datasets import Dataset, disable_progress_bars
    from datasets.arrow_writer import ArrowWriter

    from mm_llama.data import dataset_features

    disable_progress_bars()
    rng = np.random.default_rng(0)
    raw = path.with_suffix(".arrow")
    writer = ArrowWriter(features=dataset_features(), path=str(raw), writer_batch_size=chunk)
    for start in range(0, size, chunk):
        writer.write_batch(synthetic_batch(start, min(chunk, size - start), rng))
    writer.finalize()
    Dataset.from_file(str(raw)).save_to_disk(str(path))
    raw.unlink()


def write_pickle(path: Path, size: int, chunk: int = 10_000) -> None:
    """The original layout: one pickled list of (token ids, embedding) numpy arrays."""
    rng = np.random.default_rng(0)
    records = []
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        ids = rng.integers(0, 32000, (count, TOKENS_PER_RECORD), dtype=np.int64)
        embeds = rng.standard_normal((count, 1, EMBED_DIM), dtype=np.float32)
        records.extend((ids[i].copy(), embeds[i].copy()) for i in range(count))
    with path.open("wb") as f:
        pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)


# Runs in a fresh process: prints one JSON line of measurements.
_MEASURE = r"""
import json, pickle, sys, time
import numpy as np
kind, path, batch_size, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "arrow":
    from datasets import load_from_disk
def rss_mb():
    # VmHWM (peak resident set) of this process; unlike ru_maxrss it is not inherited across exec from the parent.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
def anon_mb():
    # Anonymous (heap) memory now: what the process really owns; file-backed pages of a memory map are not in it.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
base = rss_mb()
start = time.perf_counter()
if kind == "arrow":
    data = load_from_disk(path).with_format("numpy")
else:
    with open(path, "rb") as f:
        data = pickle.load(f)
opened = time.perf_counter() - start
rng = np.random.default_rng(1)
times = []
for _ in range(repeats):
    indices = rng.choice(len(data), batch_size, replace=False)
    start = time.perf_counter()
    if kind == "arrow":
        batch = data[indices.tolist()]
        embeds = np.concatenate(batch["media_embeds"])
    else:
        embeds = np.stack([data[i][1] for i in indices])
    assert embeds.shape[0] == batch_size
    times.append(time.perf_counter() - start)
print(json.dumps({"open_s": opened, "batch_ms_median": 1000 * float(np.median(times)),
                  "batch_ms_first": 1000 * times[0], "peak_rss_mb": rss_mb(), "rss_above_imports_mb": rss_mb() - base,
                  "anon_mb": anon_mb()}))
"""


def measure(kind: str, path: Path, batch_size: int, repeats: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(path), str(batch_size), str(repeats)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 600_000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="random batches read per measurement")
    parser.add_argument("--workdir", default=None, help="where the synthetic data go (default: a temp folder)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dataset_io_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| records | format | write s | disk MB | open s | random batch ms (median) | peak RSS MB "
          "| peak RSS above imports MB | anonymous RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for size in args.sizes:
            for kind, writer, path in (("arrow", write_arrow, workdir / f"arrow_{size}"),
                                       ("pickle", write_pickle, workdir / f"pickle_{size}.pkl")):
                start = time.perf_counter()
                writer(path, size)
                written = time.perf_counter() - start
                row = {"records": size, "format": kind, "write_s": written, "disk_mb": disk_mb(path),
                       **measure(kind, path, args.batch_size, args.repeats)}
                results.append(row)
                print(f"| {size} | {kind} | {written:.1f} | {row['disk_mb']:.0f} | {row['open_s']:.3f} | "
                      f"{row['batch_ms_median']:.2f} | {row['peak_rss_mb']:.0f} | {row['rss_above_imports_mb']:.0f} | "
                      f"{row['anon_mb']:.0f} |",
                      flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
