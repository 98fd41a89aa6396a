"""Tiny random-init models and the LLaMA-style tokenizer trainer, shared by the tests, the benchmarks and the built-in
demo (`mm-llama demo`), so that each builds its stand-ins one way.

- `train_tokenizer`: a sentencepiece BPE `tokenizer.model` with Meta's LLaMA settings, from any text;
  `train_tiny_tokenizer`: one trained on a small built-in English + chat-markup corpus (the tests' tokenizer).
- `tiny_llama_config_kwargs` / `tiny_llama_config` / `tiny_llama`: a 2-layer, 64-wide `LlamaForCausalLM`.
- `tiny_mm_llama`: an `MMLlamaForCausalLM` around a tiny LLaMA (optionally with a vision tower).
- `tiny_imagebind`: the "tiny" preset of `ImageBindVisionModel`.
- `save_llama_folder`: a LLaMA saved with `save_pretrained` plus its `tokenizer.model`, the layout
  `mm-llama train --model_name_or_path` reads.

Builders take a `seed` (`torch.manual_seed` right before the weights are drawn; None leaves the global RNG alone) so
that the same call gives the same weights. `import mm_llama` does not import this module; it imports torch,
transformers and sentencepiece only inside the functions that need them.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .imagebind import ImageBindVisionModel
    from .model.modeling_mm_llama import MMLlamaForCausalLM


# ================================================================================================ tokenizer
def train_tokenizer(text: str | os.PathLike | Iterable[str], output_dir: str | os.PathLike,
                    vocab_size: int = 512) -> Path:
    """Trains a BPE sentencepiece model with Meta's LLaMA settings; writes `output_dir/tokenizer.model`, returns it.

    `text` is a text file (one sentence per line) or an iterable of lines. LLaMA's settings: BPE, byte fallback
    (256 byte pieces, so any text encodes), digits split, unk=0 "<unk>", bos=1 "<s>", eos=2 "</s>", no pad,
    identity normalisation, whitespace kept, dummy prefix. Deterministic for the same lines and vocabulary size.
    """
    import sentencepiece as spm

    if isinstance(text, (str, os.PathLike)):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file to train the tokenizer on.")
        with path.open(encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        lines = list(text)
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError("The tokenizer's training text is empty; give at least one non-blank line.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, max_sentence_length=8192, minloglevel=2,
    )
    path = output_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


# Text with what a LLaMA tokenizer must survive: runs of spaces, newlines, tabs, non-ASCII, the chat and media markers.
TINY_TOKENIZER_LINES = (
    "What is shown in this image? A red circle on a blue background.",
    "Describe the video briefly.  A green square moves from left to right.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello there [/INST] Hi! How can I help?",
    "<<IMG>> <</IMG>> <<VID>> <</VID>> the quick brown fox jumps over the lazy dog",
    "Tabs\tand  double  spaces,\nnew lines\n\nand caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \u3053\u3093\u306b\u3061\u306f",
    "Which colour is the triangle? It is yellow. How many shapes are there? There are three shapes.",
)


def train_tiny_tokenizer(output_dir: str | os.PathLike, vocab_size: int = 320, seed: int = 0) -> Path:
    """`train_tokenizer` on `TINY_TOKENIZER_LINES` (20 copies) and 400 random 12-word lines of their words (drawn
    with `seed`); returns `output_dir/tokenizer.model`."""
    rng = random.Random(seed)
    words = " ".join(TINY_TOKENIZER_LINES).split()
    lines = list(TINY_TOKENIZER_LINES) * 20 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    return train_tokenizer(lines, output_dir, vocab_size=vocab_size)


# ================================================================================================ tiny LLaMA
def tiny_llama_config_kwargs(vocab_size: int = 320, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                             intermediate_size: int | None = None, max_position_embeddings: int = 512) -> dict:
    """Keyword arguments of a tiny `LlamaConfig`: LLaMA-2's token ids (bos 1, eos 2, no pad), untied embeddings,
    `num_heads` query and key/value heads, an MLP twice as wide as the model unless `intermediate_size` is given."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def tiny_llama_config(vocab_size: int = 320, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int | None = None, max_position_embeddings: int = 512,
                      **overrides: Any) -> LlamaConfig:
    """The `LlamaConfig` of `tiny_llama_config_kwargs`, with any other `LlamaConfig` field in `overrides`
    (`initializer_range`, `use_cache`, ...)."""
    from transformers import LlamaConfig

    sizes = tiny_llama_config_kwargs(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                                     max_position_embeddings)
    return LlamaConfig(**{**sizes, **overrides})


def tiny_llama(seed: int | None = 0, config: LlamaConfig | None = None, **config_kwargs: Any) -> LlamaForCausalLM:
    """A random-init `LlamaForCausalLM` of `config` (default: `tiny_llama_config(**config_kwargs)`), in train mode."""
    import torch
    from transformers import LlamaForCausalLM

    config = config if config is not None else tiny_llama_config(**config_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_llama_folder(model: LlamaForCausalLM, tokenizer_model: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`model.save_pretrained(path)` plus a copy of LLaMA's sentencepiece `tokenizer_model` beside it: the folder
    layout of a converted LLaMA-2 checkpoint, which `mm-llama train --model_name_or_path` reads."""
    path = Path(path)
    model.save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return path


# ================================================================================================ tiny MM-LLaMA
def tiny_mm_llama(seed: int | None = 0, media_embed_dim: int = 16, text_config: LlamaConfig | None = None,
                  attn_implementation: str | None = None, **config_kwargs: Any) -> MMLlamaForCausalLM:
    """A random-init `MMLlamaForCausalLM` (train mode) around `text_config` (default: `tiny_llama_config()`), reading
    `media_embed_dim`-wide media embeddings; `config_kwargs` go to `MMLlamaConfig` (`projector_type`,
    `tokens_per_media`, `vision_config`, ...). `attn_implementation` ("sdpa", "eager", "flash_attention_2") is set
    on the model and its language model before the weights are built."""
    import torch

    from .model.configuration_mm_llama import MMLlamaConfig
    from .model.modeling_mm_llama import MMLlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    config = MMLlamaConfig(text_config=text_config if text_config is not None else tiny_llama_config(),
                           media_embed_dim=media_embed_dim, **config_kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
    return MMLlamaForCausalLM(config)


# ================================================================================================ tiny ImageBind
def tiny_imagebind(image_size: int = 32, seed: int | None = 0, **config_overrides: Any) -> ImageBindVisionModel:
    """A random-init `ImageBindVisionModel` of the "tiny" preset (2 layers, 64 wide, 1024-d embeddings like huge) for
    `image_size`-pixel inputs, in train mode; `config_overrides` are `ImageBindVisionConfig` fields."""
    import torch

    from .imagebind import ImageBindVisionConfig, ImageBindVisionModel

    if seed is not None:
        torch.manual_seed(seed)
    return ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=image_size, **config_overrides))


__all__ = [
    "TINY_TOKENIZER_LINES", "save_llama_folder", "tiny_imagebind", "tiny_llama", "tiny_llama_config",
    "tiny_llama_config_kwargs", "tiny_mm_llama", "train_tiny_tokenizer", "train_tokenizer",
]
