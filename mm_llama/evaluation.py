"""Evaluation: loss and next-token accuracy over a built dataset's split, and a generation eval over a JSONL of
questions about media with reference answers (exact-match / contains-match), written as JSON.

Token accuracy is measured as in training: on the tokens that carry a label (the assistant answers and their EOS with
the processor's default `train_on="all"`), the argmax prediction at position t must equal token t+1. The original
MM-LLaMA reported about 70% on its validation split.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .inference import (
    GenerationSettings,
    MediaEmbedder,
    generate_batched,
    infer_media_type,
    prompt_conversation,
    read_jsonl,
)
from .processing_mm_llama import MMLlamaProcessor, TrainOn


# ---------------------------------------------------------------------------------------------------- loss


def load_split(dataset: Any, split: str = "validation"):
    """A split of a built dataset: `dataset` is a `save_to_disk` folder, a `DatasetDict` or a `Dataset`."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if isinstance(dataset, (str, Path)):
        if not Path(dataset).is_dir():
            raise FileNotFoundError(f"Dataset folder {dataset} does not exist; build it with scripts/build_datasets.py.")
        dataset = load_from_disk(str(dataset))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"The dataset has no {split!r} split (it has {sorted(dataset)}); pass --split.")
        dataset = dataset[split]
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    missing = {"messages", "media_types", "media_embeds"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"The dataset lacks the built-dataset columns {sorted(missing)} (see DESIGN.md data flow).")
    return dataset


def _media_embeds_of(rows: dict[str, list]) -> torch.Tensor | None:
    """The batch's media embeddings in placeholder order: `[total_media, tokens_per_media, dim]`, or None."""
    tensors = [torch.as_tensor(np.asarray(embeds, dtype=np.float32)) for embeds, types in
               zip(rows["media_embeds"], rows["media_types"]) if len(types)]
    return torch.cat(tensors) if tensors else None


def evaluate_loss(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    dataset: Any,
    *,
    split: str = "validation",
    batch_size: int = 8,
    max_examples: int | None = None,
    train_on: TrainOn = "all",
) -> dict[str, Any]:
    """Mean next-token loss and accuracy over the labelled tokens of a split, pooled over all its tokens.

    Returns:
        {"split", "num_examples", "num_tokens", "loss", "perplexity", "token_accuracy"}
    """
    rows = load_split(dataset, split)
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    if len(rows) == 0:
        raise ValueError(f"The {split!r} split is empty.")
    device = next(model.parameters()).device
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        records = [
            {"id": row_id, "messages": messages, "media": [{"type": media_type} for media_type in media_types]}
            for row_id, messages, media_types in zip(batch["id"], batch["messages"], batch["media_types"])
        ]
        inputs = processor(records, media_embeds=_media_embeds_of(batch), train_on=train_on, padding_side="right")
        inputs = {name: value.to(device) for name, value in inputs.items()}
        with torch.no_grad():
            output = model(**inputs, logits_for_labels_only=True)
        num_tokens = int(output.num_trained_tokens)
        # The model's loss is this batch's mean; weighting by its token count pools the mean over the whole split.
        total_loss += float(output.loss) * num_tokens
        total_correct += int(output.num_correct_tokens)
        total_tokens += num_tokens
    if total_tokens == 0:
        raise ValueError(f"The {split!r} split has no labelled (assistant) tokens to evaluate.")
    loss = total_loss / total_tokens
    return {
        "split": split,
        "num_examples": len(rows),
        "num_tokens": total_tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "token_accuracy": total_correct / total_tokens,
    }


# ---------------------------------------------------------------------------------------------------- generation


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def score_answer(prediction: str, answers: Sequence[str]) -> dict[str, bool]:
    """exact_match: the normalised prediction equals a normalised reference; contains_match: a (non-empty)
    normalised reference occurs in the normalised prediction as whole words."""
    predicted = normalize_answer(prediction)
    references = [normalize_answer(answer) for answer in answers]
    exact = any(predicted == reference for reference in references)
    contains = any(reference and f" {reference} " in f" {predicted} " for reference in references)
    return {"exact_match": exact, "contains_match": contains}


def read_qa_file(path: str | Path) -> list[dict]:
    """Reads and validates a generation-eval JSONL: {"media": path or embedding file, "question", "answers": [...],
    optional "id", "media_type" ("image"/"video"; inferred from the file suffix otherwise)}; "media" may be absent
    for text-only questions. Relative media paths are resolved against the JSONL's folder."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        where = f"{path}, row {number}"
        if not isinstance(row.get("question"), str):
            raise ValueError(f"{where}: needs a string 'question'.")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings.")
        if row.get("media") is not None:
            media = Path(row["media"])
            if not media.is_absolute() and not media.exists():
                media = Path(path).parent / media
            row["media"] = str(media)
            row.setdefault("media_type", infer_media_type(media))
            if row["media_type"] not in ("image", "video"):
                raise ValueError(f"{where}: media_type must be 'image' or 'video', got {row['media_type']!r}.")
    return rows


def evaluate_generation(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    embedder: MediaEmbedder,
    qa_file: str | Path,
    *,
    settings: GenerationSettings | None = None,
    system: str | None = None,
    batch_size: int = 8,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Answers every question (greedy by default) and scores it against the reference answers.

    Returns:
        {"num_examples", "exact_match", "contains_match" (fractions), "settings", "examples": [{"id", "question",
        "media", "answers", "prediction", "exact_match", "contains_match"}, ...]}
    """
    settings = settings or GenerationSettings(max_new_tokens=64, temperature=0.0)
    rows = read_qa_file(qa_file)[:max_examples]
    if not rows:
        raise ValueError(f"{qa_file} has no questions.")
    conversations = [
        prompt_conversation(row["question"],
                            {"type": row["media_type"], "path": row["media"]} if row.get("media") else None, system)
        for row in rows
    ]
    predictions = generate_batched(model, processor, embedder, conversations, settings, batch_size)
    examples = []
    for index, (row, prediction) in enumerate(zip(rows, predictions)):
        examples.append({
            "id": row.get("id", index),
            "question": row["question"],
            "media": row.get("media"),
            "answers": row["answers"],
            "prediction": prediction,
            **score_answer(prediction, row["answers"]),
        })
    return {
        "num_examples": len(examples),
        "exact_match": sum(e["exact_match"] for e in examples) / len(examples),
        "contains_match": sum(e["contains_match"] for e in examples) / len(examples),
        "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                     "top_p": settings.top_p, "system": system},
        "examples": examples,
    }


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Writes results as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__ = [
    "evaluate_generation",
    "evaluate_loss",
    "load_split",
    "normalize_answer",
    "read_qa_file",
    "score_answer",
    "write_results",
]
