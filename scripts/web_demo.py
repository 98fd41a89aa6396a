#!/usr/bin/env python
"""Browser chat demo (Gradio) for an MM-LLaMA model: the same as `mm-llama web` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["web", *sys.argv[1:]]))
