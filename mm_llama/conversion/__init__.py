"""Checkpoint conversion: Meta LLaMA-2 `consolidated.NN.pth` folders -> Hugging Face LLaMA folders
(`meta_checkpoint`: reading and checking Meta's files; `meta_llama`: the weight mapping, writing and the conversion)."""

from . import meta_checkpoint, meta_llama
from .meta_checkpoint import *  # noqa: F401,F403  (the public names are meta_checkpoint.__all__)
from .meta_llama import *  # noqa: F401,F403  (the public names are meta_llama.__all__)

__all__ = [*meta_checkpoint.__all__, *meta_llama.__all__]
