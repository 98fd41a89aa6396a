#!/usr/bin/env python
"""ImageBind embedding throughput: preprocessing and encoder measured separately.

Preprocessing: images/s of `load_image` on JPEG files and videos/s of `load_video` on H.264 mp4 files, both
generated in a temporary folder (sizes set by --image_hw / --video_hw / --video_seconds). The synthetic media are
smooth moving patterns: random noise would make decoding (especially H.264) several times slower than for real
footage.
Encoder: images/s on `[B, 3, S, S]` and videos/s on `[B, 15, 3, 2, S, S]` (5 clips x 3 crops) for every
combination of --dtypes, --attn and --batch_sizes, random weights of the chosen preset (speed does not depend on
the weight values).

    python scripts/benchmarks/embed_throughput.py                       # tiny preset, CPU
    python scripts/benchmarks/embed_throughput.py --preset huge --batch_sizes 1 --iters 1 --skip_videos
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mm_llama.cli_arguments import DTYPE_CHOICES
from mm_llama.loading import resolve_dtype
from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel, load_image, load_video



def _pattern(height: int, width: int, shift: int) -> np.ndarray:
    """A smooth colour pattern (uint8 [H, W, 3]) moved by `shift` pixels: camera-like content for the codecs."""
    rows, cols = np.mgrid[0:height, 0:width]
    red = 127.5 + 127.5 * np.sin((cols + 3 * shift) / 23.0)
    green = 127.5 + 127.5 * np.cos((rows + 2 * shift) / 17.0)
    blue = (rows + cols + 5 * shift) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _write_jpegs(folder: Path, count: int, height: int, width: int) -> list[Path]:
    from PIL import Image

    paths = []
    for i in range(count):
        path = folder / f"image_{i}.jpg"
        Image.fromarray(_pattern(height, width, 7 * i)).save(path, quality=90)
        paths.append(path)
    return paths


def _write_mp4s(folder: Path, count: int, height: int, width: int, seconds: float, fps: int) -> list[Path]:
    import av

    paths = []
    for i in range(count):
        path = folder / f"video_{i}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for t in range(int(seconds * fps)):
                frame = _pattern(height, width, t + 100 * i)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def _rate(fn, items: int, iters: int, warmup: int, device: torch.device) -> float:
    """Items per second of `fn()` (which processes `items` items), best-of-`iters` after `warmup` runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return items / best


def benchmark_preprocessing(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = _write_jpegs(folder, args.num_images, *args.image_hw)
        cpu = torch.device("cpu")
        rate = _rate(lambda: [load_image(p, args.image_size) for p in images], len(images), args.iters, 1, cpu)
        source = f"{args.image_hw[0]}x{args.image_hw[1]} JPEG -> {args.image_size}"
        print(f"preprocess images ({source}): {rate:8.1f} images/s")
        if args.skip_videos:
            return
        videos = _write_mp4s(folder, args.num_videos, *args.video_hw, args.video_seconds, args.video_fps)
        rate = _rate(lambda: [load_video(p, args.image_size) for p in videos], len(videos), args.iters, 1, cpu)
        print(
            f"preprocess videos ({args.video_hw[0]}x{args.video_hw[1]}, {args.video_seconds:g}s @ {args.video_fps} fps "
            f"mp4 -> 15x2x{args.image_size}^2): {rate:8.2f} videos/s"
        )


@torch.inference_mode()
def benchmark_encoder(args: argparse.Namespace, device: torch.device) -> None:
    config = ImageBindVisionConfig.from_preset(args.preset, image_size=args.image_size)
    base = ImageBindVisionModel(config).eval()
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"encoder: preset {args.preset} ({params:.1f}M parameters), image_size {args.image_size}, device {device}")
    print(f"{'dtype':>9} {'attn':>6} {'batch':>5} {'images/s':>10} {'videos/s':>10}")
    for dtype_name in args.dtypes:
        model = base.to(device=device, dtype=resolve_dtype(dtype_name, device))
        for attn in args.attn:
            model.set_attn_implementation(attn)
            for batch in args.batch_sizes:
                size = args.image_size
                images = torch.randn(batch, 3, size, size, device=device, dtype=model.dtype)
                image_rate = _rate(lambda: model(images), batch, args.iters, args.warmup, device)
                video_rate = float("nan")
                if not args.skip_videos:
                    videos = torch.randn(batch, 15, 3, 2, size, size, device=device, dtype=model.dtype)
                    video_rate = _rate(lambda: model(videos), batch, args.iters, args.warmup, device)
                print(f"{dtype_name:>9} {attn:>6} {batch:>5} {image_rate:10.2f} {video_rate:10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "huge"], default="tiny")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_CHOICES, default=["float32", "bfloat16"])
    parser.add_argument("--attn", nargs="+", choices=["sdpa", "eager"], default=["sdpa", "eager"])
    parser.add_argument("--iters", type=int, default=5, help="Timed runs per setting (the best is reported).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--num_videos", type=int, default=2)
    parser.add_argument("--image_hw", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--video_hw", type=int, nargs=2, default=[360, 640], metavar=("H", "W"))
    parser.add_argument("--video_seconds", type=float, default=10.0)
    parser.add_argument("--video_fps", type=int, default=30)
    parser.add_argument("--skip_preprocessing", action="store_true")
    parser.add_argument("--skip_encoder", action="store_true")
    parser.add_argument("--skip_videos", action="store_true", help="Images only (videos cost 15 images each).")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}")
    if not args.skip_preprocessing:
        benchmark_preprocessing(args)
    if not args.skip_encoder:
        benchmark_encoder(args, torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
