#!/usr/bin/env python
"""Train a stage: `accelerate launch scripts/train.py recipes/stage1.yaml [--key value ...]`, the same as
`mm-llama train` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
