#!/usr/bin/env python
"""Training throughput: tokens/s and samples/s per optimizer step, padding waste with random order, length grouping
and padding-free packing; the chunked loss against the full loss (stage-2 step time at a fixed shape, loss-step peak
memory at vocabulary 32000); peak memory; plus a labelled calculation of GPU memory for 7B QLoRA stage 2.

    # tiny synthetic model + data on CPU (default)
    python scripts/benchmarks/train_throughput.py --threads 1
    # a real recipe (e.g. on a GPU), any recipe key can be overridden after it
    python scripts/benchmarks/train_throughput.py --recipe recipes/stage2_qlora.yaml --steps 20 -- --max_train_samples 2000

Prints one JSON object.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import PrinterCallback

from mm_llama.data.collator import MMLlamaDataCollator
from mm_llama.training import build_trainer, parse_args
# scripts/benchmarks/ is on sys.path when this script runs: its helper modules sit beside it.
from speed_helpers import loss_step_peak_memory, measure_trainer_steps, padding_share, stage2_step_times
from training_setup import estimate_qlora_stage2_memory_gib, synthetic_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="YAML recipe; default: a tiny synthetic stage-1/2 set-up on CPU")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2), help="synthetic set-up: which stage")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps measured (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8, help="synthetic: per-device batch")
    parser.add_argument("--hidden_size", type=int, default=256, help="synthetic: LLM width")
    parser.add_argument("--num_layers", type=int, default=2, help="synthetic: LLM depth")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--num_rows", type=int, default=1024, help="synthetic: conversations in the dataset")
    parser.add_argument("--skip_ordering", action="store_true", help="skip random / grouped / packed runs")
    parser.add_argument("--skip_loss", action="store_true", help="skip the full vs chunked loss comparison")
    parser.add_argument("--loss_chunk_size", type=int, default=1024, help="chunked loss: positions per chunk")
    parser.add_argument("--loss_vocab", type=int, default=32000, help="loss comparison: vocabulary size")
    parser.add_argument("--loss_steps", type=int, default=6, help="loss comparison: measured steps per variant")
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --max_seq_len 256")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if options.recipe:
            argv = [options.recipe, *options.overrides]
        else:
            llama_dir, dataset_dir = synthetic_setup(scratch / "data", num_rows=options.num_rows,
                                                     hidden_size=options.hidden_size, num_layers=options.num_layers)
            argv = ["--model_name_or_path", str(llama_dir), "--stage", "1", "--dtype", "float32",
                    "--dataset_paths", str(dataset_dir), "--eval_split", "", "--report_to", "none",
                    "--per_device_train_batch_size", str(options.batch_size), "--save_strategy", "no",
                    "--use_cpu", str(not torch.cuda.is_available()), "--disable_tqdm", "true",
                    "--logging_steps", "1000", "--max_seq_len", "512", *options.overrides]
            if options.stage == 2:  # stage 2 starts from a stage-1 folder: save the untrained stage-1 model
                model_args, _, _, _ = parse_args(argv + ["--output_dir", str(scratch / "s1")])
                from mm_llama.training.setup import load_stage_model

                model, processor = load_stage_model(model_args)
                model.save_pretrained(scratch / "s1")
                processor.save_pretrained(scratch / "s1")
                argv += ["--model_name_or_path", str(scratch / "s1"), "--stage", "2", "--prompt_loss_weight", "0.05"]
        results = {"machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
                              f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
                   "argv": argv}
        if not options.skip_ordering:
            results["ordering"] = compare_orderings(argv, scratch, options)
    if not options.skip_loss:
        results["loss"] = compare_losses(options)
    results["estimate_7b_qlora_stage2 (calculation)"] = {
        "recipe batch 8 x 512, prompt_loss_weight 0.05": estimate_qlora_stage2_memory_gib(8, 512, 1.0),
        "batch 1 x 512": estimate_qlora_stage2_memory_gib(1, 512, 1.0),
    }
    print(json.dumps(results, indent=2, default=str))


def compare_orderings(argv: list[str], scratch: Path, options) -> dict:
    """Random order, length grouping and padding-free packing on the same data: padding share over one epoch of the
    dataloader, then measured optimizer steps (tokens/s counts real tokens, not padding)."""
    results = {}
    for strategy in ("random", "group_by_length", "packing"):
        run_argv = argv + ["--output_dir", str(scratch / strategy), "--max_steps", str(options.steps + options.warmup),
                           "--train_sampling_strategy", "random" if strategy == "packing" else strategy,
                           "--packing", str(strategy == "packing").lower()]
        model_args, data_args, lora_args, training_args = parse_args(run_argv)
        trainer = build_trainer(model_args, data_args, lora_args, training_args)
        trainer.remove_callback(PrinterCallback)  # keep stdout for the JSON result
        extra = {}
        if strategy == "packing":
            packed = trainer.train_dataset
            extra = {"packed_rows": len(packed), "conversations": sum(len(p) for p in packed.packs),
                     "fill_ratio_of_full_rows": packed.fill_ratio(data_args.max_seq_len)}
        results[strategy] = {**padding_share(trainer, data_args.max_seq_len), **extra,
                             **measure_trainer_steps(trainer, options.warmup, data_args.max_seq_len)}
        if strategy == "random":
            results["tokenize_ms_per_row"] = tokenize_cost(trainer)
    return results


def compare_losses(options) -> dict:
    """The full loss against the chunked one: stage-2 LoRA step time at a fixed shape (batch x 512, no padding,
    prompt_loss_weight 0.05 so every text position is trained) and the loss step's peak memory."""
    sizes = [None, options.loss_chunk_size]
    steps = stage2_step_times(sizes, options.loss_steps, 2, options.batch_size, 512, options.loss_vocab,
                              options.hidden_size)
    positions = options.batch_size * 512
    memory = {str(size): loss_step_peak_memory(size, positions, options.hidden_size, options.loss_vocab)
              for size in sizes}
    full, chunked = str(None), str(options.loss_chunk_size)
    return {
        "shape": f"batch {options.batch_size} x 512, hidden {options.hidden_size}, 2 layers, vocab {options.loss_vocab}, "
                 "LoRA r64 q/v + projector",
        "stage2_step": {("full" if size == full else f"chunked {size}"): value for size, value in steps.items()},
        "stage2_step_speedup": steps[full]["step_seconds_median"] / steps[chunked]["step_seconds_median"],
        "loss_step_peak_memory_gib": {("full" if size == full else f"chunked {size}"): value
                                      for size, value in memory.items()},
        "loss_step_memory_ratio": memory[chunked] / memory[full],
        "loss_positions": positions,
    }


def tokenize_cost(trainer) -> float:
    """Milliseconds to tokenize one row on the fly (the collator's share of a step)."""
    collator: MMLlamaDataCollator = trainer.data_collator
    rows = [trainer.train_dataset[i] for i in range(min(64, len(trainer.train_dataset)))]
    start = time.perf_counter()
    for row in rows:
        collator.encode_row(row)
    return 1000 * (time.perf_counter() - start) / len(rows)


if __name__ == "__main__":
    main()
