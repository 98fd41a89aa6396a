"""Helpers of `train_throughput.py` (beside it): a synthetic training set-up and a QLoRA memory calculation (its
measurements are in speed_helpers.py). Benchmark code, kept out of the library."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

_WORDS = ("the a red blue green yellow circle square triangle moves left right over under quickly slowly image video "
          "shows describe what which colour shape many how there is are small large bright dark person dog cat car "
          "street table window tree sky water people walking running sitting holding").split()


def synthetic_setup(folder: Path, num_rows: int = 256, media_dim: int = 1024, hidden_size: int = 64,
                    num_layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random LLaMA folder (with a sentencepiece `tokenizer.model` trained here) and a built-format dataset
    of synthetic conversations of widely varying length (1-4 turns, 3-60 words each). Returns (llama, dataset)."""

    from datasets import Dataset, DatasetDict

    from mm_llama.data import dataset_features
    from mm_llama.testing_utils import save_llama_folder, tiny_llama, train_tokenizer

    rng = random.Random(seed)
    sentence = lambda n: " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_model = train_tokenizer([sentence(rng.randint(5, 30)) for _ in range(2000)]
                                      + ["[INST] <<IMG>> <</IMG>> <<VID>> <</VID>> [/INST]"], folder / "tokenizer")
    heads = max(4, hidden_size // 128)  # LLaMA's head width (128) once the model is wide enough
    llama = tiny_llama(seed, vocab_size=512, hidden_size=hidden_size, num_layers=num_layers, num_heads=heads,
                       max_position_embeddings=2048)
    llama_dir = save_llama_folder(llama, tokenizer_model, folder / "llama")

    rows = []
    for index in range(num_rows):
        messages = []
        for turn in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": sentence(rng.randint(3, 25)), "media_index": 0 if turn == 0
                             else None})
            messages.append({"role": "assistant", "content": " ".join(sentence(rng.randint(3, 20))
                                                                      for _ in range(rng.randint(1, 3))),
                             "media_index": None})
        rows.append({"id": f"synthetic-{index}", "messages": messages, "media_types": [rng.choice(["image", "video"])],
                     "media_embeds": np.random.default_rng(index).standard_normal((1, 1, media_dim), np.float32)})
    features = dataset_features(tokens_per_media=1, dim=media_dim)
    dataset_dir = folder / "dataset"
    DatasetDict({"train": Dataset.from_list(rows, features=features)}).save_to_disk(str(dataset_dir))
    return llama_dir, dataset_dir


def estimate_qlora_stage2_memory_gib(
    batch_size: int = 8, seq_len: int = 512, trained_fraction: float = 1.0, lora_r: int = 64,
    num_lora_targets: int = 2, hidden: int = 4096, intermediate: int = 11008, layers: int = 32, vocab: int = 32000,
    media_dim: int = 1024, cuda_overhead_gib: float = 0.8, loss_chunk_size: int | None = 1024,
) -> dict[str, Any]:
    """CALCULATION (not a measurement) of GPU memory for LLaMA-2-7B QLoRA stage 2 as `recipes/stage2_qlora.yaml`
    sets it up: nf4 + double quant linear layers, embeddings / LM head / norms / projector upcast to fp32 by
    `prepare_model_for_kbit_training`, fp32 LoRA (q/v) + projector with gradients and AdamW states, activation
    checkpointing (one bf16 hidden state kept per layer, one layer's activations live at a time), logits only at
    trained positions (`trained_fraction` of the tokens: ~1.0 when prompt_loss_weight > 0, since prompt text then
    has a loss too). With the chunked loss (`loss_chunk_size`, the default) only one chunk's logits and their
    gradient exist at a time; `None` is the full loss, which holds them for every trained position.
    """
    gib = 2**30
    linear_params = layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    # nf4: 4 bits per weight; double quant: 8-bit absmax per 64 weights + fp32 per 256 absmax = 0.127 bits/weight.
    quantized = linear_params * (4 + 8 / 64 + 32 / (64 * 256)) / 8
    embed_and_head = 2 * vocab * hidden * 4  # fp32 after prepare_model_for_kbit_training
    norms = (2 * layers + 1) * hidden * 4
    projector = (media_dim * hidden + hidden) * 4
    lora = layers * num_lora_targets * 2 * lora_r * hidden
    trainable = lora * 4 + projector
    # Weights: frozen projector copy + trained copy (modules_to_save); trainable also has grads and 2 Adam states.
    weights = quantized + embed_and_head + norms + projector + trainable
    optimizer_and_grads = 3 * trainable
    tokens = batch_size * seq_len
    checkpoints = layers * tokens * hidden * 2
    # One decoder layer recomputed in backward: ~ q,k,v,o + attention out + norms (~8 x hidden) and the MLP's
    # gate/up/act/product (4 x intermediate) in bf16, plus their gradients (x2); a dequantized bf16 weight.
    layer_live = 2 * tokens * (8 * hidden + 4 * intermediate) * 2 + hidden * intermediate * 2
    trained_tokens = tokens * trained_fraction
    live_positions = trained_tokens if loss_chunk_size is None else min(trained_tokens, loss_chunk_size)
    logits = live_positions * vocab * (4 + 4)  # fp32 logits + their gradient in the cross-entropy backward
    parts = {
        "nf4 double-quant linear weights": quantized / gib,
        "fp32 embeddings + LM head + norms": (embed_and_head + norms) / gib,
        "projector (frozen copy + trained copy) + LoRA weights": (projector + trainable) / gib,
        "gradients + AdamW states (trainable only)": optimizer_and_grads / gib,
        "activation checkpoints (bf16 hidden per layer)": checkpoints / gib,
        "one layer recomputed in backward": layer_live / gib,
        "logits (+grad): one loss chunk, or every trained position": logits / gib,
        "CUDA context / allocator slack (assumed)": cuda_overhead_gib,
    }
    return {"batch_size": batch_size, "seq_len": seq_len, "parts_gib": parts,
            "total_gib": sum(parts.values()), "weights_gib": weights / gib}


__all__ = ["estimate_qlora_stage2_memory_gib", "synthetic_setup"]
