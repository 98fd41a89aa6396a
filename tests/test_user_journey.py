"""README's real-training commands and docs/data.md's own-data example, run as a user runs them: one after another,
each a new process with stdin closed, on tiny stand-ins in the real formats.

How the commands stay verbatim: the commands are read from the docs' ```bash blocks (tests/doc_commands.py), never
restated here. They run with the working directory set to a temporary project folder that holds what the docs'
relative paths name (`recipes/` and `scripts/` from this repository; `llama-2-7b-chat/`, `cc3m/`, `coco/`, `webvid/`,
`my_data/`, `cat.jpg`, ... as tiny stand-ins written here), so `outputs/...` and `checkpoints/...` are the docs' own
paths. To make a command tiny and CPU-only, only documented flags are appended (`OVERRIDES`: recipe keys such as
`--max_steps 2 --bf16 false`, accelerate's `--cpu`, build-datasets' `--num_workers 0`); `mm-llama download-imagebind`
gets its documented `--url` with a `file://` URL of the stand-in checkpoint, as there is no network here.

Each process: stdin is /dev/null (an interactive question would read EOF and fail), the environment has nothing that
imports or registers MM-LLaMA beforehand (no PYTHONPATH, no PYTHONSTARTUP), its exit status must be 0 and its output
must hold no prompt. Outputs are checked where they are cheap to check (folders exist, manifest counts, a non-empty
chat answer, evaluate's metrics, the merged folder loading with AutoModelForCausalLM in a fresh interpreter).

What runs: README's whole "Real training" block (convert-meta, download-imagebind, convert-imagebind, three
build-datasets with LLaVA and VideoChat sources, stage 1, stage 2 from the stage-1 folder, merge, a one-shot chat);
docs/training.md's `--resume_from_checkpoint latest`, dataset evaluation and stage 2 under `accelerate launch` with 2
CPU processes; docs/chat.md's one-shot and batch-file chats and its two Python examples in a new interpreter; and
docs/data.md's own-data example (its records file as the doc shows it, built with `--source records`, then stage
2). The other commands of those pages (interactive chat, QA evaluation, merging the own-data run, the mixing run)
repeat what runs here with other arguments and are parsed by tests/test_docs.py.

One sequence, run once (a module-scoped fixture), every later step reusing the earlier steps' outputs; tiny sizes
and 2-3 optimizer steps keep it to the cost of its process start-ups (18 commands, ~5 s of imports each).
`pytest -s` prints each command's wall and CPU time.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from sentencepiece import SentencePieceProcessor

from doc_commands import REPO, DocCommand, python_blocks, section_commands

pytestmark = pytest.mark.slow

README = REPO / "README.md"
TRAINING = REPO / "docs" / "training.md"
DATA = REPO / "docs" / "data.md"
CHAT = REPO / "docs" / "chat.md"
REAL_TRAINING = "Real training (LLaMA-2-7B-chat + ImageBind-huge, GPU)"
PROMPT_MARKERS = ("[y/N]", "Do you wish to run the custom code", "trust_remote_code=True")

# Documented flags appended to make each command tiny and CPU-only (the command's own words stay as written).
TRAIN_OVERRIDES = [
    "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    "--per_device_eval_batch_size", "4", "--eval_steps", "2", "--save_steps", "1", "--logging_steps", "1",
    "--max_seq_len", "128", "--dtype", "float32", "--bf16", "false", "--use_cpu", "true", "--optim", "adamw_torch",
    "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4",
]
BUILD_OVERRIDES = ["--num_workers", "0", "--batch_size", "8", "--no_progress", "--cpu"]
INFERENCE_OVERRIDES = ["--device", "cpu", "--max_new_tokens", "8"]
ACCELERATE_OVERRIDES: list[str] = []  # inserted before the script: accelerate's own flags


# ------------------------------------------------------------------------------------------------ stand-ins


def write_meta_llama(project: Path, spm_model_path: Path) -> None:
    """`llama-2-7b-chat/` as Meta's download lays it out: consolidated.00.pth + params.json, tokenizer.model beside."""
    from transformers import LlamaForCausalLM

    from mm_llama.conversion.meta_llama import MetaLlamaParams, llama_config_from_params
    from mm_llama.demo.tiny_llama import TinyLlamaSpec, hf_llama_to_meta_state_dict

    spec = TinyLlamaSpec()
    folder = project / "llama-2-7b-chat"
    folder.mkdir(parents=True)
    shutil.copy(spm_model_path, project / "tokenizer.model")
    vocab = SentencePieceProcessor(model_file=str(spm_model_path)).vocab_size()
    config = llama_config_from_params(MetaLlamaParams.from_dict(spec.params_json()), vocab,
                                      max_position_embeddings=512, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.save(hf_llama_to_meta_state_dict(model, spec.n_heads, spec.n_heads), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(spec.params_json()))


def write_imagebind_checkpoint(path: Path) -> None:
    """A flat state dict with every vision and audio key of Meta's `imagebind_huge.pth`, at the tiny preset's shapes."""
    from mm_llama.imagebind import (ImageBindAudioConfig, ImageBindVisionConfig, official_audio_shapes,
                                    official_vision_shapes)

    shapes = {**official_vision_shapes(ImageBindVisionConfig.from_preset("tiny")),
              **official_audio_shapes(ImageBindAudioConfig.from_preset("tiny"))}
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def write_images(folder: Path, count: int, seed: int) -> list[tuple[str, object]]:
    """`count` JPEGs of the demo's scenes in `folder`; (file name, scene) pairs."""
    from mm_llama.demo.scenes import render_image, sample_image_scene

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        scene = sample_image_scene(rng)
        render_image(scene, seed=seed + index).save(folder / f"{index:05d}.jpg", quality=90)
        written.append((f"{index:05d}.jpg", scene))
    return written


def write_videos(folder: Path, count: int, seed: int) -> list[tuple[str, object]]:
    """`count` H.264 mp4 clips of the demo's scenes in `folder`; (file name, scene) pairs."""
    from mm_llama.demo.scenes import render_video_frames, sample_video_scene, write_mp4

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        scene = sample_video_scene(rng)
        write_mp4(render_video_frames(scene, seed=seed + index), folder / f"clip{index}.mp4")
        written.append((f"clip{index}.mp4", scene))
    return written


def write_wav(path: Path, seconds: float = 1.0, frequency: float = 440.0, rate: int = 16000) -> None:
    """A mono 16-bit sine tone."""
    samples = (np.sin(2 * math.pi * frequency * np.arange(int(seconds * rate)) / rate) * 12000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


def write_public_datasets(project: Path, records: int = 20) -> None:
    """CC3M-595K (`cc3m/chat.json` + `cc3m/images`), LLaVA-Instruct-150K (`llava_instruct_150k.json` +
    `coco/train2017`) and VideoChat-11K (`videochat_instruct_11k.json` + `webvid/<folder>/<name>.mp4`), tiny, in
    their real formats; `records` records each (5% of 20 is the one validation record the recipes evaluate on)."""
    from mm_llama.demo.conversations import caption_record, instruct_record, videochat_record

    rng = random.Random(0)
    images = write_images(project / "cc3m" / "images", 4, seed=1)
    chat = [caption_record(f"cc3m-{i}", *images[i % len(images)], rng) for i in range(records)]
    (project / "cc3m" / "chat.json").write_text(json.dumps(chat))
    images = write_images(project / "coco" / "train2017", 4, seed=2)
    instruct = [instruct_record(f"coco-{i}", *images[i % len(images)], rng) for i in range(records)]
    (project / "llava_instruct_150k.json").write_text(json.dumps(instruct))
    videos = write_videos(project / "webvid" / "page1", 2, seed=3)
    videochat = [videochat_record(f"page1/{name}", scene, rng) for name, scene in (videos * records)[:records]]
    (project / "videochat_instruct_11k.json").write_text(json.dumps(videochat))


def write_chat_inputs(project: Path) -> None:
    """`cat.jpg`, the batch file `prompts.jsonl` and the QA file `questions.jsonl` that the chat and evaluate
    commands name."""
    name, _ = write_images(project / "stand-ins" / "cat", 1, seed=4)[0]
    shutil.copy(project / "stand-ins" / "cat" / name, project / "cat.jpg")
    prompts = [{"id": "a", "prompt": "What is in this image?", "image": "cat.jpg"},
               {"id": "b", "prompt": "Say hello."}]
    (project / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    questions = [{"id": "q1", "media": "cat.jpg", "question": "What colour is the shape?", "answers": ["red"]}]
    (project / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))


def own_data_records() -> str:
    """The `my_data/records.jsonl` that docs/data.md shows (its ```jsonl block), verbatim."""
    text = DATA.read_text(encoding="utf-8")
    section = text[text.index("## Train on your own data"):]
    return re.search(r"^```jsonl\n(.*?)^```", section, re.S | re.M).group(1)


def write_own_data(project: Path) -> list[dict]:
    """docs/data.md's example: `my_data/records.jsonl` as the doc shows it, and a stand-in for every file it names."""
    records = [json.loads(line) for line in own_data_records().splitlines() if line.strip()]
    folder = project / "my_data"
    for index, item in enumerate(item for record in records for item in record.get("media", [])):
        path = folder / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if item["type"] == "audio":
            write_wav(path)
        elif not path.exists():
            write = write_images if item["type"] == "image" else write_videos
            name, _ = write(project / "stand-ins" / f"own{index}", 1, seed=10 + index)[0]
            shutil.copy(project / "stand-ins" / f"own{index}" / name, path)
    (folder / "records.jsonl").write_text(own_data_records(), encoding="utf-8")
    return records


def make_project(root: Path, spm_model_path: Path) -> Path:
    """The temporary project folder: this repository's recipes/ and scripts/, and every stand-in."""
    project = root / "project"
    project.mkdir()
    for name in ("recipes", "scripts"):
        (project / name).symlink_to(REPO / name, target_is_directory=True)
    write_meta_llama(project, spm_model_path)
    write_imagebind_checkpoint(project / "stand-ins" / "imagebind_huge.pth")
    write_public_datasets(project)
    write_chat_inputs(project)
    return project


# ------------------------------------------------------------------------------------------------ running


def user_environment() -> dict[str, str]:
    """The test process's environment without what would import or register MM-LLaMA before a command does."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONINSPECT") and not key.startswith("PYTEST")}
    # One thread per process (2 cores shared), no Hub access (none is needed: everything is local).
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def executable(name: str) -> str:
    """The installed console script `name` of this interpreter's environment (what a user's shell finds)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e . puts it on PATH"
    return found


def with_overrides(command: DocCommand) -> list[str]:
    """The command's words plus the documented flags that make it tiny and CPU-only."""
    argv = list(command.argv)
    if argv[0] == "accelerate":
        script = next(i for i, word in enumerate(argv) if word.endswith(".py"))
        argv = [*argv[:script], *ACCELERATE_OVERRIDES, *argv[script:], *TRAIN_OVERRIDES]
    elif argv[:2] == ["mm-llama", "train"] or (argv[0] == "python" and argv[1:2] == ["scripts/train.py"]):
        argv += TRAIN_OVERRIDES
    elif argv[:2] == ["mm-llama", "build-datasets"]:
        argv += BUILD_OVERRIDES
    elif argv[:2] in (["mm-llama", "chat"], ["mm-llama", "evaluate"]):
        argv += INFERENCE_OVERRIDES
    return argv


def run_user_command(argv: list[str], project: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs one command as a user would, in `project`; asserts it exits 0 and asked nothing. A command that the
    docs give twice (README repeats docs/chat.md's one-shot chat) runs once: its first result is returned."""
    key = tuple(argv)
    if key in RESULTS:
        return RESULTS[key]
    program = {"mm-llama": [executable("mm-llama")], "python": [sys.executable],
               # `accelerate launch` is accelerate's launcher module: the `accelerate` CLI imports every subcommand,
               # and its `estimate` imports timm, which fails where the [eval] install removed torchvision
               # (test_accelerate_command_starts checks the CLI itself).
               "accelerate": [sys.executable, "-m", "accelerate.commands.launch"]}.get(argv[0], [argv[0]])
    if argv[0] == "accelerate":
        assert argv[1] == "launch", argv
        argv = [argv[0], *argv[2:]]
    started, cpu = time.monotonic(), _children_cpu()
    result = subprocess.run([*program, *argv[1:]], cwd=project, env=user_environment(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    TIMINGS.append((" ".join(argv[:3]), time.monotonic() - started, _children_cpu() - cpu))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(argv)}\nexit status {result.returncode}\n{output[-4000:]}"
    prompts = [marker for marker in PROMPT_MARKERS if marker in output]
    assert not prompts, f"{' '.join(argv)} asked the user ({prompts}):\n{output[-2000:]}"
    RESULTS[key] = result
    return result


RESULTS: dict[tuple[str, ...], subprocess.CompletedProcess] = {}
TIMINGS: list[tuple[str, float, float]] = []  # (command, wall s, CPU s): `pytest -s` prints them at the end


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commands(path: Path, heading: str) -> list[DocCommand]:
    """The commands under `heading` of a doc page (there must be some)."""
    found = section_commands(path, heading)
    assert found, f"{path.name} '{heading}' holds no command"
    return found


def printed_json(stdout: str) -> dict:
    """The JSON object that a command printed last (from its first line that is `{`)."""
    return json.loads(stdout[stdout.index("{\n"):])


def launcher_flags(argv: list[str], flags: list[str]) -> list[str]:
    """`flags` inserted before the script of an `accelerate launch` command (accelerate's own options)."""
    script = next(i for i, word in enumerate(argv) if word.endswith(".py"))
    return [*argv[:script], *flags, *argv[script:]]


# ------------------------------------------------------------------------------------------------ the sequence


@pytest.fixture(scope="module")
def project(tmp_path_factory, spm_model_path) -> Iterator[Path]:
    """The project folder after README's real-training sequence, run once for the module."""
    project = make_project(tmp_path_factory.mktemp("journey"), spm_model_path)
    for command in commands(README, REAL_TRAINING):
        argv = with_overrides(command)
        if argv[:2] == ["mm-llama", "download-imagebind"]:  # no network: the stand-in, through the documented --url
            argv += ["--url", (project / "stand-ins" / "imagebind_huge.pth").as_uri(), "--no_progress"]
        run_user_command(argv, project)
    yield project
    for command, wall, cpu in TIMINGS:
        print(f"{wall:6.1f} s wall {cpu:6.1f} s CPU  {command}")
    print(f"{sum(t[1] for t in TIMINGS):6.1f} s wall {sum(t[2] for t in TIMINGS):6.1f} s CPU  {len(TIMINGS)} commands")


def test_readme_real_training_sequence(project):
    outputs = project / "outputs"
    assert (outputs / "llama-2-7b-chat-hf" / "config.json").is_file()
    assert {p.name for p in (project / "checkpoints" / "imagebind_huge").iterdir()} >= {"vision", "audio"}
    for name, kinds in (("cc3m", "images"), ("llava_instruct_150k", "images"), ("videochat_11k", "videos")):
        manifest = json.loads((outputs / "datasets" / name / "manifest.json").read_text())
        assert manifest["counts"]["records_written"] == 20 and manifest["skipped"]["total"] == 0, name
        assert manifest["counts"]["splits"] == {"train": 19, "validation": 1}, name
        assert manifest["counts"]["media_by_type"][kinds[:-1]] > 0, name
    for stage in ("stage1", "stage2"):
        state = json.loads((outputs / stage / "trainer_state.json").read_text())
        assert state["global_step"] == 2 and any("eval_token_accuracy" in e for e in state["log_history"]), stage
    assert (outputs / "stage1" / "model.safetensors").is_file()
    adapter = json.loads((outputs / "stage2" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).name == "stage1"
    assert (outputs / "mm-llama-7b" / "model.safetensors").is_file()
    assert not (outputs / "mm-llama-7b" / "adapter_config.json").exists()


def test_training_page_resume_evaluate_and_two_processes(project):
    (resume,) = commands(TRAINING, "Continuing a run")
    # The dataset evaluation runs; the QA one (its generation is what chat runs below) is parsed by test_docs.py.
    evaluate_dataset, _ = commands(TRAINING, "Metrics and evaluation")
    run_user_command([*with_overrides(resume), "--max_steps", "3"], project)
    state = json.loads((project / "outputs" / "stage2" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (project / "outputs" / "stage2" / "checkpoint-3").is_dir()

    metrics = printed_json(run_user_command(with_overrides(evaluate_dataset), project).stdout)["loss_eval"]
    assert metrics["num_examples"] == 1 and 0 < metrics["loss"] < 20 and 0 <= metrics["token_accuracy"] <= 1

    (ddp,) = commands(TRAINING, "Many GPUs (or CPU processes)")
    argv = launcher_flags(with_overrides(ddp), ["--num_processes", "2"])
    # Two gloo processes (tests/test_training_ddp.py checks that they train as one process with the same batch).
    run_user_command([*argv, "--output_dir", "outputs/stage2-ddp", "--save_strategy", "no"], project)
    assert (project / "outputs" / "stage2-ddp" / "adapter_model.safetensors").is_file()


def test_chat_page_commands_and_python_in_new_interpreters(project):
    # The interactive session (the first command) is parsed by test_docs.py: with stdin closed it would only load.
    _, one_shot, batch = commands(CHAT, "In the terminal (`mm-llama chat`)")
    answer = run_user_command(with_overrides(one_shot), project).stdout.strip()
    assert answer, "the one-shot chat printed no answer"
    run_user_command(with_overrides(batch), project)
    answers = [json.loads(line) for line in (project / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", "b"] and all("response" in a for a in answers), answers

    from_python, pipeline = python_blocks(CHAT, "From Python") + python_blocks(CHAT, "Pipeline")
    # Both examples as written, one after the other in one new interpreter; a line between them reports the class
    # that AutoModelForCausalLM loaded.
    marker = "print('\\nloaded:', type(model).__name__)\n"
    (project / "examples.py").write_text(from_python + marker + pipeline)
    result = run_user_command(["python", "examples.py"], project)
    assert "\nloaded: MMLlamaForCausalLM\n" in result.stdout, result.stdout[-500:]


def test_own_data_example_from_a_folder_to_a_stage2_run(project):
    records = write_own_data(project)
    build, train, _ = commands(DATA, "Train on your own data")  # merge: as README's merge, parsed by test_docs.py
    summary = run_user_command(with_overrides(build), project).stdout
    assert f"records read: {len(records)}, written: {len(records)}" in summary, summary
    manifest = json.loads((project / "outputs" / "datasets" / "my_data" / "manifest.json").read_text())
    assert manifest["counts"]["media_by_type"] == {"image": 3, "video": 1, "audio": 1}
    assert manifest["counts"]["splits"]["validation"] >= 1
    run_user_command(with_overrides(train), project)
    state = json.loads((project / "outputs" / "stage2-my-data" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("eval_token_accuracy" in e for e in state["log_history"])
    assert (project / "outputs" / "stage2-my-data" / "adapter_model.safetensors").is_file()


def test_accelerate_command_starts():
    """`accelerate launch` itself (the console script the docs name), as the other tests run its launcher module."""
    result = subprocess.run([executable("accelerate"), "launch", "--help"], env=user_environment(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if result.returncode and "No module named 'torchvision'" in result.stderr and "timm" in result.stderr:
        pytest.xfail("accelerate's CLI imports timm (installed by the [eval] extra), which fails without the "
                     "torchvision that docs/benchmarks.md removes on CPU-only installs")
    assert result.returncode == 0, result.stderr[-2000:]
