"""Evaluation: loss and next-token accuracy over a built dataset's split, and a generation eval over a JSONL of
questions about media with reference answers (exact-match / contains-match), written as JSON.

Token accuracy and answer loss are those of training (`mm_llama.model.loss_mm_llama`): next-token argmax accuracy and mean
cross-entropy over the ANSWER tokens, the original MM-LLaMA's definition (its published validation figures: 50.7%
after stage 1, 68.0% after stage 2).
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.sources import iter_jsonl
from .generation import (
    GenerationSettings,
    MediaEmbedder,
    embedded_prompt_conversation,
    generate_batched,
    infer_media_type,
)
from .model.processing_mm_llama import MMLlamaProcessor, TrainOn

# Scores must be reproducible and the reference answers are short: greedy, 64 new tokens, unless told otherwise.
EVALUATION_SETTINGS = GenerationSettings(max_new_tokens=64, temperature=0.0)

# ---------------------------------------------------------------------------------------------------- loss


def load_split(dataset: Any, split: str = "validation"):
    """A split of a built dataset: `dataset` is a `save_to_disk` folder, a `DatasetDict` or a `Dataset`."""
    from datasets import Dataset, DatasetDict

    from .training.data import REQUIRED_COLUMNS, load_built_dataset

    if isinstance(dataset, (str, Path)):
        dataset = load_built_dataset(dataset)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"The dataset has no {split!r} split (it has {sorted(dataset)}); pass --split.")
        dataset = dataset[split]
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    missing = sorted(set(REQUIRED_COLUMNS) - set(dataset.column_names))
    if missing:
        raise ValueError(f"The dataset lacks the built-dataset columns {missing} (see docs/data.md).")
    return dataset


def evaluate_loss(
    model: torch.nn.Module,
    processor: MMLlamaProcessor,
    dataset: Any,
    *,
    split: str = "validation",
    batch_size: int = 8,
    max_examples: int | None = None,
    train_on: TrainOn = "all",
    prompt_loss_weight: float = 0.0,
    max_seq_len: int | None = None,
    truncation: str = "truncate",
) -> dict[str, Any]:
    """Loss, answer loss and token accuracy over a split, computed by `MMLlamaTrainer.evaluate` — the same code and
    the same definitions as the training logs (`mm_llama.model.loss_mm_llama`), pooled over the whole split.

    Args:
        train_on / prompt_loss_weight / max_seq_len / truncation: as in the training recipe, so that the figures
            equal the run's eval metrics; `token_accuracy` and `answer_loss` count answer tokens only whatever the
            prompt weight. `max_seq_len=None` evaluates whole conversations.
    Returns:
        {"split", "num_examples", "num_answer_tokens", "loss", "answer_loss", "perplexity" (exp of answer_loss),
         "token_accuracy"}
    """
    import tempfile

    from transformers import PrinterCallback

    from .data.collator import MMLlamaDataCollator
    from .training.arguments import MMLlamaTrainingArguments
    from .training.data import add_lengths, filter_by_length
    from .training.trainer import MMLlamaTrainer

    rows = load_split(dataset, split)
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    if max_seq_len is not None and truncation == "drop":
        rows = filter_by_length(add_lengths(rows, processor, train_on), max_seq_len, name=f"{split} split")
    if len(rows) == 0:
        raise ValueError(f"The {split!r} split is empty.")
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        raise ValueError("Loss evaluation runs through the Trainer, which refuses a quantized model without an "
                         "adapter: evaluate the stage-2 adapter folder with --load_in_4bit, or drop --load_in_4bit.")
    device = next(model.parameters()).device
    collator = MMLlamaDataCollator(processor, max_seq_len=max_seq_len, truncation=truncation, train_on=train_on,
                                   prompt_loss_weight=prompt_loss_weight)
    with tempfile.TemporaryDirectory() as output_dir:
        args = MMLlamaTrainingArguments(
            output_dir=output_dir, per_device_eval_batch_size=batch_size, report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=device.type == "cpu",
        )
        trainer = MMLlamaTrainer(model=model, args=args, data_collator=collator, processing_class=processor)
        trainer.remove_callback(PrinterCallback)  # the caller reports the figures
        metrics = trainer.evaluate(rows.with_format("numpy", columns=["media_embeds"], output_all_columns=True),
                                   metric_key_prefix="eval")
        answer_tokens = int(trainer.last_eval_answer_tokens)
    if answer_tokens == 0:
        raise ValueError(f"The {split!r} split has no answer tokens to evaluate.")
    return {
        "split": split,
        "num_examples": len(rows),
        "num_answer_tokens": answer_tokens,
        "loss": metrics["eval_loss"],
        "answer_loss": metrics["eval_answer_loss"],
        "perplexity": math.exp(min(metrics["eval_answer_loss"], 700.0)),
        "token_accuracy": metrics["eval_token_accuracy"],
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    rows = []
    for number, row, error in iter_jsonl(path):
        where = f"{path}, line {number}"
        if error is not None or not isinstance(row, dict):
            raise ValueError(f"{where}: {error or 'each line must be a JSON object'}.")
        rows.append(row)
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

    Every media file is embedded before the first answer is generated, so an unreadable one costs its own question
    only: it is answered with "" (scored wrong, as lmms-eval scores a failed document) and listed under
    "media_errors" with the reason; the run goes on. When no media file at all can be read (a wrong folder, most
    likely), it raises ValueError before generating anything.

    Returns:
        {"num_examples", "exact_match", "contains_match" (fractions of all questions), "num_media_errors",
        "media_errors": [{"id", "media", "error"}], "settings", "examples": [{"id", "question", "media", "answers",
        "prediction", "exact_match", "contains_match"}, ...]}
    Bars over the embedding and the answering are drawn while `mm_llama.progress`'s switch is on.
    """
    from .imagebind.processing_imagebind import MediaLoadError
    from .progress import progress_bar

    settings = settings or EVALUATION_SETTINGS
    rows = read_qa_file(qa_file)[:max_examples]
    if not rows:
        raise ValueError(f"{qa_file} has no questions.")
    conversations: dict[int, list[dict]] = {}  # row index -> conversation with embedded media
    media_errors = []
    for index, row in enumerate(progress_bar(rows, desc="embedding media", unit="question")):
        try:
            conversations[index] = embedded_prompt_conversation(
                embedder, row["question"], row["media_type"] if row.get("media") else None, row.get("media"), system)
        except (MediaLoadError, ValueError, FileNotFoundError) as error:
            media_errors.append({"id": row.get("id", index), "media": row.get("media"), "error": str(error)})
    with_media = sum(bool(row.get("media")) for row in rows)
    if media_errors and len(media_errors) == with_media:
        raise ValueError(f"None of the {with_media} media files of {qa_file} could be read (first: "
                         f"{media_errors[0]['error']}); check the paths (relative to the current folder).")
    answerable = sorted(conversations)
    bar = progress_bar(total=len(answerable), desc="answering", unit="question")
    answers = generate_batched(model, processor, embedder, [conversations[i] for i in answerable], settings,
                               batch_size, on_batch=lambda start, batch: bar.update(len(batch)))
    bar.close()
    predictions = dict(zip(answerable, answers))
    examples = []
    for index, row in enumerate(rows):
        prediction = predictions.get(index, "")
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
        "num_media_errors": len(media_errors),
        "media_errors": media_errors,
        "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                     "top_p": settings.top_p, "system": system},
        "examples": examples,
    }


def run_evaluation(model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder | None,
                   model_path: str, options: Any, settings: GenerationSettings = EVALUATION_SETTINGS
                   ) -> dict[str, Any]:
    """`mm-llama evaluate` once the model is loaded: the loss eval of `options.dataset` and the generation eval of
    `options.qa_file` (each when given; `options`: `mm_llama.cli_arguments.EvaluateArguments`), written to
    `options.output`; a warning on stderr per question whose media could not be read. Returns the results."""
    import sys

    results: dict[str, Any] = {"model": str(model_path)}
    if options.dataset:
        results["loss_eval"] = evaluate_loss(
            model, processor, options.dataset, split=options.split, batch_size=options.batch_size,
            max_examples=options.max_examples, train_on=options.train_on,
            prompt_loss_weight=options.prompt_loss_weight, max_seq_len=options.max_seq_len,
            truncation=options.truncation,
        )
    if options.qa_file:
        results["generation_eval"] = evaluate_generation(
            model, processor, embedder, options.qa_file, system=options.system, batch_size=options.batch_size,
            max_examples=options.max_examples, settings=settings,
        )
        for failure in results["generation_eval"]["media_errors"]:
            print(f"warning: question {failure['id']}: {failure['error']} (answered with '', scored wrong)",
                  file=sys.stderr)
    write_results(results, options.output)
    return results


def results_summary(results: dict[str, Any]) -> dict[str, Any]:
    """`results` without the per-example lists: what `mm-llama evaluate` prints."""
    return {name: {key: value for key, value in part.items() if key not in ("examples", "media_errors")}
            for name, part in results.items() if isinstance(part, dict)}


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Writes results as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__ = [
    "EVALUATION_SETTINGS",
    "evaluate_generation",
    "evaluate_loss",
    "load_split",
    "normalize_answer",
    "read_qa_file",
    "results_summary",
    "run_evaluation",
    "score_answer",
    "write_results",
]
