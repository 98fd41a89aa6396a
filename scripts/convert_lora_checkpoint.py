#!/usr/bin/env python
"""Merge a stage-2 LoRA adapter (or start stage 2 from stage 1): the same as `mm-llama merge` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
