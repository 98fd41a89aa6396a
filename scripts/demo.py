#!/usr/bin/env python
"""The built-in demo on tiny stand-ins (CPU, no downloads): the same as `mm-llama demo` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
