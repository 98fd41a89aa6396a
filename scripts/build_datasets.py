#!/usr/bin/env python
"""Embed the media of LLaVA / VideoChat / JSONL sources with ImageBind into Arrow datasets: the same as
`mm-llama build-datasets` (see its --help). Multi-GPU: `accelerate launch scripts/build_datasets.py ...`."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-datasets", *sys.argv[1:]]))
