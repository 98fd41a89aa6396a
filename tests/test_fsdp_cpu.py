"""FSDP on CPU: a stage-2 (LoRA) step sharded over 2 processes (gloo) as recipes/accelerate_configs/fsdp.yaml shards
it gives the loss and gradients of one process, with the full and the chunked loss.

accelerate (1.15) selects FSDP only for GPU-like distributed types (`accelerate launch --cpu` becomes plain
multi-CPU DDP), so the config cannot be launched on a CPU as is. The worker below applies the config's sharding
itself with torch's FSDP2 (`fully_shard` on each `fsdp_transformer_layer_cls_to_wrap` module, then the root, with the
config's `fsdp_reshard_after_forward`), which is what accelerate does for `fsdp_version: 2` on GPUs.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from training_utils import dataset_dir, llama_dir, single_torch_thread, stage1_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml"

WORKER = textwrap.dedent('''
    """One stage-2 step: rank 0 computes the one-process reference on the whole batch, then every rank runs its half
    of the batch through the FSDP2-sharded model; rank 0 writes both results."""
    import copy, json, os, sys
    import torch, torch.distributed as dist, yaml, datasets
    from torch.distributed.fsdp import fully_shard

    from mm_llama.data.collator import MMLlamaDataCollator
    from mm_llama.model.loss_mm_llama import LossBackend
    from mm_llama.training.arguments import LoraArguments, ModelArguments
    from mm_llama.training.setup import load_stage_model

    stage1, dataset, config_path, output, chunk = sys.argv[1:6]
    chunk = None if chunk == "none" else int(chunk)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, processor = load_stage_model(
        ModelArguments(model_name_or_path=stage1, stage=2, dtype="float32", media_embed_dim=16),
        LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    # LoRA's B starts at zero: give it values so that the adapters' gradients are not trivially equal.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows = datasets.load_from_disk(dataset)["train"].with_format(
        "numpy", columns=["media_embeds"], output_all_columns=True).select(range(4))
    collator = MMLlamaDataCollator(processor, max_seq_len=None, prompt_loss_weight=0.1)
    batch = collator([rows[i] for i in range(4)])
    denominator = (batch["loss_weights"][:, 1:] * (batch["labels"][:, 1:] != -100)).sum()

    def trainable_grads(module):
        grads = {}
        for name, param in module.named_parameters():
            if param.requires_grad and param.grad is not None:
                grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                grads[name] = grad.detach().clone()
        return grads

    result = {}
    if rank == 0:
        reference = copy.deepcopy(model)
        loss = reference(**batch, num_items_in_batch=denominator, loss_backend=LossBackend(chunk_size=chunk)).loss
        loss.backward()
        result["reference_loss"] = float(loss)
        reference_grads = trainable_grads(reference)

    config = yaml.safe_load(open(config_path))["fsdp_config"]
    assert config["fsdp_version"] == 2 and config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    wrap = {name.strip() for name in str(config["fsdp_transformer_layer_cls_to_wrap"]).split(",")}
    reshard = bool(config.get("fsdp_reshard_after_forward", True))
    wrapped = 0
    for module in list(model.modules()):
        if type(module).__name__ in wrap:
            fully_shard(module, reshard_after_forward=reshard)
            wrapped += 1
    fully_shard(model, reshard_after_forward=reshard)
    half = {name: value[2 * rank: 2 * rank + 2] for name, value in batch.items() if name != "media_embeds"}
    half["media_embeds"] = batch["media_embeds"][2 * rank: 2 * rank + 2]  # one media item per row
    # The backend goes into the sharded model's forward: the LM head weight is gathered only there.
    loss = model(**half, num_items_in_batch=denominator, loss_backend=LossBackend(chunk_size=chunk)).loss
    loss.backward()
    # Each rank's loss is its share of the global sum(w * CE) / sum(w); FSDP averages gradients over ranks, so the
    # gradient of the global loss is world x the reduced one (the Trainer scales the loss likewise).
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = trainable_grads(model)
    if rank == 0:
        differences = {name: float((grads[name] * world - grad).abs().max()) for name, grad in reference_grads.items()}
        result.update({"sharded_loss": float(total), "wrapped_layers": wrapped, "max_grad_difference": differences,
                       "grad_names_match": sorted(grads) == sorted(reference_grads),
                       "lora_grad_norm": float(sum(g.norm() for n, g in reference_grads.items() if "lora" in n))})
        json.dump(result, open(output, "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow
@pytest.mark.parametrize("chunk", ["8"])  # the chunked loss, the default; it equals the full loss (test_chunked_loss)
def test_fsdp_stage2_step_matches_one_process(stage1_dir, dataset_dir, tmp_path, chunk):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    output = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(worker),
               str(stage1_dir), str(dataset_dir), str(FSDP_CONFIG), str(output), chunk]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["wrapped_layers"] == 2  # both decoder layers of the tiny LLaMA became FSDP units
    assert report["sharded_loss"] == pytest.approx(report["reference_loss"], rel=1e-5)
    assert report["grad_names_match"] and report["lora_grad_norm"] > 0
    assert report["max_grad_difference"]  # LoRA and projector gradients were compared
    for name, difference in report["max_grad_difference"].items():
        assert difference < 1e-5, name


# ---------------------------------------------------------------- combinations refused before training


def accelerate_environment(config_name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file recipes/accelerate_configs/<name>.yaml` gives the training
    processes, computed by accelerate's own launcher code (without launching)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = ROOT / "recipes" / "accelerate_configs" / f"{config_name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2",
                                               str(ROOT / "scripts" / "train.py")])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command prepares it
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys() if defaults else [])
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def recipe_args(name: str, *overrides: str):
    from mm_llama.training import parse_args

    return parse_args([str(ROOT / "recipes" / name), "--output_dir", "/tmp/unused", "--use_cpu", "true",
                       "--bf16", "false", *overrides])


@pytest.mark.parametrize("config,refused", [("fsdp", True), ("deepspeed_zero3", True), ("deepspeed_zero2", False),
                                            ("ddp", False)])
def test_qlora_is_refused_where_4bit_weights_cannot_be_sharded(config, refused):
    from mm_llama.training.distributed_checks import check_distributed_compatibility

    model_args, data_args, _, training_args = recipe_args("stage2_qlora.yaml")
    environ = accelerate_environment(config)
    if refused:
        with pytest.raises(ValueError, match=r"QLoRA \(load_in_4bit: true\) cannot run under"):
            check_distributed_compatibility(model_args, training_args, data_args, environ)
    else:
        check_distributed_compatibility(model_args, training_args, data_args, environ)
    # Stage 2 without 4 bit is fine under every config.
    model_args, data_args, _, training_args = recipe_args("stage2.yaml")
    setup = check_distributed_compatibility(model_args, training_args, data_args, environ)
    assert setup.fsdp == (config == "fsdp")
    assert setup.deepspeed_zero_stage == {"deepspeed_zero3": 3, "deepspeed_zero2": 2}.get(config)


def test_activation_checkpointing_requested_twice_is_refused():
    from mm_llama.training.distributed_checks import check_distributed_compatibility

    model_args, data_args, _, training_args = recipe_args("stage2.yaml", "--activation_checkpointing", "true")
    environ = {**accelerate_environment("fsdp"), "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    with pytest.raises(ValueError, match="requested twice"):
        check_distributed_compatibility(model_args, training_args, data_args, environ)
    check_distributed_compatibility(model_args, training_args, data_args, accelerate_environment("fsdp"))
