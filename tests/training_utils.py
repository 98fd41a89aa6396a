"""Helpers for the training tests: a tiny LLaMA folder, tiny built datasets and recipe runs."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from mm_llama.data import dataset_features
from mm_llama.testing_utils import save_llama_folder, tiny_llama

MEDIA_DIM = 16
COLOURS = ["red", "blue", "green", "yellow"]
QUESTIONS = ["What is shown in this image?", "Which colour is the triangle?", "Describe the video briefly."]


def make_llama_folder(path: Path, spm_model_path: Path, seed: int = 0, pretrain_steps: int = 40) -> Path:
    """A tiny `LlamaForCausalLM` (`mm_llama.testing_utils.tiny_llama`) saved with LLaMA's `tokenizer.model`.

    It is first trained briefly on `make_rows` conversations (placeholders left as `<unk>`), so that, like a real
    LLaMA, it predicts the chat text well and a projector can move the loss and the accuracy on media answers.
    """
    from mm_llama import MMLlamaProcessor, MMLlamaTokenizer
    from mm_llama.data.collator import MMLlamaDataCollator

    model = tiny_llama(seed)
    collator = MMLlamaDataCollator(MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path))),
                                   max_seq_len=None, prompt_loss_weight=1.0)
    rows = make_rows(64, seed=seed + 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(pretrain_steps):
        batch = collator(rows[(step * 8) % 64:(step * 8) % 64 + 8])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_llama_folder(model, spm_model_path, path)


def make_rows(num_rows: int, seed: int = 0, video_share: float = 0.3, multi_turn_share: float = 0.3) -> list[dict]:
    """Conversations whose answer names the colour encoded in the media embedding, so a projector can learn it.

    Rows follow the built-dataset columns: id, messages ({role, content, media_index}), media_types,
    media_embeds [num_media, 1, MEDIA_DIM].
    """
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        colour = rng.randrange(len(COLOURS))
        embed = np.zeros((1, 1, MEDIA_DIM), dtype=np.float32)
        embed[0, 0, colour] = 3.0
        embed[0, 0, len(COLOURS):] = np.asarray([rng.gauss(0, 0.1) for _ in range(MEDIA_DIM - len(COLOURS))])
        media_type = "video" if rng.random() < video_share else "image"
        messages = [
            {"role": "user", "content": rng.choice(QUESTIONS), "media_index": 0},
            {"role": "assistant", "content": f"It is {COLOURS[colour]}.", "media_index": None},
        ]
        if rng.random() < multi_turn_share:
            messages += [
                {"role": "user", "content": "How many shapes are there?", "media_index": None},
                {"role": "assistant", "content": f"There are {rng.randrange(2, 9)} shapes.", "media_index": None},
            ]
        rows.append({"id": f"row-{index}", "messages": messages, "media_types": [media_type], "media_embeds": embed})
    return rows


def make_dataset_folder(path: Path, num_train: int = 32, num_validation: int = 8, seed: int = 0) -> Path:
    """A built-dataset folder (DatasetDict with train/validation) of `make_rows` conversations."""
    features = dataset_features(tokens_per_media=1, dim=MEDIA_DIM)
    rows = make_rows(num_train + num_validation, seed=seed)
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:num_train], features=features),
            "validation": Dataset.from_list(rows[num_train:], features=features),
        }
    ).save_to_disk(str(path))
    return Path(path)


def stage1_args(llama_dir: Path, dataset_dirs: list[Path], output_dir: Path, **overrides) -> list[str]:
    """Command-line arguments of a tiny float32 stage-1 run on CPU."""
    args = {
        "model_name_or_path": llama_dir,
        "stage": 1,
        "media_embed_dim": MEDIA_DIM,
        "dtype": "float32",
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 8,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "max_seq_len": 128,
    }
    args.update(overrides)
    argv = []
    for key, value in args.items():
        if key == "dataset_paths":
            continue
        argv += [f"--{key}", str(value)]
    return argv + ["--dataset_paths", *map(str, dataset_dirs)]


def stage2_args(stage1_dir: Path, dataset_dirs: list[Path], output_dir: Path, **overrides) -> list[str]:
    """Command-line arguments of a tiny float32 stage-2 (LoRA) run on CPU."""
    defaults = {"model_name_or_path": stage1_dir, "stage": 2, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2}
    defaults.update(overrides)
    return stage1_args(stage1_dir, dataset_dirs, output_dir, **defaults)


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter, by name."""
    return {name: param.detach().clone().float() for name, param in model.named_parameters()}


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run fastest on one thread; several threads fight over the CI machine's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, spm_model_path) -> Path:
    with one_torch_thread():
        return make_llama_folder(tmp_path_factory.mktemp("llama"), spm_model_path)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    return make_dataset_folder(tmp_path_factory.mktemp("dataset") / "tiny", num_train=32, num_validation=8)


@pytest.fixture(scope="session")
def stage1_dir(tmp_path_factory, llama_dir, dataset_dir) -> Path:
    """The output folder of a short stage-1 run (the starting point of stage 2)."""
    from mm_llama.training import train

    output_dir = tmp_path_factory.mktemp("stage1") / "out"
    with one_torch_thread():
        train(stage1_args(llama_dir, [dataset_dir], output_dir, max_steps=4))
    return output_dir
