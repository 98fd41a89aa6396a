"""Helpers of `train_throughput.py` for the speed work (issue 16): packed training runs, a fixed-shape stage-2 step
with the full vs the chunked loss, and the loss step's peak memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import mm_llama
from mm_llama.model.loss_mm_llama import LossBackend


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_training_step(model, batch: dict[str, Any], optimizer: torch.optim.Optimizer, autocast,
                        loss_chunk_size: int | None) -> tuple[float, torch.Tensor]:
    """One optimizer step as training runs it (forward with label-only logits under `autocast`, backward, step,
    zero_grad), timed between GPU synchronisations: (seconds, loss)."""
    _sync()
    start = time.perf_counter()
    with autocast:
        loss = model(**batch, loss_backend=LossBackend(chunk_size=loss_chunk_size)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - start, loss


def real_tokens(batch: dict[str, Any], items: list | None = None, max_seq_len: int | None = None) -> int:
    """Tokens of a batch that are not padding: the attention mask's ones, or for a packed batch the (truncated)
    lengths of the rows packed into it."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(min(int(row["length"]), max_seq_len or int(row["length"])) for item in items for row in item)


class CountingCollator:
    """Wraps a collator: real tokens, positions and rows of every batch it makes."""

    def __init__(self, collator, max_seq_len: int):
        self.collator, self.max_seq_len = collator, max_seq_len
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.rows: list[int] = []

    def __call__(self, items):
        batch = self.collator(items)
        self.tokens.append(real_tokens(batch, items, self.max_seq_len))
        self.positions.append(batch["input_ids"].numel())
        self.rows.append(sum(len(item) for item in items) if isinstance(items[0], list) else len(items))
        return batch


def padding_share(trainer, max_seq_len: int) -> dict[str, float]:
    """One epoch of the trainer's train dataloader: share of padded positions and the collator's time per batch."""
    counting = CountingCollator(trainer.data_collator, max_seq_len)
    trainer.data_collator = counting
    start = time.perf_counter()
    try:
        batches = sum(1 for _ in trainer.get_train_dataloader())
    finally:
        trainer.data_collator = counting.collator
    seconds = time.perf_counter() - start
    return {"padding_share": 1 - sum(counting.tokens) / sum(counting.positions),
            "collate_ms_per_batch": 1000 * seconds / max(batches, 1), "batches": batches}


class _StepTimes:
    """Trainer callback recording each optimizer step's wall time (synchronised on CUDA)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._start)


def measure_trainer_steps(trainer, warmup_steps: int, max_seq_len: int) -> dict[str, float]:
    """Trains (max_steps set by the caller) and reports steady-state throughput after `warmup_steps`: real (not
    padding) tokens/s, conversations/s, median step time, peak memory."""
    timer = _StepTimes()
    trainer.add_callback(timer)
    counting = CountingCollator(trainer.data_collator, max_seq_len)
    trainer.data_collator = counting
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainer.data_collator = counting.collator
    accumulation = trainer.args.gradient_accumulation_steps
    steps = timer.times[warmup_steps:]
    first, last = warmup_steps * accumulation, len(timer.times) * accumulation
    seconds = sum(steps)
    result = {
        "steps_measured": len(steps),
        "step_seconds_median": statistics.median(steps),
        "tokens_per_second": sum(counting.tokens[first:last]) / seconds,
        "conversations_per_second": sum(counting.rows[first:last]) / seconds,
        "padding_share_measured_steps": 1 - sum(counting.tokens[first:last]) / sum(counting.positions[first:last]),
    }
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# ---------------------------------------------------------------- fixed-shape stage 2


def tiny_stage2_model(vocab_size: int = 32000, hidden_size: int = 256, num_layers: int = 2, media_dim: int = 1024,
                      lora_r: int = 64, seed: int = 0):
    """A random-init MM-LLaMA with LoRA (r `lora_r` on q/v, projector trained in full) as stage 2 sets it up, in
    float32 on CPU / bfloat16 on CUDA."""
    from peft import get_peft_model

    from mm_llama.loading import lora_config
    from mm_llama.testing_utils import tiny_llama_config, tiny_mm_llama
    from mm_llama.training.setup import upcast_trainable

    text = tiny_llama_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                             max_position_embeddings=4096, use_cache=False)
    model = tiny_mm_llama(seed, media_dim, text_config=text)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    model = get_peft_model(model, lora_config(model, r=lora_r, dropout=0.0))
    upcast_trainable(model)
    return model


def fixed_shape_batch(batch_size: int, seq_len: int, vocab_size: int, media_dim: int = 1024,
                      device: torch.device | str | None = None, prompt_loss_weight: float = 0.05,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of exactly `seq_len` tokens (no padding): BOS, one media placeholder (id 0) at position 5, random text;
    the last quarter is the answer (weight 1), the rest prompt (weight `prompt_loss_weight`, 0.05 as
    recipes/stage2.yaml), so every text position is trained. On `device` (default: CUDA when present)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    ids[:, 0], ids[:, 5] = 1, 0
    labels = ids.clone()
    labels[:, 0] = labels[:, 5] = -100
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, -max(seq_len // 4, 1):] = True
    weights = torch.where(answer, 1.0, prompt_loss_weight) * (labels != -100)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "loss_weights": weights,
             "answer_mask": answer, "media_embeds": torch.randn(batch_size, 1, media_dim, generator=generator)}
    return {name: value.to(device) for name, value in batch.items()}


def stage2_step_times(chunk_sizes: list[int | None], steps: int, warmup: int, batch_size: int, seq_len: int,
                      vocab_size: int, hidden_size: int) -> dict[str, dict[str, float]]:
    """Median optimizer-step time (forward with label-only logits, backward, AdamW) of a stage-2 LoRA model at a
    fixed shape, for each loss `chunk_size` (None = the full loss). The variants alternate step by step on the same
    model and batch, so that a load change on a shared machine hits them alike."""
    model = tiny_stage2_model(vocab_size, hidden_size)
    batch = fixed_shape_batch(batch_size, seq_len, vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_available() else contextlib.nullcontext()
    times: dict[str, list[float]] = {str(size): [] for size in chunk_sizes}
    losses: dict[str, float] = {}
    for step in range(warmup + steps):
        for size in chunk_sizes:
            seconds, loss = timed_training_step(model, batch, optimizer, autocast, size)
            if step >= warmup:
                times[str(size)].append(seconds)
            losses.setdefault(str(size), float(loss.detach()))
    tokens = batch_size * seq_len
    return {size: {"step_seconds_median": statistics.median(values), "tokens_per_second": tokens /
                   statistics.median(values), "first_loss": losses[size]} for size, values in times.items()}


def loss_step_peak_memory(chunk_size: int | None, num_positions: int, hidden_size: int, vocab_size: int) -> float:
    """Peak memory (GiB) above the inputs of one loss forward + backward (LM head [vocab, hidden] frozen, hidden
    states requiring grad), measured in a fresh subprocess: CUDA's peak allocation, or on CPU the growth of the
    process's peak RSS (large blocks are mmap-ed and given back on free, so the peak follows the live tensors)."""
    code = f"""
import json, os, resource, torch
from torch import nn
from mm_llama.model.loss_mm_llama import token_loss_stats
torch.set_num_threads(1)

def peak_rss_kib():
    # VmHWM belongs to this process's address space; ru_maxrss would carry the parent's peak across exec on Linux.
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if {sys.platform == "darwin"} else 1)

device = "cuda" if torch.cuda.is_available() else "cpu"
head = nn.Linear({hidden_size}, {vocab_size}, bias=False, device=device).requires_grad_(False)
hidden = torch.randn({num_positions}, {hidden_size}, device=device, requires_grad=True)
targets = torch.randint(0, {vocab_size}, ({num_positions},), device=device)
weights = torch.rand({num_positions}, device=device)
# A first step on 2 positions does the lazy imports (Liger look-up, transformers and what importing it registers) before
# the baseline, so that the peak below holds the loss's tensors only.
warm, _ = token_loss_stats(hidden[:2].detach().requires_grad_(), head, targets[:2], weights[:2], None,
                           chunk_size={chunk_size})
warm.weighted_loss_sum.backward()
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:
    base = peak_rss_kib()
stats, _ = token_loss_stats(hidden, head, targets, weights, None, chunk_size={chunk_size})
(stats.weighted_loss_sum / stats.weight_sum).backward()
if device == "cuda":
    torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**30
else:
    peak = (peak_rss_kib() - base) / 2**20
print(json.dumps(peak))
"""
    # The child imports the same mm_llama as this process (a worktree's copy rather than an installed one).
    root = os.path.dirname(os.path.dirname(os.path.abspath(mm_llama.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])

