"""The HF Trainer as the demo's stand-ins pre-train with it: batches from the caller's batch sampler, the caller's
optimizer and schedule, the loss of each step passed to a progress function, nothing saved."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

ProgressFn = Callable[[int, int, dict], None]  # (step, total, metrics) -> None


class _BatchSamplerTrainer(Trainer):
    """The HF Trainer reading `batch_sampler`'s batches (TrainingArguments have no option for a batch sampler)."""

    def __init__(self, *args, batch_sampler: Sampler[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler

    def get_train_dataloader(self) -> DataLoader:
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=self.batch_sampler,
                                                   collate_fn=self.data_collator))


class _ReportLoss(TrainerCallback):
    """Keeps each step's loss (logged every step) and passes it to the demo's progress function."""

    def __init__(self, on_step: ProgressFn | None):
        self.on_step, self.last_loss = on_step, float("nan")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]
            if self.on_step is not None:
                self.on_step(state.global_step, state.max_steps, {"loss": self.last_loss})


def train_steps(model: torch.nn.Module, dataset: list, batch_sampler: Sampler[list[int]],
                collate: Callable[[list], dict[str, Any]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int, *, max_grad_norm: float, seed: int,
                device: str, on_step: ProgressFn | None = None) -> float:
    """Trains `model` (its `forward` takes `collate`'s batch by name and returns {"loss": ...}) for `steps` optimizer
    steps on `dataset[i]` batches of `batch_sampler` (re-iterated once it runs out), clipping gradients at
    `max_grad_norm` (0: no clipping); returns the last step's loss."""
    report = _ReportLoss(on_step)
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer wants an output folder; nothing is saved in it
        args = TrainingArguments(scratch, max_steps=steps, max_grad_norm=max_grad_norm, logging_steps=1,
                                 save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
                                 use_cpu=device == "cpu", remove_unused_columns=False)
        trainer = _BatchSamplerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                       optimizers=(optimizer, scheduler), callbacks=[report],
                                       batch_sampler=batch_sampler)
        trainer.remove_callback(PrinterCallback)  # the demo shows its own progress bar
        trainer.train()
    return report.last_loss


__all__ = ["ProgressFn", "train_steps"]
