"""Training / evaluation datasets: load built datasets, mix them, add token lengths, apply the length policy."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from ..data.collator import conversation_lengths
from ..data.packing import PackedDataset
from ..model.processing_mm_llama import MMLlamaProcessor
from .arguments import DataArguments

logger = logging.getLogger(__name__)

LENGTH_COLUMN = "length"
REQUIRED_COLUMNS = ("messages", "media_types", "media_embeds")


def load_built_dataset(path: str | Path) -> DatasetDict:
    """`datasets.load_from_disk` of one built dataset folder, checked for the columns training reads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Dataset folder {path} not found. Build it with mm-llama build-datasets, or fix dataset_paths."
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, Dataset):  # a single split saved on its own is used for training
        loaded = DatasetDict({"train": loaded})
    for split, dataset in loaded.items():
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{path} split {split!r} lacks column(s) {missing}; training needs a dataset built by "
                "mm-llama build-datasets (id, messages, media_types, media_embeds)."
            )
    return loaded


def check_datasets(data_args: DataArguments, evaluates: bool) -> None:
    """Checks every dataset folder before any model is loaded (minutes for a 7B model): it exists and holds a built
    dataset with the train split; when the recipe evaluates, at least one dataset has the eval split (the evaluation
    pools the eval splits there are: a small dataset whose 5% rounds to no row just adds none, which is logged).
    Errors name the folder and the fix."""
    if not data_args.dataset_paths:
        raise ValueError("dataset_paths is empty: give at least one built dataset folder (dataset_paths: [...]).")
    lacking_eval = []
    for path in data_args.dataset_paths:
        loaded = load_built_dataset(path)
        if data_args.train_split not in loaded:
            raise ValueError(f"{path} has no {data_args.train_split!r} split (it has {sorted(loaded)}); set train_split.")
        if evaluates and data_args.eval_split not in loaded:
            lacking_eval.append(str(path))
    if not lacking_eval:
        return
    if len(lacking_eval) == len(data_args.dataset_paths):
        raise ValueError(
            f"The recipe evaluates (eval_strategy is not 'no') but {', '.join(lacking_eval)} has no "
            f"{data_args.eval_split!r} split. Rebuild it with mm-llama build-datasets (its default "
            "--validation_ratio 0.05 makes one), or set eval_strategy: 'no'."
        )
    logger.warning("Evaluating on the %r splits of the other datasets: %s has none (too small for its validation "
                   "ratio, or built with --validation_ratio 0).", data_args.eval_split, ", ".join(lacking_eval))


def mix_datasets(parts: list[Dataset], weights: list[float] | None, seed: int) -> Dataset:
    """Concatenates the parts, or interleaves them with probabilities `weights` until every part is used up."""
    if len(parts) == 1:
        return parts[0]
    # Separately built datasets can differ in feature metadata (e.g. the int width of media_index): align them.
    parts = [part.cast(parts[0].features) if part.features != parts[0].features else part for part in parts]
    if weights is None:
        return datasets.concatenate_datasets(parts)
    total = sum(weights)
    return datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )


def add_lengths(dataset: Dataset, processor: MMLlamaProcessor, train_on: str = "all") -> Dataset:
    """Adds a `length` column (tokens per conversation) for length grouping and the "drop" policy.

    Reads only the text columns and adds the lengths as an in-memory column, so the embedding column is not
    rewritten.
    """
    if LENGTH_COLUMN in dataset.column_names:
        return dataset
    lengths = conversation_lengths(dataset.select_columns(["id", "messages", "media_types"]), processor, train_on)
    return dataset.add_column(LENGTH_COLUMN, lengths)


def lengths_of(dataset: Dataset) -> list[int]:
    """The `length` column as a list, read at once (datasets >= 4 gives a lazy Column, read a row at a time)."""
    return dataset[LENGTH_COLUMN][:]


def filter_by_length(dataset: Dataset, max_seq_len: int, name: str = "dataset") -> Dataset:
    """Keeps the rows of at most `max_seq_len` tokens (needs the `length` column); logs how many were dropped."""
    keep = [i for i, length in enumerate(lengths_of(dataset)) if length <= max_seq_len]
    dropped = len(dataset) - len(keep)
    if dropped:
        logger.warning("%s: dropped %d of %d rows longer than max_seq_len=%d.", name, dropped, len(dataset),
                       max_seq_len)
    if not keep:
        raise ValueError(f"{name}: every row is longer than max_seq_len={max_seq_len}; raise max_seq_len.")
    return dataset.select(keep)


def prepare_split(
    data_args: DataArguments, processor: MMLlamaProcessor, split: str, seed: int, max_samples: int | None
) -> Dataset | PackedDataset | None:
    """One split of all `dataset_paths`, mixed, with lengths, length policy applied, embeddings as numpy; the
    training split packed into rows when `data_args.packing`.

    Returns None when no dataset has the split.
    """
    parts, weights = [], []
    for index, path in enumerate(data_args.dataset_paths):
        loaded = load_built_dataset(path)
        if split not in loaded:  # check_datasets has made sure that the splits in use exist
            continue
        parts.append(loaded[split])
        if data_args.dataset_weights is not None:
            weights.append(data_args.dataset_weights[index])
    if not parts:
        return None
    dataset = mix_datasets(parts, weights if data_args.dataset_weights is not None else None, seed)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataset = add_lengths(dataset, processor, data_args.train_on)
    if data_args.truncation == "drop":
        dataset = filter_by_length(dataset, data_args.max_seq_len, name=f"{split} split")
    # Embeddings come out as float32 arrays rather than nested Python lists (much faster to batch).
    dataset = dataset.with_format("numpy", columns=["media_embeds"], output_all_columns=True)
    if data_args.packing and split == data_args.train_split:
        packed = PackedDataset.from_lengths(dataset, lengths_of(dataset), data_args.max_seq_len,
                                            method=data_args.packing_method, seed=seed)
        logger.info("%s split: %d conversations packed into %d rows of %d tokens (%.2f%% filled).", split,
                    len(dataset), len(packed), data_args.max_seq_len, 100 * packed.fill_ratio(data_args.max_seq_len))
        return packed
    return dataset


def prepare_datasets(
    data_args: DataArguments, processor: MMLlamaProcessor, seed: int = 42
) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets ready for `MMLlamaTrainer` with `MMLlamaDataCollator`; eval may be None."""
    train = prepare_split(data_args, processor, data_args.train_split, seed, data_args.max_train_samples)
    evaluation = None
    if data_args.eval_split:
        evaluation = prepare_split(data_args, processor, data_args.eval_split, seed, data_args.max_eval_samples)
    return train, evaluation


__all__ = ["LENGTH_COLUMN", "add_lengths", "check_datasets", "filter_by_length", "lengths_of", "load_built_dataset",
           "mix_datasets", "prepare_datasets", "prepare_split"]
