#!/usr/bin/env python
"""Training throughput: tokens/s and samples/s per optimizer step, padding waste with and without length grouping,
peak memory; plus a labelled calculation of GPU memory for 7B QLoRA stage 2.

    # tiny synthetic model + data on CPU (default)
    python scripts/benchmarks/train_throughput.py
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
from training_setup import (  # beside this script
    estimate_qlora_stage2_memory_gib,
    measure_steps,
    padding_waste,
    synthetic_setup,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="YAML recipe; default: a tiny synthetic stage-1/2 set-up on CPU")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2), help="synthetic set-up: which stage")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps measured (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8, help="synthetic: per-device batch")
    parser.add_argument("--hidden_size", type=int, default=256, help="synthetic: LLM width")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --max_seq_len 256")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if options.recipe:
            argv = [options.recipe, *options.overrides]
        else:
            llama_dir, dataset_dir = synthetic_setup(scratch / "data", hidden_size=options.hidden_size)
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
        for strategy in ("random", "group_by_length"):
            run_argv = argv + ["--output_dir", str(scratch / strategy), "--train_sampling_strategy", strategy,
                               "--max_steps", str(options.steps + options.warmup)]
            trainer = build_trainer(*parse_args(run_argv))
            trainer.remove_callback(PrinterCallback)  # keep stdout for the JSON result
            waste = padding_waste(trainer)
            results[strategy] = {**waste, **measure_steps(trainer, options.warmup)}
        results["tokenize_ms_per_row"] = tokenize_cost(trainer)
    results["estimate_7b_qlora_stage2 (calculation)"] = {
        "recipe batch 8 x 512, prompt_loss_weight 0.05": estimate_qlora_stage2_memory_gib(8, 512, 1.0),
        "batch 1 x 512": estimate_qlora_stage2_memory_gib(1, 512, 1.0),
    }
    print(json.dumps(results, indent=2, default=str))


def tokenize_cost(trainer) -> float:
    """Milliseconds to tokenize one row on the fly (the collator's share of a step)."""
    collator: MMLlamaDataCollator = trainer.data_collator.collator
    rows = [trainer.train_dataset[i] for i in range(min(64, len(trainer.train_dataset)))]
    start = time.perf_counter()
    for row in rows:
        collator.encode_row(row)
    return 1000 * (time.perf_counter() - start) / len(rows)


if __name__ == "__main__":
    main()
