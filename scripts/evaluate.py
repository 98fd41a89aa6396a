#!/usr/bin/env python
"""Evaluate an MM-LLaMA model: the same as `mm-llama evaluate` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
