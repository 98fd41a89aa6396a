#!/usr/bin/env python
"""OpenAI-compatible HTTP API server: the same as `mm-llama serve` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
