"""Two-process DDP on CPU (gloo, launched with torchrun) matches one process with the same global batch (run in this
process, one thread, as `mm-llama train`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.cli import main

from training_utils import dataset_dir, llama_dir, single_torch_thread, stage1_args  # noqa: F401  (fixtures)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def launch(args: list[str], num_processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(TRAIN_SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(llama_dir, dataset_dir, tmp_path):
    # The same global batch of 8 per step: 2 processes x 2 rows x 2 accumulation steps vs 1 x 4 x 2. Sequential
    # sampling gives both runs the same rows each step; prompt_loss_weight > 0 exercises the loss-weight total
    # summed across processes.
    common = dict(max_steps=3, gradient_accumulation_steps=2, train_sampling_strategy="sequential",
                  prompt_loss_weight=0.1, learning_rate=1e-2)
    launch(stage1_args(llama_dir, [dataset_dir], tmp_path / "ddp", per_device_train_batch_size=2, **common), 2)
    assert main(["train", *stage1_args(llama_dir, [dataset_dir], tmp_path / "single", per_device_train_batch_size=4,
                                       **common)]) == 0

    ddp, single = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)

    def logs(folder):
        state = json.loads((tmp_path / folder / "trainer_state.json").read_text())
        return [(entry["loss"], entry["token_accuracy"]) for entry in state["log_history"] if "loss" in entry]

    ddp_logs, single_logs = logs("ddp"), logs("single")
    assert len(ddp_logs) == len(single_logs) == 3
    for (ddp_loss, ddp_accuracy), (loss, accuracy) in zip(ddp_logs, single_logs):
        assert ddp_loss == pytest.approx(loss, rel=1e-4)
        assert ddp_accuracy == pytest.approx(accuracy, abs=1e-6)
