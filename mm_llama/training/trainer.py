"""`MMLlamaTrainer`: the HF Trainer with per-token loss weights, token accuracy, label-only logits, a projector
learning rate and stage-1 checkpoints that leave out the frozen LLM.

Everything else (loop, gradient accumulation, mixed precision, DDP/FSDP/DeepSpeed via accelerate, schedulers,
checkpoint rotation, resume, TensorBoard) is the Trainer's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..model.loss_mm_llama import LossBackend
from .setup import optimizer_param_groups

TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"
# Sums over the batches since the last report (training) or over the whole eval set (evaluation): correct answer
# tokens, answer tokens, answer CE; evaluation adds loss x denominator and the denominator, so that eval_loss is the
# weighted mean over all trained tokens rather than a mean of batch means.
_TRAIN_SUMS, _EVAL_SUMS = 3, 5


def _trained_weight_total(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss denominator of one batch, as the model computes it: the sum of the loss weights of the trained
    next-token targets (labels[:, 1:] != -100), or their count when the batch has no loss weights."""
    trained = batch["labels"][:, 1:] != -100
    if "loss_weights" in batch:
        return (batch["loss_weights"][:, 1:].float() * trained).sum()
    return trained.sum()


@contextlib.contextmanager
def _without_embedding_layers(model: nn.Module):
    """PEFT adds the full embedding and LM head (0.5 GB at 7B) to an adapter whose targets include lm_head, in case
    the vocabulary was resized; MM-LLaMA never resizes it (the placeholder is `<unk>`), so they are left out."""
    if not hasattr(model, "peft_config"):
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
    try:
        yield
    finally:
        del model.save_pretrained


def answer_metrics(correct: float, answers: float, answer_loss_sum: float) -> dict[str, float]:
    """`token_accuracy` and `answer_loss` from sums over answer tokens (empty when there were none)."""
    if answers <= 0:
        return {}
    return {"token_accuracy": correct / answers, "answer_loss": answer_loss_sum / answers}


class TrainingProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the latest loss, answer-token accuracy and learning rate on the bar itself
    instead of a printed dict per logging step; each evaluation is one line above the bar, and the final summary
    dict is left to the metrics block `train` prints. The evaluation's nested bar is drawn only on a terminal: in a
    log file its in-place redraws leave cursor-movement fragments."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if sys.stderr.isatty():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            shown = {"loss": logs["loss"], "acc": logs.get("token_accuracy"), "lr": logs.get("learning_rate")}
            self.training_bar.set_postfix({key: f"{value:.3g}" for key, value in shown.items() if value is not None})
        elif "eval_loss" in logs:
            self.training_bar.write(_evaluation_line(state.global_step, logs))
        elif "train_runtime" not in logs:
            super().on_log(args, state, control, logs=logs, **kwargs)


class TrainingLogPrinter(TrainerCallback):
    """Without a progress bar (`disable_tqdm`): one line per evaluation and a training line about every tenth of the
    run, instead of a printed dict per logging step (every logged value is in TensorBoard and trainer_state.json)."""

    def __init__(self):
        self.next_report = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.next_report = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            print(_evaluation_line(state.global_step, logs), flush=True)
        elif "loss" in logs and state.global_step >= self.next_report:
            self.next_report = state.global_step + max(1, state.max_steps // 10)
            shown = [f"loss {logs['loss']:.4g}"]
            if "token_accuracy" in logs:
                shown.append(f"answer-token accuracy {logs['token_accuracy']:.1%}")
            if "learning_rate" in logs:
                shown.append(f"lr {logs['learning_rate']:.3g}")
            print(f"step {state.global_step}/{state.max_steps}: " + ", ".join(shown), flush=True)


def _evaluation_line(step: int, logs: dict[str, float]) -> str:
    """'eval at step 200: loss 0.612, answer-token accuracy 50.7%, answer loss 0.655' from the eval logs."""
    parts = [f"loss {logs['eval_loss']:.4g}"]
    if "eval_token_accuracy" in logs:
        parts.append(f"answer-token accuracy {logs['eval_token_accuracy']:.1%}")
    if "eval_answer_loss" in logs:
        parts.append(f"answer loss {logs['eval_answer_loss']:.4g}")
    return f"eval at step {step}: " + ", ".join(parts)


def _with_listed_lengths(sampler):
    """`sampler` with its `lengths` as a list. Why: for `train_sampling_strategy: group_by_length` the Trainer hands
    `LengthGroupedSampler` the dataset's `length` column, which datasets >= 4 returns as a lazy `Column`; the sampler
    then reads it one row at a time, once per row every epoch (measured on the demo's smoke stage 2, 1,007 mixed
    rows: ~1 s an epoch, 20 -> 14 s over 6 epochs; at CC3M-595K's size, minutes per epoch). One slice reads the
    column at once."""
    lengths = getattr(sampler, "lengths", None)
    if lengths is not None and not isinstance(lengths, list):
        sampler.lengths = list(lengths[:])
    return sampler


class MMLlamaTrainer(Trainer):
    """Trainer for `MMLlamaForCausalLM` (plain or PEFT-wrapped), with batches from `MMLlamaDataCollator`.

    - Loss weights: with `loss_weights` in the batch (prompt_loss_weight > 0) the loss over a gradient-accumulation
      step is sum(weight * CE) / sum(weight) over the whole global batch: `num_items_in_batch` becomes the weight
      total instead of the token count.
    - The loss backend (`loss_backend`, from `loss_chunk_size` / `use_liger_loss`): the LM head runs only at trained
      positions (prompt and padding positions never go through it), all at once, in chunks or fused by Liger.
    - `token_accuracy` (next-token argmax accuracy on ANSWER tokens, the original MM-LLaMA's definition) and
      `answer_loss` (mean CE on answer tokens) are logged next to `loss`, from the model's sums over accumulation
      steps, logging interval and processes; `eval_token_accuracy` / `eval_answer_loss` likewise, pooled over the
      whole eval set (see `mm_llama.model.loss_mm_llama`).
    - `projector_learning_rate` (MMLlamaTrainingArguments) gives the projector its own parameter groups.
    - `save_trainable_only`: checkpoints of a model with frozen weights and no PEFT wrapper (stage 1) hold only the
      trainable parameters (`trainable_weights.safetensors`) besides optimizer / scheduler / RNG / trainer state;
      the final `save_model()` writes the full `save_pretrained` folder. Under DeepSpeed / FSDP checkpoints keep
      their own formats.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not supported: MM-LLaMA's loss is computed in the model "
                             "(with loss weights and label-only logits). Set it to 0.")
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func is not supported by MMLlamaTrainer: the model computes the loss.")
        self._train_sums = torch.zeros(_TRAIN_SUMS, dtype=torch.float64, device=self.args.device)
        self._eval_sums = torch.zeros(_EVAL_SUMS, dtype=torch.float64, device=self.args.device)
        self._saving_checkpoint = False
        self.last_eval_answer_tokens = 0
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(TrainingProgressCallback)
        if self.pop_callback(PrinterCallback) is not None:
            self.add_callback(TrainingLogPrinter)

    # ---------------------------------------------------------------- samplers

    def _get_train_sampler(self, train_dataset=None):
        return _with_listed_lengths(super()._get_train_sampler(train_dataset))

    def _get_eval_sampler(self, eval_dataset):
        return _with_listed_lengths(super()._get_eval_sampler(eval_dataset))

    # ---------------------------------------------------------------- loss

    @property
    def loss_backend(self) -> LossBackend:
        """The loss implementation from `loss_chunk_size` / `use_liger_loss` (MMLlamaTrainingArguments); plain
        TrainingArguments get the full loss at the trained positions."""
        return LossBackend(chunk_size=getattr(self.args, "loss_chunk_size", None),
                           use_liger=getattr(self.args, "use_liger_loss", True))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetches the micro-batches of one optimizer step; with loss weights, the loss denominator over them (and
        over all processes) is the total weight of the trained tokens rather than their count."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and "loss_weights" in batch_samples[0] and num_items_in_batch is not None:
            total = sum(_trained_weight_total(batch) for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total.reshape(1)).sum()
            num_items_in_batch = total
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The model's (weighted) loss, with the loss backend chosen here; records the metric sums.

        The backend (full / chunked / Liger, `loss_mm_llama.LossBackend`) is the trainer's choice, from its
        arguments, but the model runs it inside its forward: under FSDP and DeepSpeed ZeRO-3 the LM head weight is
        gathered only there, so the loss cannot be taken from `model.lm_head` once the forward has returned.
        """
        inputs = {**inputs, "loss_backend": self.loss_backend}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            sums = torch.stack([outputs.num_correct_tokens, outputs.num_answer_tokens, outputs.answer_loss_sum])
            sums = sums.to(self._train_sums.device, torch.float64)
            if model.training:
                self._train_sums += sums
            else:
                denominator = _trained_weight_total(inputs).to(self._eval_sums.device, torch.float64)
                self._eval_sums += torch.cat([sums, torch.stack([loss.detach().double() * denominator,
                                                                 denominator])])
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation is loss and accuracy only: no logits are gathered (they would be [num_trained, 32k])."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """Adds `{prefix}_token_accuracy` and `{prefix}_answer_loss` and makes `{prefix}_loss` the weighted mean over
        all trained tokens, each pooled over the whole eval set and summed over processes."""
        self._eval_sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        totals = self.accelerator.reduce(self._eval_sums.clone(), "sum").tolist()
        correct, answers, answer_loss, loss_sum, denominator = totals
        self.last_eval_answer_tokens = int(answers)  # how many tokens the accuracy counted (mm-llama evaluate)
        output.metrics.update({f"{metric_key_prefix}_{name}": value
                               for name, value in answer_metrics(correct, answers, answer_loss).items()})
        if denominator > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / denominator
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `token_accuracy` and `answer_loss` to each training log (every process calls `log` at the same steps,
        so the sums are added across processes here)."""
        if "loss" in logs:
            correct, answers, answer_loss = self.accelerator.reduce(self._train_sums.clone(), "sum").tolist()
            self._train_sums.zero_()
            logs.update({name: round(value, 6) for name, value in answer_metrics(correct, answers, answer_loss).items()})
        super().log(logs, start_time)

    # ---------------------------------------------------------------- optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the projector in its own parameter groups when `projector_learning_rate`
        is set."""
        projector_lr = getattr(self.args, "projector_learning_rate", None)
        if projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = optimizer_param_groups(
            opt_model, self.args.weight_decay,
            self.get_decay_parameter_names(opt_model), projector_learning_rate=projector_lr,
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------- checkpoints

    def _trainable_only_checkpoints(self) -> bool:
        """Stage-1 style checkpoints: a plain model with frozen weights, outside DeepSpeed / FSDP."""
        if not getattr(self.args, "save_trainable_only", False) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):  # PEFT checkpoints already hold only the adapter and modules_to_save
            return False
        return any(not p.requires_grad for p in model.parameters())

    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints of stage 1 write only the trainable parameters (plus processor and training args); PEFT
        outputs never carry the unchanged embedding and LM head."""
        if not (self._saving_checkpoint and self._trainable_only_checkpoints()):
            with _without_embedding_layers(self.accelerator.unwrap_model(self.model)):
                return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trainable = {name: param.detach().cpu().contiguous()
                     for name, param in model.named_parameters() if param.requires_grad}
        safetensors.torch.save_file(trainable, os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME),
                                    metadata={"format": "pt"})
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_trainable_weights(self, checkpoint_dir: str, model: nn.Module | None = None) -> bool:
        """Loads `trainable_weights.safetensors` if the checkpoint has it; returns whether it did."""
        path = os.path.join(checkpoint_dir, TRAINABLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return False
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        state_dict = safetensors.torch.load_file(path, device="cpu")
        parameters = dict(model.named_parameters())
        unknown = sorted(set(state_dict) - set(parameters))
        if unknown:
            raise ValueError(f"{path} holds parameters the model does not have: {unknown[:5]}... Resume with the "
                             "same model_name_or_path and stage as the interrupted run.")
        with torch.no_grad():
            for name, value in state_dict.items():
                parameters[name].copy_(value)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._load_trainable_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_trainable_weights(self.state.best_model_checkpoint):
            super()._load_best_model()


__all__ = ["MMLlamaTrainer", "TRAINABLE_WEIGHTS_NAME", "TrainingProgressCallback", "answer_metrics"]
