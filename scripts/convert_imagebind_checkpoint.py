#!/usr/bin/env python
"""Meta's imagebind_huge.pth -> ImageBind model folder: the same as `mm-llama convert-imagebind` (see its --help)."""

import sys

from mm_llama.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-imagebind", *sys.argv[1:]]))
