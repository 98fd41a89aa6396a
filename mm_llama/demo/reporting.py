"""How the demo shows its steps: a numbered header per step, the command line of each `mm-llama` command it runs
(so that any step can be re-run by hand), a summary and the time of each step, and a progress bar for the
stand-ins' training loops."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Callable, Sequence


class StepError(RuntimeError):
    """A demo step failed; the message names the step and the command to re-run it."""


CommandRunner = Callable[[str, list], int]  # (command, arguments) -> exit status, as `mm_llama.cli.run_command`


class Reporter:
    """Prints a numbered header per step, and a short summary with its time when it ends; runs the steps' commands
    with `run_command` (given by the CLI, so that the demo does not import the CLI that imports the demo)."""

    def __init__(self, total: int, run_command: CommandRunner, stream=sys.stdout):
        self.total, self.index, self.stream, self.run_command = total, 0, stream, run_command
        self.timings: dict[str, float] = {}

    def step(self, title: str) -> "_StepContext":
        self.index += 1
        return _StepContext(self, title)

    def print(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


class _StepContext:
    def __init__(self, reporter: Reporter, title: str):
        self.reporter, self.title, self.lines = reporter, title, []

    def __enter__(self) -> "_StepContext":
        self.started = time.monotonic()
        self.reporter.print(f"\n=== [{self.reporter.index}/{self.reporter.total}] {self.title}")
        return self

    def note(self, line: str) -> None:
        self.lines.append(line)

    def __exit__(self, exc_type, exc, tb) -> bool:
        seconds = time.monotonic() - self.started
        self.reporter.timings[self.title] = seconds
        if exc is None:
            for line in self.lines:
                self.reporter.print(f"    {line}")
            self.reporter.print(f"    done in {seconds:.1f} s")
        return False


def run_step(command: str, args: Sequence, reporter: Reporter) -> None:
    """Runs `mm-llama <command> <args>` in this process with the reporter's command runner (`mm_llama.cli`'s, which
    starts the demo; saving the 5-30 s of interpreter and library start-up per step), after printing the command
    line.

    Raises StepError when the command fails.
    """
    line = f"mm-llama {command} " + " ".join(shlex.quote(str(a)) for a in args)
    reporter.print(f"    $ {line}")
    status = reporter.run_command(command, [str(a) for a in args])
    if status != 0:
        raise StepError(f"`mm-llama {command}` exited with status {status}; re-run it by hand to see why:\n  {line}")


def progress_bar(description: str, enabled: bool) -> Callable[[int, int, dict], None] | None:
    """A tqdm bar driven by a training loop's (step, total, metrics) callback."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    state: dict = {}

    def update(step: int, total: int, metrics: dict) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=description, unit="step", leave=False)
        state["bar"].update(1)
        state["bar"].set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
        if step >= total:
            state["bar"].close()

    return update


__all__ = ["CommandRunner", "Reporter", "StepError", "progress_bar", "run_step"]
