#!/usr/bin/env python
"""Download the WebVid videos of VideoChat-11K: the same as `mm-llama download-webvid` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["download-webvid", *sys.argv[1:]]))
