"""Checkpoint conversion: Meta LLaMA-2 `consolidated.NN.pth` folders -> Hugging Face LLaMA folders."""

from . import meta_llama
from .meta_llama import *  # noqa: F401,F403  (the public names are meta_llama.__all__)

__all__ = list(meta_llama.__all__)
