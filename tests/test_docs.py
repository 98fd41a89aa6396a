"""Every command in README.md and docs/*.md parses as written: each fenced ```bash block is read
(tests/doc_commands.py) and each `mm-llama ...`, `python scripts/...`, `accelerate launch ... scripts/...`,
`torchrun ... scripts/...` and `python -m lmms_eval ...` command is parsed by the parser that would run it: the
command's own argparse parser, the recipe parser (which also loads the recipe and checks every key), accelerate's and
torchrun's launcher parsers. Commands that need real checkpoints are only parsed here; README's training sequence and
docs/data.md's own-data example run for real in tests/test_user_journey.py. Shell lines that are no MM-LLaMA command
(pip installs, `tensorboard`, `curl` requests, shell variables, `python -c`, the pytest command) are listed in NOT_CHECKED; any other program fails the test, so a new
kind of command cannot go unchecked silently. The doc links between pages point at files that exist.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from conftest import need
from doc_commands import DOC_FILES, REPO, DocCommand, doc_commands

# Programs whose lines are shell set-up, not MM-LLaMA commands.
NOT_CHECKED = ("pip", "tensorboard", "curl")  # curl: requests to `mm-llama serve`, which tests/test_serve.py makes
OPTIONAL_PAGES = ("serving.md", "generation.md")  # written alongside; checked once they exist


def all_commands() -> list[DocCommand]:
    return [command for path in DOC_FILES for command in doc_commands(path)]


def script_command(script: str) -> str:
    """The `mm-llama` command a `scripts/*.py` entry point runs (each calls `main(["<command>", ...])`)."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    match = re.search(r'main\(\["([a-z-]+)"', path.read_text(encoding="utf-8"))
    assert match, f"{script} does not call mm_llama.cli.main([...])"
    return match.group(1)


def parse_mm_llama(argv: list[str], where: str) -> None:
    """Parses `mm-llama <command> ARGS` as the command does (train: the recipe parser), with the current spelling of
    every flag (a deprecated kebab-case one fails) and every option's own checks."""
    import contextlib
    import io

    from mm_llama.cli import COMMANDS, CommandError, parse_command

    name, args = argv[0], list(argv[1:])
    assert name in COMMANDS, f"{where}: unknown command {name!r}"
    if name == "train":
        parse_train(args, where)
        return
    stderr = io.StringIO()
    if "--help" in args or "-h" in args:
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
            parse_command(name, args)
        assert exit_.value.code == 0, where
        return
    try:
        with contextlib.redirect_stderr(stderr):
            parse_command(name, args)
    except (SystemExit, CommandError) as error:
        pytest.fail(f"{where}: mm-llama {' '.join(argv)} does not parse ({error}; {stderr.getvalue().strip()})")
    assert "deprecated" not in stderr.getvalue(), f"{where}: {stderr.getvalue().strip()}"


def parse_train(args: list[str], where: str) -> None:
    """The recipe parser on `RECIPE.yaml --key value ...`: the recipe exists, every key and value is valid."""
    import torch

    from mm_llama.training.arguments import parse_args

    if args in (["--help_keys"], ["--help"], ["-h"]):
        return
    recipe = args[0]
    assert (REPO / recipe).is_file(), f"{where}: recipe {recipe} does not exist"
    # The GPU recipes ask for bf16, which transformers refuses on a machine without a GPU unless told to use the CPU.
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    parse_args([str(REPO / recipe), *args[1:], *cpu])


def parse_launcher(argv: list[str], parser: argparse.ArgumentParser, where: str) -> None:
    """`accelerate launch` / `torchrun` flags, then the script and its arguments."""
    script = next((i for i, word in enumerate(argv) if word.endswith(".py")), None)
    assert script is not None, f"{where}: no script in {argv}"
    launcher_args = parser.parse_args([*argv[:script + 1]])
    config = getattr(launcher_args, "config_file", None)
    if config:
        assert (REPO / config).is_file(), f"{where}: accelerate config {config} does not exist"
    parse_mm_llama([script_command(argv[script]), *argv[script + 1:]], where)


def parse_lmms_eval(argv: list[str], where: str, monkeypatch) -> None:
    """`python -m lmms_eval ...` with lmms-eval's own parser; `--model_args` keys are MM-LLaMA's."""
    need("lmms_eval", 'pip install -e ".[eval]" (docs/benchmarks.md)')
    from lmms_eval.__main__ import parse_eval_args

    from mm_llama.frontends.lmms_eval.model import MODEL_ARGS

    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
    _, args = parse_eval_args()
    assert args.model == "mm_llama", where
    keys = [pair.split("=", 1)[0] for pair in args.model_args.split(",") if pair]
    assert set(keys) <= set(MODEL_ARGS), f"{where}: unknown --model_args {sorted(set(keys) - set(MODEL_ARGS))}"


def check_command(command: DocCommand, monkeypatch) -> bool:
    """Parses one command; False for the shell lines that are not checked."""
    argv, where = list(command.argv), command.source
    if argv[0] == "mm-llama":
        parse_mm_llama(argv[1:], where)
    elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("scripts/"):
        parse_mm_llama([script_command(argv[1]), *argv[2:]], where)
    elif argv[:3] == ["python", "-m", "lmms_eval"]:
        parse_lmms_eval(argv[3:], where, monkeypatch)
    elif argv[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        parse_launcher(argv[2:], launch_command_parser(), where)
    elif argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        parse_launcher(argv[1:], get_args_parser(), where)
    else:
        # python -m pytest: tests/test_readme.py checks it is the command CI runs.
        shell_line = (argv[0] in NOT_CHECKED or "=" in argv[0] or argv[:2] == ["python", "-c"]
                      or argv[:3] == ["python", "-m", "pytest"])
        assert shell_line, f"{where}: {command.text} is no command this test knows how to check"
        return False
    return True


def test_docs_pages_exist_and_every_command_parses(monkeypatch):
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    expected = {"training.md", "data.md", "chat.md", "benchmarks.md", "original.md", "audio.md", "prompt-format.md",
                "architecture.md", "demo.md"}
    assert expected <= pages, f"missing docs pages: {sorted(expected - pages)}"
    monkeypatch.chdir(REPO)
    checked = [command for command in all_commands() if check_command(command, monkeypatch)]
    # The pages hold ~30 commands; a reader that silently found none would pass otherwise.
    assert len(checked) >= 25, [command.source for command in checked]
    programs = {command.argv[0] for command in checked}
    assert {"mm-llama", "accelerate"} <= programs


@pytest.mark.parametrize("argv", [
    ["mm-llama", "chat", "model", "--temprature", "0"],
    ["mm-llama", "merge"],
    ["python", "scripts/build_datasets.py", "--source", "llava"],
])
def test_a_wrong_command_fails_the_check(argv, monkeypatch):
    with pytest.raises(pytest.fail.Exception):
        check_command(DocCommand(tuple(argv), "example:1"), monkeypatch)


def test_a_wrong_recipe_key_fails_the_check(monkeypatch):
    from mm_llama.training.arguments import UnknownKeyError

    monkeypatch.chdir(REPO)
    with pytest.raises(UnknownKeyError, match="learnin_rate"):
        check_command(DocCommand(("mm-llama", "train", "recipes/stage1.yaml", "--learnin_rate", "1"), "x:1"),
                      monkeypatch)


def test_links_between_pages_point_at_files():
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            if Path(target).name in OPTIONAL_PAGES and not (path.parent / target).exists():
                continue  # being written alongside this page
            assert (path.parent / target).exists(), f"{path.relative_to(REPO)} links to missing {target}"
