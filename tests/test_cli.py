"""`mm-llama <command>`: every command's --help answers without importing torch or transformers, and the errors a user
makes first are one line with the exact text and exit status, before any model is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mm_llama.cli import COMMANDS, SOURCE_KINDS, main
from training_utils import dataset_dir, llama_dir, single_torch_thread, stage1_args  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": "train.py", "build-datasets": "build_datasets.py", "chat": "chat.py", "evaluate": "evaluate.py",
           "convert-meta": "convert_meta_checkpoint.py", "convert-imagebind": "convert_imagebind_checkpoint.py",
           "merge": "convert_lora_checkpoint.py", "download-imagebind": "download_imagebind_checkpoint.py",
           "download-webvid": "download_webvid_dataset.py", "demo": "demo.py", "web": "web_demo.py",
           "serve": "serve.py"}


def run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def heavy_imports(importtime_log: str) -> set[str]:
    """Top-level packages among `torch`, `transformers`, `datasets` that `python -X importtime` reports."""
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in importtime_log.splitlines() if "|" in line}
    return names & {"torch", "transformers", "datasets", "peft", "accelerate"}


def assert_one_error_line(stderr: str, *names: str) -> None:
    """`stderr` is a single "error: ..." line (no traceback, no warning before it) that names each of `names`: the
    flag, key or value that is wrong and the fix."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    missing = [name for name in names if name not in lines[0]]
    assert not missing, f"{missing} not named in {lines[0]!r}"


def test_every_command_has_a_script_and_help_imports_nothing_heavy():
    assert set(SCRIPTS) == set(COMMANDS)
    for command, script in SCRIPTS.items():
        result = run(sys.executable, "-X", "importtime", f"scripts/{script}", "--help")
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith(f"usage: mm-llama {command}"), result.stdout[:200]
        assert heavy_imports(result.stderr) == set(), f"{script} --help imported {heavy_imports(result.stderr)}"


@pytest.mark.skipif(shutil.which("mm-llama") is None, reason="the package's console script is not installed")
def test_console_script():
    result = run("mm-llama", "--help")
    assert result.returncode == 0 and "commands:" in result.stdout
    assert all(f"  {name} " in result.stdout for name in COMMANDS)
    result = run("mm-llama", "chta")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "unknown command 'chta'", "did you mean 'chat'")


def test_argument_errors_exit_2_with_one_line(capsys):
    assert main(["chat", "model", "--image", "x.jpg"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--image", "--prompt", "/image PATH")
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: usage and one error line, status 2
        main(["merge"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("mm-llama merge: error: the following arguments")


def test_cli_source_kinds_match_the_readers():
    from mm_llama.data.sources import SOURCE_KINDS as READERS

    assert tuple(SOURCE_KINDS) == tuple(READERS)


def test_unknown_recipe_keys_are_one_line_with_a_suggestion(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"learning_rate": 1e-4, "output_dir": str(tmp_path / "out")}))
    # As a real process (the whole stderr: no traceback, no warning before it) ...
    result = run(sys.executable, "scripts/train.py", str(recipe), "--learnin_rate", "1e-3")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "unknown key 'learnin_rate'", "did you mean 'learning_rate'")
    # ... and a key in the YAML, in this process.
    recipe.write_text(yaml.safe_dump({"lerning_rate": 1e-4}))
    assert main(["train", str(recipe)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(recipe), "unknown key 'lerning_rate'",
                          "did you mean 'learning_rate'")


def test_dataset_and_output_errors_come_before_the_model_loads(llama_dir, dataset_dir, tmp_path, monkeypatch,
                                                               capsys):
    from mm_llama.training import run as training_run

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(training_run, "load_stage_model", must_not_load)
    missing = tmp_path / "missing"
    assert main(["train", *stage1_args(llama_dir, [missing], tmp_path / "out")]) == 1
    assert_one_error_line(capsys.readouterr().err, str(missing), "not found", "mm-llama build-datasets",
                          "dataset_paths")
    earlier = tmp_path / "earlier"
    (earlier / "checkpoint-500").mkdir(parents=True)
    assert main(["train", *stage1_args(llama_dir, [dataset_dir], earlier)]) == 1
    assert_one_error_line(capsys.readouterr().err, str(earlier), "checkpoint-500", "--resume_from_checkpoint latest",
                          "another output_dir")
    assert main(["train", *stage1_args(llama_dir, [dataset_dir], tmp_path / "new"),
                 "--resume_from_checkpoint", "latest"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--resume_from_checkpoint latest", str(tmp_path / "new"),
                          "no checkpoint-* folder")


def test_processor_from_a_llama_folder_is_ours_or_a_clear_error(tmp_path, spm_model_path):
    from mm_llama import MMLlamaProcessor, MMLlamaTokenizer

    llama = tmp_path / "llama"
    llama.mkdir()
    shutil.copy(spm_model_path, llama / "tokenizer.model")
    # A converted LLaMA folder also has a tokenizer_config.json naming another class: ours is used regardless.
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    processor = MMLlamaProcessor.from_pretrained(llama)
    assert type(processor.tokenizer) is MMLlamaTokenizer
    assert processor.tokenizer.encode_text("Hello  there") == MMLlamaTokenizer(str(spm_model_path)).encode_text(
        "Hello  there")
    with pytest.raises(FileNotFoundError) as error:
        MMLlamaProcessor.from_pretrained(tmp_path)
    assert_one_error_line(f"error: {error.value}", str(tmp_path), "processor_config.json", "tokenizer.model",
                          "pass the folder of a trained MM-LLaMA model or of a converted LLaMA model")
