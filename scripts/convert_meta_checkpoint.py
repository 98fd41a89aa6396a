#!/usr/bin/env python
"""Meta LLaMA-2 checkpoint -> Hugging Face folder: the same as `mm-llama convert-meta` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-meta", *sys.argv[1:]]))
