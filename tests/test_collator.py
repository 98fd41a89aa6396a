"""MMLlamaDataCollator: tokenization, padding, media order, the max_seq_len policies, length column and mixing."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from mm_llama import MMLlamaProcessor, MMLlamaTokenizer
from mm_llama.data.collator import MMLlamaDataCollator, truncate_encoded
from mm_llama.model.processing_mm_llama import IGNORE_INDEX
from mm_llama.training.arguments import DataArguments
from mm_llama.training.data import LENGTH_COLUMN, add_lengths, filter_by_length, mix_datasets, prepare_datasets
from training_utils import MEDIA_DIM, make_dataset_folder, make_rows


@pytest.fixture(scope="module")
def processor(spm_model_path):
    return MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)))


def test_batch_is_padded_with_eos_and_media_follow_placeholder_order(processor):
    rows = make_rows(4, seed=1)
    batch = MMLlamaDataCollator(processor, max_seq_len=None)(rows)
    lengths = [len(processor.encode_conversation({"messages": r["messages"], "media": [{"type": t} for t in
                                                                                          r["media_types"]]}).input_ids)
               for r in rows]
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, length in enumerate(lengths):
        assert batch["attention_mask"][i].sum() == length
        assert (batch["input_ids"][i, length:] == processor.pad_token_id).all()
        assert (batch["labels"][i, length:] == IGNORE_INDEX).all()
    assert processor.pad_token_id != processor.media_token_id
    placeholders = int((batch["input_ids"] == processor.media_token_id).sum())
    assert batch["media_embeds"].shape == (placeholders, 1, MEDIA_DIM)
    expected = np.concatenate([row["media_embeds"] for row in rows])
    torch.testing.assert_close(batch["media_embeds"], torch.from_numpy(expected))
    assert "loss_weights" not in batch  # prompt_loss_weight 0: plain label masking


def test_prompt_loss_weight_adds_weights_on_prompt_text(processor):
    rows = make_rows(2, seed=2)
    batch = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=0.25)(rows)
    weights, labels = batch["loss_weights"], batch["labels"]
    assert set(weights.unique().tolist()) == {0.0, 0.25, 1.0}
    assert ((weights > 0) == (labels != IGNORE_INDEX)).all()
    assert (weights[batch["input_ids"] == processor.media_token_id] == 0).all()


def test_truncation_never_cuts_through_a_placeholder_run(spm_model_path):
    processor = MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)), tokens_per_media=3)
    row = make_rows(1, seed=3)[0]
    row["media_embeds"] = np.ones((1, 3, MEDIA_DIM), dtype=np.float32)
    encoded = processor.encode_conversation({"messages": row["messages"], "media": [{"type": row["media_types"][0]}]})
    start = encoded.input_ids.index(processor.media_token_id)
    # A cut one token into the run moves back to the run's start, and the media item goes with it.
    cut = truncate_encoded(encoded, start + 1, processor.media_token_id)
    assert cut.input_ids == encoded.input_ids[:start] and cut.media == []
    # A cut right after the run keeps the whole run and its media item.
    kept = truncate_encoded(encoded, start + 3, processor.media_token_id)
    assert kept.input_ids.count(processor.media_token_id) == 3 and len(kept.media) == 1
    # Through the collator: placeholder count and media_embeds always agree.
    batch = MMLlamaDataCollator(processor, max_seq_len=start + 2)([row, make_rows(1, seed=4)[0] | {
        "media_embeds": np.full((1, 3, MEDIA_DIM), 2.0, dtype=np.float32)}])
    assert batch["input_ids"].shape[1] <= start + 2
    placeholders = int((batch["input_ids"] == processor.media_token_id).sum())
    assert placeholders == 3 * batch.get("media_embeds", torch.empty(0, 3, MEDIA_DIM)).shape[0]


def test_truncation_keeps_exactly_max_seq_len_tokens_before_media(processor):
    row = make_rows(1, seed=5, multi_turn_share=1.0)[0]
    full = MMLlamaDataCollator(processor, max_seq_len=None)([row])
    max_len = full["input_ids"].shape[1] - 4
    batch = MMLlamaDataCollator(processor, max_seq_len=max_len)([row])
    assert batch["input_ids"].shape[1] == max_len
    assert torch.equal(batch["input_ids"][0], full["input_ids"][0, :max_len])
    assert torch.equal(batch["labels"][0], full["labels"][0, :max_len])
    assert batch["media_embeds"].shape[0] == 1


def test_drop_policy_filters_the_dataset_and_the_collator_refuses_long_rows(processor):
    rows = make_rows(12, seed=6, multi_turn_share=0.5)
    dataset = add_lengths(Dataset.from_list(rows), processor)
    lengths = dataset[LENGTH_COLUMN]
    collator = MMLlamaDataCollator(processor, max_seq_len=None)
    assert lengths == [int(collator([row])["attention_mask"].sum()) for row in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    kept = filter_by_length(dataset, limit)
    assert len(kept) == sum(length <= limit for length in lengths) and max(kept[LENGTH_COLUMN]) <= limit
    too_long = rows[int(np.argmax(lengths))]
    with pytest.raises(ValueError, match="max_seq_len"):
        MMLlamaDataCollator(processor, max_seq_len=limit, truncation="drop")([too_long])


def test_pad_to_multiple_of(processor):
    batch = MMLlamaDataCollator(processor, max_seq_len=None, pad_to_multiple_of=16, prompt_loss_weight=0.1)(
        make_rows(3, seed=7))
    assert batch["input_ids"].shape[1] % 16 == 0
    assert all(tensor.shape == batch["input_ids"].shape for key, tensor in batch.items() if key != "media_embeds")


def test_datasets_concatenate_or_mix_with_weights(processor, tmp_path):
    first = make_dataset_folder(tmp_path / "a", num_train=10, num_validation=2, seed=1)
    second = make_dataset_folder(tmp_path / "b", num_train=6, num_validation=2, seed=2)
    train, evaluation = prepare_datasets(DataArguments(dataset_paths=[str(first), str(second)]), processor)
    assert len(train) == 16 and len(evaluation) == 4
    assert LENGTH_COLUMN in train.column_names
    assert isinstance(train[0]["media_embeds"], np.ndarray) and train[0]["media_embeds"].shape == (1, 1, MEDIA_DIM)
    mixed, _ = prepare_datasets(
        DataArguments(dataset_paths=[str(first), str(second)], dataset_weights=[1.0, 1.0], eval_split=None), processor
    )
    # Interleaving until every dataset is used up: all rows of both, oversampling the smaller one.
    ids = mixed["id"]
    assert len(ids) >= 16 and {f"row-{i}" for i in range(10)} <= set(ids)
    with pytest.raises(ValueError, match="dataset_weights"):
        DataArguments(dataset_paths=[str(first)], dataset_weights=[1.0, 2.0])


def test_missing_dataset_folder_and_columns_are_clear_errors(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="mm-llama build-datasets"):
        prepare_datasets(DataArguments(dataset_paths=[str(tmp_path / "nope")]), processor)
    Dataset.from_list([{"id": "x", "text": "hi"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="messages"):
        prepare_datasets(DataArguments(dataset_paths=[str(tmp_path / "bad")]), processor)


def test_mix_single_dataset_is_identity():
    dataset = Dataset.from_list([{"a": 1}])
    assert mix_datasets([dataset], None, seed=0) is dataset
