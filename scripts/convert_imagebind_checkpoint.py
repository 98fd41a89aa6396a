#!/usr/bin/env python
"""Converts Meta's `imagebind_huge.pth` into an `ImageBindVisionModel` folder (safetensors, vision weights only).

    python scripts/convert_imagebind_checkpoint.py --checkpoint imagebind_huge.pth --output_dir imagebind-huge-vision

The folder loads with `ImageBindVisionModel.from_pretrained` and `ImageBindProcessor.from_pretrained`.
"""

from __future__ import annotations

import argparse
import sys

from mm_llama.dtypes import DTYPES
from mm_llama.imagebind import ImageBindVisionConfig, convert_imagebind_checkpoint



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Meta's imagebind_huge.pth (flat state dict).")
    parser.add_argument("--output_dir", required=True, help="Folder to write config.json + model.safetensors into.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Dtype of the saved weights.")
    parser.add_argument(
        "--preset",
        choices=["huge", "tiny"],
        default=None,
        help="Architecture preset; inferred from the weight shapes when omitted.",
    )
    parser.add_argument("--image_size", type=int, default=None, help="Override the preset's image size.")
    args = parser.parse_args(argv)

    config = None
    if args.preset is not None:
        overrides = {} if args.image_size is None else {"image_size": args.image_size}
        config = ImageBindVisionConfig.from_preset(args.preset, **overrides)
    try:
        output = convert_imagebind_checkpoint(
            args.checkpoint, args.output_dir, config=config, dtype=DTYPES[args.dtype]
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
