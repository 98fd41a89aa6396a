#!/usr/bin/env python
"""Downloads Meta's `imagebind_huge.pth` (about 4.5 GB); an interrupted download resumes where it stopped.

    python scripts/download_imagebind_checkpoint.py --output checkpoints/imagebind_huge.pth
"""

from __future__ import annotations

import argparse
import sys

from mm_llama.imagebind import IMAGEBIND_HUGE_URL, DownloadError, download_imagebind_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="imagebind_huge.pth", help="Destination file.")
    parser.add_argument("--url", default=IMAGEBIND_HUGE_URL, help="Source URL (Meta's public URL by default).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Network timeout in seconds.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    args = parser.parse_args(argv)
    try:
        path = download_imagebind_checkpoint(args.output, args.url, timeout=args.timeout, progress=not args.no_progress)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
