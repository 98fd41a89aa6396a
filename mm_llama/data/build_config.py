"""`BuildConfig`: the options of a dataset build, declared once.

`build_dataset` takes it, the manifest records it, and `HfArgumentParser(BuildConfig)` turns it into command-line
flags (each field's `help` is its flag's help). This module imports nothing but the standard library, so that a
command's `--help` can read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The original MM-LLaMA holds out 5% of every dataset for validation; the recipes evaluate on that split.
DEFAULT_VALIDATION_RATIO = 0.05
BUILD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BuildConfig:
    """How a dataset build embeds, shards, splits and reports; the sources, encoders and output folder are given to
    `build_dataset` beside it."""

    batch_size: int = field(default=32, metadata={"help": "Media items per encoder call."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader processes decoding media (0: in-process)."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Encoder precision; the embeddings are stored as float32.", "choices": BUILD_DTYPES},
    )
    shard_size: int = field(
        default=1024, metadata={"help": "Media items per shard: the unit of resume and of multi-process work."}
    )
    validation_ratio: float = field(
        default=DEFAULT_VALIDATION_RATIO,
        metadata={"help": "Fraction of records held out as the validation split (0.05 as the original MM-LLaMA; the "
                          "recipes evaluate on it); 0: no validation split."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the train/validation split (and of a random-init encoder preset)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Remove an earlier build's output (finished or not) first and restart; otherwise an "
                          "unfinished build with the same plan is resumed and a finished one is refused."},
    )
    keep_shards: bool = field(
        default=False,
        metadata={"help": "Keep the embedding shards (_shards/) after success, for inspection."},
    )

    def __post_init__(self) -> None:
        # Checked when the options are given, not after reading the sources or hours of embedding.
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be positive, got {self.batch_size} and {self.shard_size}")
        if not 0.0 <= self.validation_ratio < 1.0:
            raise ValueError(f"validation_ratio must be in [0, 1), got {self.validation_ratio}")


__all__ = ["BUILD_DTYPES", "BuildConfig", "DEFAULT_VALIDATION_RATIO"]
