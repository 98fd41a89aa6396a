"""The `mm-llama` options are declared once: every flag is snake_case (a kebab-case spelling still parses, with one
deprecation line), the inference commands share one model-loading and one generation dataclass, build-datasets takes
`BuildConfig`, and the sampling defaults come from the flag, then the checkpoint's generation_config.json, then
`GenerationSettings` (LLaMA-2-chat's)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from mm_llama import MMLlamaProcessor
from mm_llama.cli import COMMANDS, CommandError, build_parser, main, parse_command
from mm_llama.cli_arguments import GenerationArguments, ModelLoadingArguments, ProgressArguments
from mm_llama.data.build_config import BuildConfig
from mm_llama.generation import GenerationSettings
from test_merge import make_model, make_processor, save_stage2

INFERENCE_COMMANDS = ("chat", "web", "serve", "evaluate")
BUILD = ["--source", "llava", "--json", "chat.json", "--output", "out"]


def deprecation(old: str, new: str) -> str:
    return f"{old} is deprecated, use {new}; the old spelling goes in the next release"


def flags(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_flag_of_every_command_is_snake_case():
    for name in COMMANDS:
        kebab = sorted(flag for flag in flags(build_parser(name)) if flag.startswith("--") and "-" in flag[2:])
        assert kebab == [], f"mm-llama {name}: {kebab}"


def test_kebab_case_spellings_parse_with_one_deprecation_line_each(capsys):
    snake = parse_command("build-datasets", [*BUILD, "--media_dir", "images", "--num_workers", "0", "--no_progress"])
    old = parse_command("build-datasets", [*BUILD, "--media-dir", "images", "--num-workers=0", "--no-progress"])
    assert old == snake
    assert snake["build"] == BuildConfig(num_workers=0) and snake["progress"] == ProgressArguments(progress=False)
    assert snake["media_dir"] == ["images"]
    assert capsys.readouterr().err.splitlines() == [deprecation("--media-dir", "--media_dir"),
                                                    deprecation("--num-workers", "--num_workers"),
                                                    deprecation("--no-progress", "--no_progress")]
    # Repeated, the flag is named once; the values are all kept.
    two = parse_command("build-datasets", [*BUILD, "--source", "records", "--json", "b.jsonl", "--media-dir", "a",
                                           "--media-dir", "b"])
    assert two["media_dir"] == ["a", "b"]
    assert capsys.readouterr().err.splitlines() == [deprecation("--media-dir", "--media_dir")]
    # A kebab-case word that is no flag's spelling is argparse's error, without a deprecation line.
    with pytest.raises(SystemExit) as exit_:
        parse_command("build-datasets", [*BUILD, "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "deprecated" not in err


def test_old_chat_and_train_spellings(capsys):
    assert parse_command("chat", ["model", "--no-stream"])["chat"].stream is False
    assert capsys.readouterr().err.splitlines() == [deprecation("--no-stream", "--no_stream")]
    assert main(["train", "--help-keys"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [deprecation("--help-keys", "--help_keys")] and "--learning_rate" in out


def test_inference_commands_share_the_loading_and_generation_options():
    shared = {f"--{item.name}" for options in (ModelLoadingArguments, GenerationArguments)
              for item in dataclasses.fields(options)}
    for name in INFERENCE_COMMANDS:
        parser = build_parser(name)
        assert shared <= flags(parser), name
        for action in parser._actions:  # declared once: the flag's help is the dataclass field's
            if action.dest in ("temperature", "top_p", "max_new_tokens"):
                field = next(item for item in dataclasses.fields(GenerationArguments) if item.name == action.dest)
                assert action.help == field.metadata["help"] and action.default is None, (name, action.dest)
        parsed = parse_command(name, ["model", "--temperature", "0.2", "--compile", "--load_in_4bit",
                                      *(["--output", "o.json", "--qa_file", "q.jsonl"] if name == "evaluate" else [])])
        assert parsed["generation"] == GenerationArguments(temperature=0.2, compile=True), name
        assert parsed["loading"] == ModelLoadingArguments(load_in_4bit=True), name


def test_bad_option_values_are_one_line_errors_before_any_loading():
    cases = [("chat", ["m", "--top_p", "0"], "--top_p must be in (0, 1]"),
             ("serve", ["m", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
             ("web", ["m", "--concurrency", "0"], "--concurrency must be >= 1"),
             ("evaluate", ["m", "--output", "o.json"], "give --dataset (loss/accuracy), --qa_file (generation)"),
             ("chat", ["m", "--prompt", "hi", "--batch_file", "b.jsonl"], "give --prompt or --batch_file, not both"),
             ("build-datasets", [*BUILD, "--validation_ratio", "1"], "validation_ratio must be in [0, 1)")]
    for name, argv, message in cases:
        with pytest.raises(CommandError) as error:
            parse_command(name, argv)
        assert message in str(error.value) and error.value.status == 2, (name, str(error.value))


def test_help_states_the_built_in_sampling_defaults():
    helps = {item.name: item.metadata["help"] for item in dataclasses.fields(GenerationArguments)}
    built_in = GenerationSettings()
    assert f"default: {built_in.temperature})" in helps["temperature"]
    assert f"default: {built_in.top_p})" in helps["top_p"]
    assert f"default: {built_in.max_new_tokens})" in helps["max_new_tokens"]


def test_settings_come_from_the_flag_then_the_checkpoint_then_the_defaults():
    built_in = GenerationSettings()
    assert GenerationSettings.from_generation_config(None) == built_in
    assert GenerationSettings.from_generation_config(GenerationConfig(bos_token_id=1)) == built_in
    saved = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.5, max_new_tokens=12, max_length=4096)
    assert GenerationSettings.from_generation_config(saved) == GenerationSettings(12, 0.3, 0.5)
    assert GenerationSettings.from_generation_config(saved, temperature=0.0, top_p=None) == \
        GenerationSettings(12, 0.0, 0.5)
    greedy = GenerationConfig(do_sample=False, top_p=0.5)
    assert GenerationSettings.from_generation_config(greedy) == GenerationSettings(built_in.max_new_tokens, 0.0, 0.5)
    assert GenerationSettings.from_generation_config(greedy, temperature=0.8).temperature == 0.8
    with pytest.raises(TypeError, match="top_k"):
        GenerationSettings.from_generation_config(greedy, top_k=3)


@pytest.fixture(scope="module")
def greedy_checkpoint(tmp_path_factory, spm_model_path):
    """A stage-1 folder whose generation_config.json says: greedy, 6 new tokens."""
    folder = tmp_path_factory.mktemp("greedy") / "stage1"
    model = make_model(0)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 6
    model.save_pretrained(folder)
    make_processor(spm_model_path).save_pretrained(folder)
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["max_new_tokens"] == 6
    return folder


def chat_answer(folder, capsys, *flags: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    assert main(["chat", str(folder), "--device", "cpu", "--prompt", "Hello there", "--no_stream", *flags]) == 0
    return capsys.readouterr().out.strip()


def test_chat_answers_as_the_checkpoint_says_unless_a_flag_overrides_it(greedy_checkpoint, capsys):
    model = AutoModelForCausalLM.from_pretrained(greedy_checkpoint).eval()
    processor = MMLlamaProcessor.from_pretrained(greedy_checkpoint)
    inputs = processor([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_token_id)
    greedy = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # No --temperature: the checkpoint's greedy decoding (whatever the seed) and its 6 new tokens.
    assert chat_answer(greedy_checkpoint, capsys, seed=0) == greedy
    assert chat_answer(greedy_checkpoint, capsys, seed=1) == greedy
    # The flag wins: sampling at a high temperature leaves the greedy answer for some seed.
    sampled = [chat_answer(greedy_checkpoint, capsys, "--temperature", "2", "--top_p", "1", seed=seed)
               for seed in range(3)]
    assert any(answer != greedy for answer in sampled), sampled


def test_evaluate_decodes_greedily_unless_its_flags_say_otherwise(greedy_checkpoint, monkeypatch):
    """Scores must be reproducible: evaluate's own settings (greedy, 64 new tokens), then its flags (recorded where
    the command hands them to the library)."""
    from mm_llama import evaluation

    recorded = {}

    def record(model, processor, embedder, model_path, options, settings):
        recorded["settings"] = settings
        return {"model": model_path}

    monkeypatch.setattr(evaluation, "run_evaluation", record)
    argv = ["evaluate", str(greedy_checkpoint), "--device", "cpu", "--dataset", "d", "--output", "o.json"]
    assert main(argv) == 0 and recorded["settings"] == evaluation.EVALUATION_SETTINGS
    assert main([*argv, "--max_new_tokens", "9", "--temperature", "0.5"]) == 0
    assert recorded["settings"] == GenerationSettings(9, 0.5, evaluation.EVALUATION_SETTINGS.top_p)


def test_merge_keeps_the_stage1_generation_config(greedy_checkpoint, tmp_path):
    adapter = save_stage2(greedy_checkpoint, tmp_path / "stage2")
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    merged = GenerationConfig.from_pretrained(tmp_path / "merged")
    assert merged.do_sample is False and merged.max_new_tokens == 6
