"""scripts/benchmarks/gpu_train.py: the --tiny run (the code a GPU run executes, at toy sizes on CPU), the peak-FLOPs
table and the model-FLOPs count behind MFU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmarks" / "gpu_train.py"


@pytest.fixture(scope="module")
def gpu_train():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.slow
def test_tiny_run_measures_every_stage_generation_and_the_encoder(gpu_train, tmp_path):
    output = tmp_path / "gpu_train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--warmup", "0", "--output",
                             str(output), "--loss_chunk_size", "16"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert json.loads(result.stdout) == report
    assert report["device"].startswith("CPU") and report["peak_bf16_tflops_assumed"] is None
    # QLoRA is skipped exactly where bitsandbytes cannot run a 4-bit layer on this CPU, with that reason.
    unavailable = gpu_train.qlora_unavailable(torch.device("cpu"))
    assert report["stage2_qlora_nf4"].get("skipped") == unavailable
    for stage in ("stage1", "stage2_lora", "stage2_qlora_nf4"):
        if "skipped" in report[stage]:
            continue
        assert set(report[stage]) == {"2x64", "1x64"}, stage
        for record in report[stage].values():
            assert record["tokens_per_second"] > 0 and record["model_tflops_per_step"] > 0
            assert record["loss"] == pytest.approx(6.24, abs=0.3)  # ~ln(512): random weights, chunked loss
            assert "mfu" not in record  # no peak known for a CPU
    # Stage 1 trains the projector only (32 x 64 + 64); LoRA adds adapters; QLoRA's layers are 4-bit.
    assert report["stage1"]["2x64"]["trainable_parameters"] == 32 * 64 + 64
    assert report["stage2_lora"]["2x64"]["trainable_parameters"] > 32 * 64 + 64
    assert report["stage1"]["2x64"]["linear_4bit_layers"] == 0
    if "skipped" not in report["stage2_qlora_nf4"]:
        assert report["stage2_qlora_nf4"]["2x64"]["linear_4bit_layers"] == 2 * 7
    assert {key: value["new_tokens_per_row"] for key, value in report["generation"].items()} == {
        "batch 1": 4, "batch 8": 4, "batch 32": 4}
    for setting in ("float32 + eager", "bfloat16 + sdpa"):
        assert report["imagebind"][setting]["images_per_second"] > 0
        assert report["imagebind"][setting]["videos_per_second"] > 0


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", 71.0), ("Tesla T4", None),
])
def test_peak_table_matches_device_names(gpu_train, name, peak):
    assert gpu_train.peak_bf16_tflops(name) == peak


def test_model_flops_of_a_stage1_step(gpu_train):
    config = gpu_train.llama_config(tiny=True)
    model = gpu_train.build_model(True, torch.device("cpu"), torch.float32)
    from mm_llama.training.setup import freeze_for_stage1

    freeze_for_stage1(model)
    h, i, layers, vocab, seq, batch, trained = 64, 172, 2, 512, 64, 2, 100
    body = layers * (4 * h * h + 3 * h * i)
    tokens = batch * seq
    linear = 2 * body * tokens + 2 * vocab * h * trained
    attention = 4 * layers * h * seq * tokens
    projector = batch * 2 * 32 * h * 3  # forward + input and weight gradients of the trained projector
    expected = (linear + attention) + (linear + 2 * attention) + projector
    assert gpu_train.training_flops(model, config, batch, seq, trained, projector_trainable=True) == expected


QLORA_ONLY = ["--tiny", "--stages", "qlora", "--skip_generation", "--skip_imagebind", "--steps", "1", "--warmup", "0",
              "--device", "cpu"]


def test_a_qlora_error_fails_the_run(gpu_train, monkeypatch):
    """Only bitsandbytes being unable to run 4-bit here skips QLoRA: a broken QLoRA set-up is an error, which makes
    `python gpu_train.py` exit non-zero (the benchmark of a QLoRA regression must not pass as "skipped")."""
    import mm_llama.training.setup

    def broken(*args, **kwargs):
        raise RuntimeError("simulated QLoRA set-up regression")

    monkeypatch.setattr(gpu_train, "qlora_unavailable", lambda device: None)  # whatever this machine's bitsandbytes
    monkeypatch.setattr(mm_llama.training.setup, "quantization_config", broken)  # training's QLoRA set-up
    with pytest.raises(RuntimeError, match="simulated QLoRA set-up regression"):
        gpu_train.main(QLORA_ONLY)


def test_qlora_is_skipped_where_bitsandbytes_cannot_run_4bit(gpu_train, monkeypatch, capsys):
    bnb = pytest.importorskip("bitsandbytes")

    def no_backend(self, x):  # what a bitsandbytes build without this machine's kernels raises
        raise NotImplementedError("Could not run 'bitsandbytes::gemv_4bit' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_backend)
    reason = gpu_train.qlora_unavailable(torch.device("cpu"))
    assert reason == ("bitsandbytes cannot run a 4-bit layer on cpu here: NotImplementedError: Could not run "
                      "'bitsandbytes::gemv_4bit' with arguments from the 'CPU' backend.")
    report = gpu_train.main(QLORA_ONLY)
    assert report["stage2_qlora_nf4"] == {"skipped": reason}
    assert json.loads(capsys.readouterr().out)["stage2_qlora_nf4"] == {"skipped": reason}


def test_real_shapes_need_a_gpu(gpu_train, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_train.main([])
    assert "--tiny" in capsys.readouterr().err


@pytest.mark.slow
def test_train_throughput_compares_orderings_and_losses_at_toy_sizes():
    """scripts/benchmarks/train_throughput.py, the CPU benchmark behind BENCHMARKS.md, at toy sizes: every part runs
    and its figures are consistent (packing pads least, the chunked loss gives the full loss's value)."""
    script = ROOT / "scripts" / "benchmarks" / "train_throughput.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(script), "--threads", "1", "--steps", "1", "--warmup", "0",
                             "--num_rows", "24", "--batch_size", "2", "--hidden_size", "32", "--loss_vocab", "512",
                             "--loss_steps", "1"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    ordering = report["ordering"]
    assert ordering["packing"]["padding_share"] < ordering["group_by_length"]["padding_share"] < (
        ordering["random"]["padding_share"])
    assert ordering["packing"]["conversations"] == 24  # every conversation packed once
    steps = report["loss"]["stage2_step"]
    assert steps["full"]["first_loss"] == pytest.approx(steps["chunked 1024"]["first_loss"], rel=1e-4)
    assert report["loss"]["loss_step_memory_ratio"] < 1
