"""Smoke test of scripts/benchmarks/embed_throughput.py with the tiny preset and minimal settings."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmarks" / "embed_throughput.py"


def test_benchmark_reports_every_setting(capsys):
    spec = importlib.util.spec_from_file_location("embed_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [
        "--image_size", "28", "--batch_sizes", "1", "2", "--iters", "1", "--warmup", "0",
        "--num_images", "2", "--num_videos", "1", "--image_hw", "40", "60", "--video_hw", "48", "64",
        "--video_seconds", "1", "--video_fps", "10",
    ]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"preprocess images .*: +[\d.]+ images/s", out)
    assert re.search(r"preprocess videos .*: +[\d.]+ videos/s", out)
    rows = re.findall(r"^\s*(float32|bfloat16)\s+(sdpa|eager)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert len(rows) == 2 * 2 * 2  # dtypes x attention x batch sizes
    assert all(float(images) > 0 and float(videos) > 0 for *_, images, videos in rows)
