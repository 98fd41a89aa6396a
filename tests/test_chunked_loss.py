"""The memory-efficient losses of mm_llama.model.loss_mm_llama give the full loss's sums and gradients exactly (float32)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.model.loss_mm_llama import (
    chunked_token_loss_stats,
    liger_token_loss_stats,
    liger_unavailable_reason,
    select_loss_implementation,
    token_loss_stats,
)

HIDDEN, VOCAB = 24, 97
STAT_FIELDS = ("weighted_loss_sum", "weight_sum", "answer_loss_sum", "answer_tokens", "answer_correct")


def inputs(num=53, seed=0, weighted=True, answers=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num, HIDDEN, generator=generator)
    targets = torch.randint(0, VOCAB, (num,), generator=generator)
    weights = torch.where(torch.rand(num, generator=generator) < 0.4, 0.05, 1.0) if weighted else None
    answer_mask = (weights == 1.0) if (answers and weighted) else None
    return hidden, targets, weights, answer_mask


def make_head(seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(HIDDEN, VOCAB, bias=bias)


def run(head, hidden, targets, weights, answer_mask, scale=0.37, loss=token_loss_stats, **loss_kwargs):
    """Stats, and the gradients of scale * weighted_loss_sum (as the model's division by the denominator does), of
    `loss` (a function that returns (stats, logits or None))."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    stats, logits = loss(hidden, head, targets, weights, answer_mask, **loss_kwargs)
    (stats.weighted_loss_sum * scale).backward()
    grads = {"hidden": hidden.grad}
    grads.update({name: param.grad.clone() for name, param in head.named_parameters() if param.grad is not None})
    return stats, logits, grads


def assert_same(got, expected):
    (got_stats, _, got_grads), (stats, _, grads) = got, expected
    for field in STAT_FIELDS:
        torch.testing.assert_close(getattr(got_stats, field), getattr(stats, field), rtol=1e-5, atol=1e-5,
                                   msg=field)
    assert got_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 53, 1000])
@pytest.mark.parametrize("weighted,answers", [(False, False), (True, False), (True, True)])
def test_chunked_loss_equals_the_full_loss(chunk_size, weighted, answers):
    head = make_head()
    data = inputs(weighted=weighted, answers=answers)
    expected = run(head, *data)
    got = run(head, *data, chunk_size=chunk_size)
    assert expected[1] is not None and got[1] is None  # the chunked path returns no logits
    assert_same(got, expected)


def test_chunked_loss_counts_argmax_hits_like_the_full_loss():
    head = make_head()
    hidden, targets, weights, answer_mask = inputs(num=200)
    with torch.no_grad():
        targets = head(hidden).argmax(-1)  # every prediction right ...
        targets[::3] = (targets[::3] + 1) % VOCAB  # ... but every third
    stats, _ = token_loss_stats(hidden, head, targets, weights, answer_mask, chunk_size=16)
    expected = int((answer_mask & (torch.arange(200) % 3 != 0)).sum())
    assert int(stats.answer_correct) == expected
    full, _ = token_loss_stats(hidden, head, targets, weights, answer_mask)
    assert int(full.answer_correct) == expected


def test_chunked_loss_trains_a_lora_wrapped_lm_head():
    from peft import LoraConfig, get_peft_model

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = make_head(bias=False)

        def forward(self, x):
            return self.lm_head(x)

    model = get_peft_model(Wrapper(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"],
                                                 init_lora_weights=False))
    head = model.base_model.model.lm_head
    assert type(head) is not nn.Linear
    data = inputs()
    expected = run(head, *data)
    got = run(head, *data, chunk_size=10)
    assert {"lora_A.default.weight", "lora_B.default.weight"} <= {name for name in got[2]}
    assert "base_layer.weight" not in got[2]  # frozen: no gradient computed for it
    assert_same(got, expected)


def test_chunked_loss_without_gradients_computes_only_the_sums(monkeypatch):
    head = make_head()
    hidden, targets, weights, answer_mask = inputs()
    hidden.requires_grad_(True)
    with torch.no_grad():
        full, _ = token_loss_stats(hidden, head, targets, weights, answer_mask)

        def no_gradient(*args, **kwargs):
            raise AssertionError("evaluation (no_grad) must not compute gradients")

        monkeypatch.setattr(torch.autograd, "grad", no_gradient)
        chunked, _ = token_loss_stats(hidden, head, targets, weights, answer_mask, chunk_size=8)
    assert not chunked.weighted_loss_sum.requires_grad
    for field in STAT_FIELDS:
        torch.testing.assert_close(getattr(chunked, field), getattr(full, field), rtol=1e-5, atol=1e-5)


def test_chunked_loss_with_no_trained_position():
    head = make_head()
    hidden = torch.zeros(0, HIDDEN, requires_grad=True)
    stats = chunked_token_loss_stats(hidden, head, torch.zeros(0, dtype=torch.long), torch.zeros(0), None, 4)
    assert float(stats.weighted_loss_sum.detach()) == 0 and int(stats.answer_tokens) == 0
    stats.weighted_loss_sum.backward()
    assert hidden.grad.shape == (0, HIDDEN)


def test_chunked_loss_under_bf16_autocast_matches_the_full_loss():
    head = make_head()
    data = inputs(num=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run(head, *data)
        got = run(head, *data, chunk_size=16)
    torch.testing.assert_close(got[0].weighted_loss_sum, expected[0].weighted_loss_sum, rtol=1e-5, atol=1e-5)
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=2e-2, atol=2e-3, msg=name)


def test_chunk_size_must_be_positive():
    head = make_head()
    with pytest.raises(ValueError, match="chunk_size"):
        token_loss_stats(*inputs()[:1], head, inputs()[1], chunk_size=0)


# ---------------------------------------------------------------- Liger-Kernel adapter


# Liger's kernel needs CUDA and Triton, so on CPU the adapter's own logic (grouping tokens by loss weight, scaling each
# group's summed CE, the answer metrics from the returned argmax) is tested with `fused_loss=` set to the fused op's
# definition below. What Liger itself must provide (a function taking these arguments, returning `.loss` and
# `.predicted_tokens`) is checked against the real package where it is installed, and on CUDA against its results.


def defined_fused_loss(input, weight, target, bias=None, reduction="sum", return_predicted_tokens=False):
    """What a fused linear cross-entropy computes, unfused: summed CE of `input @ weight.T + bias`, and its argmax."""
    logits = F.linear(input, weight, bias).float()
    return SimpleNamespace(loss=F.cross_entropy(logits, target, reduction=reduction),
                           predicted_tokens=logits.argmax(-1) if return_predicted_tokens else None)


def adapter_with(fused_loss):
    def loss(hidden, head, targets, weights, answer_mask):
        return liger_token_loss_stats(hidden, head, targets, weights, answer_mask, fused_loss=fused_loss), None
    return loss


@pytest.mark.parametrize("weighted,answers", [(False, False), (True, False), (True, True)])
def test_liger_adapter_groups_tokens_by_weight_and_matches_the_full_loss(weighted, answers):
    head = make_head()
    data = inputs(weighted=weighted, answers=answers)
    calls = []

    def counting(input, *args, **kwargs):
        calls.append(input.shape[0])
        return defined_fused_loss(input, *args, **kwargs)

    assert_same(run(head, *data, loss=adapter_with(counting)), run(head, *data))
    # One fused call per (weight, answer) group, covering every position once.
    assert len(calls) == (2 if weighted else 1) and sum(calls) == data[0].shape[0]


def test_liger_is_looked_up_in_the_real_package():
    """Where liger-kernel cannot be imported (not installed, as on the CPU test machine, or without Triton) the fused op
    is absent and the chunked loss serves; where it can, it is the real function, which accepts exactly the call the
    adapter makes."""
    import inspect

    from mm_llama.model.loss_mm_llama import _liger_fused_linear_cross_entropy

    fused = _liger_fused_linear_cross_entropy()
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        assert fused is None
        return
    assert fused is liger_fused_linear_cross_entropy
    head, (hidden, targets, _, _) = make_head(), inputs()
    inspect.signature(fused).bind(hidden, head.weight, targets, head.bias, reduction="sum",
                                  return_predicted_tokens=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's fused loss runs on CUDA only")
def test_liger_fused_loss_on_cuda_matches_the_full_loss():
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    head = make_head().cuda()
    hidden, targets, weights, answer_mask = (t.cuda() for t in inputs())
    assert select_loss_implementation(hidden, head, 8) == ("liger", None)
    got = run(head, hidden, targets, weights, answer_mask, chunk_size=8)
    expected = run(head, hidden, targets, weights, answer_mask)
    for field in STAT_FIELDS:
        torch.testing.assert_close(getattr(got[0], field), getattr(expected[0], field), rtol=1e-4, atol=1e-4,
                                   msg=field)
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-3, atol=1e-4, msg=name)


def test_liger_adapter_with_many_distinct_weights_falls_back_to_chunks():
    head = make_head()
    hidden, targets, _, _ = inputs()
    weights = torch.linspace(0.1, 1.0, hidden.shape[0])

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("the fused loss should not run with 53 distinct weights")

    stats = liger_token_loss_stats(hidden, head, targets, weights, None, fused_loss=must_not_be_called)
    full, _ = token_loss_stats(hidden, head, targets, weights, None)
    torch.testing.assert_close(stats.weighted_loss_sum, full.weighted_loss_sum, rtol=1e-5, atol=1e-5)


def test_loss_implementation_selection_off_cuda():
    head = make_head()
    hidden = torch.zeros(2, HIDDEN)
    assert select_loss_implementation(hidden, head, None) == ("full", None)
    assert select_loss_implementation(hidden, head, 512) == ("chunked", None)
    assert select_loss_implementation(hidden, head, 512, use_liger=False) == ("chunked", None)
    assert "CUDA" in liger_unavailable_reason(hidden, head)


def test_liger_adapter_with_no_trained_position_keeps_the_graph():
    head = make_head()
    hidden = torch.zeros(0, HIDDEN, requires_grad=True)
    stats = liger_token_loss_stats(hidden, head, torch.zeros(0, dtype=torch.long), torch.zeros(0), None,
                                   fused_loss=defined_fused_loss)
    assert float(stats.weighted_loss_sum.detach()) == 0 and int(stats.answer_tokens) == 0
    stats.weighted_loss_sum.backward()  # a batch without trained tokens must not break the step
    assert hidden.grad.shape == (0, HIDDEN)
