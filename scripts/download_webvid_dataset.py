#!/usr/bin/env python
"""Downloads the WebVid videos that VideoChat-11K uses (only those), resumably and in parallel.

Example:
    python scripts/download_webvid_dataset.py --videochat-json videochat_instruct_11k.json \\
        --metadata results_10M_train.csv --output webvid

Re-running skips videos already downloaded; failures are listed in <output>/download_failures.json.
"""

from __future__ import annotations

import argparse
import sys

from mm_llama.data.webvid import OfflineError, download_webvid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videochat-json", required=True, help="videochat_instruct_11k.json")
    parser.add_argument("--metadata", required=True, help="WebVid-10M metadata CSV (videoid, contentUrl, page_dir)")
    parser.add_argument("--output", required=True, help="folder receiving the videos")
    parser.add_argument("--layout", default="folder", choices=("folder", "flat"),
                        help="folder: <page_dir>/<videoid>.mp4 as the JSON names them; flat: <videoid>.mp4")
    parser.add_argument("--threads", type=int, default=16, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=3, help="retries per video on transient errors")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--failures-json", default=None, help="default: <output>/download_failures.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = download_webvid(
            args.videochat_json, args.metadata, args.output, layout=args.layout, failures_json=args.failures_json,
            num_threads=args.threads, retries=args.retries, backoff=args.backoff, timeout=args.timeout,
        )
    except OfflineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"needed {report.needed}: downloaded {report.downloaded}, already present {report.skipped_existing}, "
          f"failed {len(report.failed)}, not in metadata {len(report.missing_in_metadata)}")
    if report.failed or report.missing_in_metadata:
        print(f"see {args.failures_json or args.output + '/download_failures.json'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
