"""Padding-free packing (mm_llama.data.packing): the plan, the packed tensors, and at the model level the same loss and
gradients as the unpacked batch, with attention that never crosses a conversation boundary."""

import random

import pytest
import torch
from training_utils import MEDIA_DIM, make_rows, single_torch_thread  # noqa: F401  (fixture)

from mm_llama import (
    MMLlamaForCausalLM,
    MMLlamaProcessor,
    MMLlamaTokenizer,
)
from mm_llama.data.collator import MMLlamaDataCollator
from mm_llama.data.packing import (
    PackedDataset,
    PackingCollator,
    flash_attention_kwargs_from_position_ids,
    pack_rows,
    plan_packs,
    sequence_ids,
)
from mm_llama.model.loss_mm_llama import LossBackend
from mm_llama.model.processing_mm_llama import IGNORE_INDEX
from mm_llama.testing_utils import tiny_mm_llama


@pytest.fixture(scope="module")
def processor(spm_model_path):
    return MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)))


def make_model(attn_implementation: str = "sdpa", seed: int = 0) -> MMLlamaForCausalLM:
    return tiny_mm_llama(seed, MEDIA_DIM, attn_implementation=attn_implementation).eval()


def lengths_of(collator, rows):
    return [len(collator.encode_row(row)[0].input_ids) for row in rows]


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize("method", ["best_fit_decreasing", "greedy"])
def test_plan_uses_every_item_once_within_capacity(method):
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    packs = plan_packs(lengths, 128, method=method)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 128 for pack in packs)
    if method == "greedy":  # keeps the dataset order
        assert [i for pack in packs for i in pack] == list(range(500))


def test_best_fit_decreasing_fills_rows_better_than_greedy():
    rng = random.Random(1)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    fill = {method: sum(lengths) / (len(plan_packs(lengths, 512, method=method)) * 512)
            for method in ("best_fit_decreasing", "greedy")}
    assert fill["best_fit_decreasing"] > 0.99
    assert fill["greedy"] < fill["best_fit_decreasing"] - 0.05


def test_plan_rejects_items_longer_than_a_row():
    with pytest.raises(ValueError, match="Item 1 has 600 tokens"):
        plan_packs([10, 600], 512)


def test_packed_dataset_clips_lengths_to_max_seq_len():
    dataset = [{"id": i} for i in range(4)]
    packed = PackedDataset.from_lengths(dataset, [700, 100, 200, 300], max_seq_len=512)
    assert sorted(i for pack in packed.packs for i in pack) == [0, 1, 2, 3]
    assert max(packed.pack_lengths) <= 512
    assert [row["id"] for row in packed[0]] == packed.packs[0]
    assert packed.fill_ratio(512) == pytest.approx((512 + 600) / (len(packed) * 512))


# ---------------------------------------------------------------- the packed tensors


def test_pack_rows_restarts_positions_and_never_labels_a_conversations_first_token(processor):
    collator = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=0.5)
    rows = make_rows(3, seed=3)
    encoded = [collator.encode_row(row) for row in rows]
    # A row whose first token had a label (as a bad template might give it) must still not be trained across.
    encoded[1][0].labels[0] = encoded[1][0].input_ids[0]
    sizes = [len(conversation.input_ids) for conversation, _ in encoded]
    batch = pack_rows([[encoded[0][0], encoded[1][0]], [encoded[2][0]]], processor.pad_token_id,
                      media_embeds=[[encoded[0][1], encoded[1][1]], [encoded[2][1]]], with_loss_weights=True,
                      flash_attention_kwargs=True)
    length = sizes[0] + sizes[1]
    assert batch["input_ids"].shape == (2, length) and "attention_mask" not in batch
    expected_positions = list(range(sizes[0])) + list(range(sizes[1]))
    assert batch["position_ids"][0].tolist() == expected_positions
    assert batch["position_ids"][1].tolist() == list(range(sizes[2])) + list(range(length - sizes[2]))
    for start in (0, sizes[0]):
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert batch["loss_weights"][0, start] == 0 and not batch["answer_mask"][0, start]
    assert (batch["labels"][1, sizes[2]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, sizes[2]:] == processor.pad_token_id).all()
    # One media item per conversation, in row-major placeholder order.
    torch.testing.assert_close(batch["media_embeds"],
                               torch.cat([torch.as_tensor(embeds) for _, embeds in encoded]))
    assert int((batch["input_ids"] == processor.media_token_id).sum()) == 3
    # flash_attention_2's boundaries over the flattened batch: the three conversations and the padding run.
    assert batch["cu_seq_lens_q"].tolist() == [0, sizes[0], length, length + sizes[2], 2 * length]
    assert batch["max_length_q"] == max(sizes[0], sizes[1], sizes[2], length - sizes[2])
    assert sequence_ids(batch["position_ids"]).tolist() == [[0] * sizes[0] + [1] * sizes[1],
                                                            [0] * sizes[2] + [1] * (length - sizes[2])]


def test_flash_attention_kwargs_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    kwargs = flash_attention_kwargs_from_position_ids(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]
    assert kwargs["cu_seq_lens_k"].tolist() == [0, 3, 5, 10]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5
    assert isinstance(kwargs["max_length_q"], int)


def test_packing_collator_collates_plain_rows_unpacked(processor):
    collator = MMLlamaDataCollator(processor, max_seq_len=None)
    rows = make_rows(3, seed=7)
    batch = PackingCollator(collator)(rows)
    expected = collator(rows)
    assert batch.keys() == expected.keys() and "attention_mask" in batch
    for name in expected:
        torch.testing.assert_close(batch[name], expected[name])


def test_packing_collator_rejects_rows_longer_than_planned(processor):
    collator = MMLlamaDataCollator(processor, max_seq_len=40)
    rows = make_rows(3, seed=5)
    with pytest.raises(ValueError, match="max_seq_len=40"):
        PackingCollator(collator)([rows])


# ---------------------------------------------------------------- the model


def loss_and_grads(model, batch, chunk_size=None):
    model.zero_grad()
    output = model(**batch, loss_backend=LossBackend(chunk_size=chunk_size))
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return output, grads


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.1])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(processor, attn_implementation, prompt_loss_weight):
    model = make_model(attn_implementation)
    collator = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=prompt_loss_weight)
    rows = make_rows(7, seed=11, multi_turn_share=0.5)
    lengths = lengths_of(collator, rows)
    max_seq_len = 2 * max(lengths)
    packs = plan_packs(lengths, max_seq_len)
    assert len(packs) < len(rows)  # several conversations share a row, or the test proves nothing
    packed = PackingCollator(collator)([[rows[i] for i in pack] for pack in packs])
    # Unpacked in the packed order, so that the media embeddings come in the same order (equal either way).
    unpacked = collator([rows[i] for pack in packs for i in pack])

    expected, expected_grads = loss_and_grads(model, unpacked)
    got, got_grads = loss_and_grads(model, {**packed, "use_cache": False})
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert got.num_answer_tokens == expected.num_answer_tokens
    assert got.num_correct_tokens == expected.num_correct_tokens
    torch.testing.assert_close(got.answer_loss_sum, expected.answer_loss_sum, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_attention_never_crosses_a_packed_boundary(processor, attn_implementation):
    model = make_model(attn_implementation)
    collator = MMLlamaDataCollator(processor, max_seq_len=None)
    first, second, third = make_rows(3, seed=21)
    size = len(collator.encode_row(first)[0].input_ids)
    changed = {**first, "media_embeds": first["media_embeds"] + 1.0}  # the same tokens, another image

    def logits(rows, use_cache):
        batch = PackingCollator(collator)([rows])
        with torch.no_grad():
            return model(**batch, use_cache=use_cache).logits[0]

    base = logits([first, second, third], use_cache=False)
    other = logits([changed, second, third], use_cache=False)
    assert not torch.allclose(base[:size], other[:size], atol=1e-4)  # the change is visible where it belongs
    torch.testing.assert_close(base[size:], other[size:], rtol=0, atol=1e-6)
    # Control: with a KV cache transformers skips the packed-sequence mask and the second conversation sees the first.
    leaky = logits([first, second, third], use_cache=True)
    leaky_other = logits([changed, second, third], use_cache=True)
    assert not torch.allclose(leaky[size:], leaky_other[size:], atol=1e-4)
    # So a forward with labels runs without a cache unless asked (LlamaConfig's default is use_cache=True).
    torch.testing.assert_close(logits([changed, second, third], use_cache=None), other, rtol=0, atol=0)


def test_packed_loss_equals_unpacked_with_the_chunked_loss(processor):
    """Packing and the chunked loss together (the configuration the speed work is after)."""
    model = make_model()
    collator = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=0.05)
    rows = make_rows(6, seed=31)
    lengths = lengths_of(collator, rows)
    packs = plan_packs(lengths, 3 * max(lengths))
    packed = PackingCollator(collator)([[rows[i] for i in pack] for pack in packs])
    unpacked = collator([rows[i] for pack in packs for i in pack])
    expected, expected_grads = loss_and_grads(model, unpacked)
    got, got_grads = loss_and_grads(model, {**packed, "use_cache": False}, chunk_size=16)
    assert got.logits is None  # the chunked path ran
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
