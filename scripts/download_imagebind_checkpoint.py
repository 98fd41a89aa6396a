#!/usr/bin/env python
"""Download Meta's imagebind_huge.pth: the same as `mm-llama download-imagebind` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["download-imagebind", *sys.argv[1:]]))
