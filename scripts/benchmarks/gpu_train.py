#!/usr/bin/env python
"""GPU training, generation and encoder throughput at the real shapes, on random weights.

Builds LLaMA-2-7B + the linear projector (random init: speed and memory do not depend on the weight values) and
measures, for stage 1 (LLM frozen, projector trained), stage 2 LoRA (r 64 on q/v + projector) and stage 2 QLoRA
(nf4 + double quant, activation checkpointing, paged AdamW, as recipes/stage2_qlora.yaml), at batch x length 8 x 512
and 1 x 512: tokens/s, MFU and peak GPU memory. Then generation tokens/s at batch 1, 8 and 32 (greedy, KV cache,
a fixed number of new tokens) and ImageBind-huge images/s and videos/s in float32 (eager attention) vs bfloat16 + SDPA.

    python scripts/benchmarks/gpu_train.py                    # whatever CUDA GPU is present
    python scripts/benchmarks/gpu_train.py --peak_tflops 312  # a card missing from PEAK_BF16_TFLOPS
    python scripts/benchmarks/gpu_train.py --tiny             # the same code at toy sizes on CPU (CI runs it)

MFU = model FLOPs of a step / step time / the card's peak dense bf16 tensor FLOPs (the JSON states the peak used).
Model FLOPs per step, counted as matmul FLOPs (2 per multiply-add):
  - forward: 2 x (parameters of every linear layer a token passes through: attention, MLP, LoRA adapters) per token,
    + the LM head (2 x vocab x hidden) per TRAINED position only (the model computes logits only there),
    + attention scores and mixing 4 x layers x hidden x seq_len per token (PaLM's convention, causal masking ignored);
  - backward: the input gradients of every linear layer and of the LM head (the same FLOPs as their forward: gradients
    flow down to the media placeholder, so through every layer), 2x the attention forward (dQ, dK, dV),
    + 2 x trainable linear parameters per token for weight gradients (projector / LoRA; frozen weights get none);
    activation-checkpointing recomputation is not counted (it is hardware FLOPs, not model FLOPs).
Prints one JSON object. QLoRA is recorded as {"skipped": reason} only where bitsandbytes cannot run 4-bit layers on
the device (`qlora_unavailable`); any other error in a measurement fails the run (running out of memory is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# scripts/benchmarks/ is on sys.path when this script runs.
from speed_helpers import fixed_shape_batch, timed_training_step  # noqa: I001

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOPS, matched against torch.cuda.get_device_name() in this order
# (the more specific names first: "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
# Sources: NVIDIA datasheets (A100 312; H100 SXM 989, PCIe 756, NVL 835; H200 989, H200 NVL 835; L4 121; L40S 362;
# A10 125) and the Ada / Ampere GA102 whitepapers for GeForce cards (bf16 with fp32 accumulation: RTX 4090 165.2,
# RTX 3090 71). The A10G (AWS) has no NVIDIA datasheet; 70 is the commonly quoted figure: check it and pass
# --peak_tflops if you know better.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a `torch.cuda.get_device_name()` string (None when the card is not listed)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---------------------------------------------------------------- shapes


def llama_config(tiny: bool, num_layers: int | None = None):
    """LLaMA-2-7B's `LlamaConfig` (or a toy one with the same structure); `num_layers` overrides the depth."""
    from transformers import LlamaConfig

    if tiny:
        sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4)
    else:
        sizes = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32)
    if num_layers is not None:
        sizes["num_hidden_layers"] = num_layers
    return LlamaConfig(**sizes, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None, tie_word_embeddings=False, use_cache=False)


def media_dim(tiny: bool) -> int:
    return 32 if tiny else 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, Any]):
    """Records CUDA peak allocated / reserved memory (GiB) of the block into `into`."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        synchronize(device)
        into["peak_gpu_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        into["peak_gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30


def run_guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """`fn()`, or {"error": "out of memory ..."} when the card runs out of memory (the next measurement still runs)."""
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        free_memory(device)
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}


# ---------------------------------------------------------------- FLOPs


def linear_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) in_features x out_features of the linear layers inside the decoder layers (base layers,
    4-bit layers and LoRA adapters alike): the per-token matmul parameters of the language model's body."""
    total = trainable = 0
    for name, module in model.named_modules():
        if "language_model." in name and ".layers." in name and isinstance(module, nn.Linear):
            size = module.in_features * module.out_features
            total += size
            if module.weight.requires_grad:
                trainable += size
    return total, trainable


def training_flops(model: nn.Module, text_config, batch_size: int, seq_len: int, trained_positions: int,
                   projector_trainable: bool) -> float:
    """Model FLOPs of one optimizer step (see the module docstring for what is counted)."""
    body, body_trainable = linear_parameters(model)
    tokens = batch_size * seq_len
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    attention = 4 * layers * hidden * seq_len  # per token, forward
    head = 2 * text_config.vocab_size * hidden  # per trained position, forward
    linear = tokens * 2 * body + trained_positions * head
    forward = linear + tokens * attention
    backward = linear + 2 * tokens * attention + tokens * 2 * body_trainable
    # One media vector per row through the projector (media_dim x hidden): forward, and weight gradients if trained.
    projector = batch_size * 2 * media_dim_of(model) * hidden * (3 if projector_trainable else 1)
    return float(forward + backward + projector)


def media_dim_of(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.media_embed_dim


# ---------------------------------------------------------------- training


def measure_training(model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], shapes: list[tuple],
                     device: torch.device, steps: int, warmup: int, peak_tflops: float | None,
                     loss_chunk_size: int | None, projector_trainable: bool) -> dict[str, Any]:
    """Optimizer steps (forward with label-only logits under bf16 autocast on CUDA, backward, optimizer) at each
    (batch, seq_len): median step time, tokens/s, MFU, peak memory."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.text_config
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    results = {}
    for batch_size, seq_len in shapes:
        def run() -> dict[str, Any]:
            batch = fixed_shape_batch(batch_size, seq_len, text_config.vocab_size, base.config.media_embed_dim,
                                      device)
            optimizer = make_optimizer()
            model.train()
            times, record = [], {}
            with peak_memory(device, record):
                for step in range(warmup + steps):
                    seconds, loss = timed_training_step(model, batch, optimizer, autocast, loss_chunk_size)
                    if step >= warmup:
                        times.append(seconds)
            del optimizer
            seconds = statistics.median(times)
            trained = int((batch["labels"][:, 1:] != -100).sum())
            flops = training_flops(model, text_config, batch_size, seq_len, trained, projector_trainable)
            record.update({"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                           "linear_4bit_layers": sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith(
                               "bitsandbytes") for m in model.modules()),
                           "step_seconds_median": seconds, "tokens_per_second": batch_size * seq_len / seconds,
                           "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
                           "loss": float(loss.detach())})
            if peak_tflops:
                record["mfu"] = flops / seconds / (peak_tflops * 1e12)
            return record

        results[f"{batch_size}x{seq_len}"] = run_guarded(run, device)
        free_memory(device)
    return results


def adamw(model: nn.Module, device: torch.device) -> Callable[[], torch.optim.Optimizer]:
    """AdamW over the trainable parameters (fused on CUDA, as `optim: adamw_torch_fused`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


def paged_adamw(model: nn.Module, device: torch.device) -> Callable[[], torch.optim.Optimizer]:
    """bitsandbytes' PagedAdamW32bit (`optim: paged_adamw_32bit` of the QLoRA recipe) on CUDA; AdamW elsewhere."""
    if device.type != "cuda":
        return adamw(model, device)
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: bnb.optim.PagedAdamW32bit(params, lr=1e-5)


def qlora_unavailable(device: torch.device) -> str | None:
    """Why bitsandbytes cannot run QLoRA's 4-bit layers on `device` here, or None when it can: the one reason for
    which the QLoRA measurement is skipped (any other error in it fails the run). Probed with one nf4 layer's
    forward, in bfloat16 as QLoRA computes, so that a build without a backend for this machine is told apart from a
    broken QLoRA set-up."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        layer(torch.ones(2, 64, device=device, dtype=torch.bfloat16))
    except Exception as error:  # noqa: BLE001  # whatever bitsandbytes raises for an unsupported machine
        return f"bitsandbytes cannot run a 4-bit layer on {device.type} here: {type(error).__name__}: {error}"
    return None


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, num_layers: int | None = None):
    """A random-init MMLlamaForCausalLM (LLaMA-2-7B + linear projector, or the toy version) on `device`."""
    from mm_llama import MMLlamaConfig, MMLlamaForCausalLM

    config = MMLlamaConfig(text_config=llama_config(tiny, num_layers), media_embed_dim=media_dim(tiny), projector_type="linear")
    torch.manual_seed(0)
    with torch.device(device):
        model = MMLlamaForCausalLM._from_config(config, dtype=dtype)
    return model


def stage_runs(args, device: torch.device, dtype: torch.dtype, peak: float | None, work_dir: Path,
               results: dict[str, Any], save: Callable[[], None]) -> None:
    """Stage 1, generation, stage 2 LoRA, stage 2 QLoRA, on one random model (saved once for the 4-bit load), each
    result put into `results` and `save()`d as soon as it is measured (a run stopped midway keeps what it measured)."""
    from peft import get_peft_model

    from mm_llama.loading import lora_config
    from mm_llama.training.arguments import LoraArguments, ModelArguments
    from mm_llama.training.setup import freeze_for_stage1, load_stage2_model, upcast_trainable

    shapes = [(2, 64), (1, 64)] if args.tiny else [(8, 512), (1, 512)]
    common = dict(device=device, steps=args.steps, warmup=args.warmup, peak_tflops=peak,
                  loss_chunk_size=args.loss_chunk_size)
    qlora_skipped = qlora_unavailable(device) if "qlora" in args.stages else None  # recorded; the others stand
    model = build_model(args.tiny, device, dtype)
    folder = work_dir / "random_mm_llama"
    if "qlora" in args.stages and not qlora_skipped:
        model.save_pretrained(folder)  # the 4-bit model is loaded from disk, as training loads it

    if "stage1" in args.stages:
        freeze_for_stage1(model)
        upcast_trainable(model)
        results["stage1"] = measure_training(model, adamw(model, device), shapes, projector_trainable=True, **common)
        save()
    if not args.skip_generation:
        results["generation"] = measure_generation(model, args, device)
        save()
    if "lora" in args.stages:
        model.requires_grad_(False)
        model = get_peft_model(model, lora_config(model))  # our recipes' LoRA (loading.LORA_DEFAULTS)
        upcast_trainable(model)
        results["stage2_lora"] = measure_training(model, adamw(model, device), shapes, projector_trainable=True,
                                                  **common)
        save()
    del model
    free_memory(device)

    if "qlora" in args.stages:
        def qlora() -> dict[str, Any]:
            # Exactly what `mm-llama train recipes/stage2_qlora.yaml` sets up: nf4 + double quant, bf16 compute,
            # k-bit preparation with checkpointing, the recipes' LoRA, trainable parameters in fp32.
            model_args = ModelArguments(model_name_or_path=str(folder), stage=2, dtype="bfloat16", load_in_4bit=True,
                                        bnb_4bit_compute_dtype="bfloat16", upcast_trainable_params=True)
            quantized = load_stage2_model(model_args, LoraArguments(), gradient_checkpointing=True,
                                          gradient_checkpointing_kwargs={"use_reentrant": False})
            return measure_training(quantized, paged_adamw(quantized, device), shapes, projector_trainable=True,
                                    **common)

        results["stage2_qlora_nf4"] = {"skipped": qlora_skipped} if qlora_skipped else run_guarded(qlora, device)
        free_memory(device)
        save()


# ---------------------------------------------------------------- generation


@torch.inference_mode()
def measure_generation(model: nn.Module, args, device: torch.device) -> dict[str, Any]:
    """Greedy generation with the KV cache: new tokens/s at each batch size (prompt of `prompt_len` tokens with one
    media item; exactly `new_tokens` tokens generated per row)."""
    model.eval()
    prompt_len, new_tokens = (16, 4) if args.tiny else (128, 128)
    results = {}
    for batch_size in args.generation_batch_sizes:
        def run() -> dict[str, Any]:
            batch = fixed_shape_batch(batch_size, prompt_len, model.config.text_config.vocab_size,
                                      model.config.media_embed_dim, device)
            kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          media_embeds=batch["media_embeds"].to(model.dtype), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=2)
            record: dict[str, Any] = {}
            model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            with peak_memory(device, record):
                synchronize(device)
                start = time.perf_counter()
                output = model.generate(**kwargs)
                synchronize(device)
                seconds = time.perf_counter() - start
            generated = output.shape[1] - prompt_len
            record.update({"prompt_tokens": prompt_len, "new_tokens_per_row": generated, "seconds": seconds,
                           "new_tokens_per_second": batch_size * generated / seconds})
            return record

        results[f"batch {batch_size}"] = run_guarded(run, device)
        free_memory(device)
    return results


# ---------------------------------------------------------------- ImageBind


@torch.inference_mode()
def measure_imagebind(args, device: torch.device) -> dict[str, Any]:
    """ImageBind-huge (or tiny) images/s and videos/s (15 views x 2 frames each) in float32 with eager attention
    vs bfloat16 with SDPA (CPU: float32 / SDPA for the second, where bf16 matmuls are slow)."""
    from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel

    preset = "tiny" if args.tiny else "huge"
    size = 224
    image_batch, video_batch = (2, 1) if args.tiny else (32, 4)
    model = ImageBindVisionModel(ImageBindVisionConfig.from_preset(preset, image_size=size)).eval()
    results: dict[str, Any] = {"preset": preset, "image_batch": image_batch, "video_batch": video_batch,
                               "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6}
    settings = [("float32", torch.float32, "eager"), ("bfloat16", torch.bfloat16, "sdpa")]
    for name, dtype, attention in settings:
        def run() -> dict[str, Any]:
            encoder = model.to(device=device, dtype=dtype)
            encoder.set_attn_implementation(attention)
            record: dict[str, Any] = {}
            images = torch.randn(image_batch, 3, size, size, device=device, dtype=dtype)
            videos = torch.randn(video_batch, 15, 3, 2, size, size, device=device, dtype=dtype)
            with peak_memory(device, record):
                record["images_per_second"] = image_batch / best_time(lambda: encoder(images), device, args)
                record["videos_per_second"] = video_batch / best_time(lambda: encoder(videos), device, args)
            return record

        results[f"{name} + {attention}"] = run_guarded(run, device)
        free_memory(device)
    return results


def best_time(fn: Callable[[], Any], device: torch.device, args) -> float:
    for _ in range(args.warmup):
        fn()
    best = float("inf")
    for _ in range(max(args.steps, 1)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU (or the GPU if present): tests the code")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak dense bf16 TFLOPS of the card for MFU (default: the table, by device name)")
    parser.add_argument("--stages", nargs="+", default=["stage1", "lora", "qlora"], choices=["stage1", "lora", "qlora"])
    parser.add_argument("--steps", type=int, default=5, help="measured steps / timed runs per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--generation_batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--loss_chunk_size", type=int, default=None,
                        help="train with the chunked / Liger loss (positions per chunk); default: the full loss")
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--skip_imagebind", action="store_true")
    parser.add_argument("--work_dir", default=None, help="where the random 7B is saved for the 4-bit load "
                                                         "(13.5 GB; default: a temporary folder)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        parser.error("No CUDA GPU: the real shapes (7B) need one. Use --tiny to run the same code at toy sizes.")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    peak = args.peak_tflops or (peak_bf16_tflops(name) if device.type == "cuda" else None)
    results: dict[str, Any] = {
        "device": name,
        "peak_bf16_tflops_assumed": peak,
        "peak_source": ("--peak_tflops" if args.peak_tflops else "PEAK_BF16_TFLOPS table" if peak else
                        "unknown card: MFU not computed (pass --peak_tflops)"),
        "shapes": "toy" if args.tiny else "LLaMA-2-7B + linear projector (1024 -> 4096); ImageBind-huge",
        "torch": torch.__version__,
        "loss": "full" if args.loss_chunk_size is None else f"chunked/liger, chunk {args.loss_chunk_size}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        results["gpu_memory_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        results["load_average"] = os.getloadavg()[0]

    def save() -> None:
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")

    if not args.skip_imagebind:  # first: it needs no 7B on disk, and a long run stopped later still has it
        results["imagebind"] = measure_imagebind(args, device)
        save()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        stage_runs(args, device, dtype, peak, Path(work_dir), results, save)
    print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
