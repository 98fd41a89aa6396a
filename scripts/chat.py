#!/usr/bin/env python
"""Chat with an MM-LLaMA model: the same as `mm-llama chat` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
