"""One process-wide progress switch (mm_llama.progress): it hides and shows MM-LLaMA's bars and the libraries', the
environment variable is its default, a command's `--no_progress` turns it off for that command only, and a scoped
change gives every library back its own setting."""

from __future__ import annotations

import pytest

from mm_llama import progress
from mm_llama.cli import COMMANDS, build_parser, main
from mm_llama.cli_arguments import ProgressArguments
from mm_llama.progress import ENV_VAR, progress_bar, progress_bars, progress_bars_enabled, set_progress_bars

BAR_COMMANDS = ("build-datasets", "evaluate", "convert-meta", "download-imagebind", "download-webvid", "demo")


@pytest.fixture(autouse=True)
def restored_switch(monkeypatch):
    """Each test starts from the default (no environment variable, bars on) and leaves the switch as it found it."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    with progress_bars(True):
        yield


def _library_bars() -> tuple[bool, bool, bool]:
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    return (not hub.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled(),
            datasets.is_progress_bar_enabled())


def test_the_switch_hides_and_shows_our_bars(capsys):
    set_progress_bars(False)
    assert not progress_bars_enabled()
    assert list(progress_bar(range(3), desc="counting")) == [0, 1, 2]  # it still iterates
    assert "counting" not in capsys.readouterr().err
    set_progress_bars(True)
    assert list(progress_bar(range(3), desc="counting")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "counting" in err and "3/3" in err
    with progress_bar(total=2, desc="explicitly off", disable=True) as bar:  # a caller's disable still holds
        bar.update(2)
    assert "explicitly off" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="True, False or None"):
        set_progress_bars("no")


def test_the_switch_turns_the_libraries_bars_too():
    _library_bars()  # imported before the switch is turned, as in a command that loaded them
    set_progress_bars(False)
    assert _library_bars() == (False, False, False)
    set_progress_bars(True)
    assert _library_bars() == (True, True, True)


def test_a_scoped_change_restores_each_librarys_own_setting():
    import datasets

    _library_bars()
    datasets.disable_progress_bars()  # e.g. the demo hides datasets' bars but keeps its own
    with progress_bars(False):
        assert not progress_bars_enabled() and _library_bars() == (False, False, False)
    assert progress_bars_enabled() and _library_bars() == (True, True, False)


@pytest.mark.parametrize("value, enabled", [("1", False), ("true", False), ("YES", False), ("0", True), ("", True)])
def test_the_environment_variable_is_the_default(monkeypatch, value, enabled):
    set_progress_bars(None)
    monkeypatch.setenv(ENV_VAR, value)
    assert progress_bars_enabled() is enabled
    set_progress_bars(not enabled)  # set explicitly, the switch wins over the environment
    assert progress_bars_enabled() is (not enabled)


def test_every_command_with_bars_has_the_one_no_progress_flag():
    help_text = ProgressArguments.__dataclass_fields__["progress"].metadata["help"]
    for name, command in COMMANDS.items():
        actions = {option: action for action in build_parser(name)._actions for option in action.option_strings}
        assert ("--no_progress" in actions) is (name in BAR_COMMANDS), name
        assert command.progress_bars is (name in BAR_COMMANDS), name
        if name in BAR_COMMANDS:
            assert actions["--progress"].help == help_text and actions["--no_progress"].dest == "progress"


def _download(tmp_path, *flags: str) -> str:
    source = tmp_path / "source.pth"
    source.write_bytes(b"x" * 4096)
    target = tmp_path / f"out{len(list(tmp_path.iterdir()))}" / "imagebind_huge.pth"
    assert main(["download-imagebind", "--output", str(target), "--url", source.as_uri(), *flags]) == 0
    assert target.read_bytes() == source.read_bytes()
    return "imagebind_huge.pth.part"  # the bar's description


def test_no_progress_turns_a_commands_bar_off_for_that_command_only(tmp_path, capsys):
    bar = _download(tmp_path)
    assert bar in capsys.readouterr().err and progress_bars_enabled()
    bar = _download(tmp_path, "--no_progress")
    err = capsys.readouterr().err
    assert bar not in err and "100%" not in err
    assert progress_bars_enabled()  # restored: the caller's switch is untouched
    # Without the flag a command leaves the switch as its caller set it (the demo's --no_progress covers its steps).
    with progress_bars(False):
        _download(tmp_path)
    assert bar not in capsys.readouterr().err


def test_the_environment_variable_hides_a_commands_bar(tmp_path, capsys, monkeypatch):
    set_progress_bars(None)
    monkeypatch.setenv(ENV_VAR, "1")
    bar = _download(tmp_path)
    assert bar not in capsys.readouterr().err


def test_convert_meta_draws_its_layer_bar_unless_no_progress(tmp_path, spm_model_path, capsys):
    from test_convert_meta import MHA_PARAMS, random_meta_weights, write_meta_checkpoint

    src = write_meta_checkpoint(tmp_path / "meta", MHA_PARAMS, random_meta_weights(MHA_PARAMS), 1, spm_model_path)
    argv = ["convert-meta", "--input_dir", str(src), "--dtype", "float32"]
    assert main([*argv, "--output_dir", str(tmp_path / "shown")]) == 0
    assert "Converting layers" in capsys.readouterr().err
    assert main([*argv, "--output_dir", str(tmp_path / "hidden"), "--no_progress"]) == 0
    assert "Converting layers" not in capsys.readouterr().err
    assert progress._enabled is True  # the fixture's setting, given back by the command
