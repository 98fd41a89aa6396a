"""LoRA merge (stage-2 output -> one MMLlamaForCausalLM folder) and stage-1 -> stage-2 start.

Also holds the tiny-checkpoint builders that the chat, pipeline and evaluation tests import: stage-1 folders
(full model + processor) and stage-2 folders (PEFT adapter + processor), made the way the training contract says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import tiny_llama_config_kwargs
from remote_code import assert_remote_code_logits
from mm_llama import MMLlamaConfig, MMLlamaForCausalLM, MMLlamaProcessor, MMLlamaTokenizer

MEDIA_DIM = 1024  # ImageBind-huge's embedding size, as real embedding files have
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- builders


def make_processor(spm_model_path: Path, image_size: int = 224) -> MMLlamaProcessor:
    return MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)), image_size=image_size)


def make_model(seed: int = 0, vision_config=None, projector_type: str = "linear") -> MMLlamaForCausalLM:
    """A tiny random MM-LLaMA whose weights are large enough that the media visibly steer greedy generation (with
    the default 0.02 init, attention is near uniform and every image gives the same answer)."""
    torch.manual_seed(seed)
    text_config = LlamaConfig(**tiny_llama_config_kwargs(), initializer_range=0.2)
    config = MMLlamaConfig(text_config=text_config, media_embed_dim=MEDIA_DIM,
                           projector_type=projector_type, vision_config=vision_config)
    model = MMLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.projector.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def save_stage1(folder: Path, spm_model_path: Path, seed: int = 0, vision_config=None, image_size: int = 224) -> Path:
    """A stage-1 output folder: full `save_pretrained` model + processor."""
    make_model(seed, vision_config=vision_config).save_pretrained(folder)
    make_processor(spm_model_path, image_size=image_size).save_pretrained(folder)
    return folder


def save_stage2(stage1_dir: Path, folder: Path, seed: int = 1) -> Path:
    """A stage-2 output folder as training writes it: PEFT adapter (LoRA on q_proj/v_proj, projector in
    modules_to_save) over the stage-1 folder, with non-zero LoRA B and a changed projector, + the processor."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(stage1_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["projector"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder)
    MMLlamaProcessor.from_pretrained(stage1_dir).save_pretrained(folder)
    return folder


def media_prompt_ids(length: int = 12, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 320, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 4] = 0  # one media placeholder
    return ids


# ---------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, spm_model_path):
    root = tmp_path_factory.mktemp("merge")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    stage2 = save_stage2(stage1, root / "stage2")
    return root, stage1, stage2


def _unmerged_logits(stage1: Path, stage2: Path, ids, embeds):
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stage1), stage2).eval()
    with torch.no_grad():
        return model(input_ids=ids, media_embeds=embeds).logits


def test_merged_logits_equal_base_plus_adapter(checkpoints):
    from mm_llama.merge import merge_lora_checkpoint

    root, stage1, stage2 = checkpoints
    merged_dir = merge_lora_checkpoint(stage2, root / "merged")
    ids, embeds = media_prompt_ids(), torch.randn(1, 1, MEDIA_DIM)
    expected = _unmerged_logits(stage1, stage2, ids, embeds)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged) is MMLlamaForCausalLM
    assert not any("lora" in name or "modules_to_save" in name for name in merged.state_dict())
    with torch.no_grad():
        got = merged(input_ids=ids, media_embeds=embeds).logits
        stage1_logits = AutoModelForCausalLM.from_pretrained(stage1)(input_ids=ids, media_embeds=embeds).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The adapter really changed the model (LoRA and projector), so the equality above is not trivial.
    assert (got - stage1_logits).abs().max() > 1e-2
    # The processor travelled with the model.
    assert MMLlamaProcessor.from_pretrained(merged_dir).tokenizer.encode_text("hello") == \
        MMLlamaProcessor.from_pretrained(stage1).tokenizer.encode_text("hello")


def test_merged_folder_loads_with_trust_remote_code_without_the_package(checkpoints, tmp_path):
    from mm_llama.merge import merge_lora_checkpoint

    _, stage1, stage2 = checkpoints
    merged_dir = merge_lora_checkpoint(stage2, tmp_path / "merged")
    assert (merged_dir / "modeling_mm_llama.py").is_file()
    ids, embeds = media_prompt_ids(seed=3), torch.randn(1, 1, MEDIA_DIM)
    expected = _unmerged_logits(stage1, stage2, ids, embeds)
    assert_remote_code_logits(merged_dir, ids, embeds, expected, tmp_path, tolerance=1e-5)


def test_stage2_start_computes_the_stage1_model_and_trains_lora_and_projector(checkpoints, tmp_path):
    from peft import PeftModel

    from mm_llama.merge import convert_checkpoint

    _, stage1, _ = checkpoints
    mode, start = convert_checkpoint(stage1, tmp_path / "start", lora_r=4)
    assert mode == "stage2-start"
    config = json.loads((start / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == stage1.resolve()
    assert config["modules_to_save"] == ["projector"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stage1), start, is_trainable=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in name for name in trainable) and any("v_proj.lora_B" in name for name in trainable)
    assert any("projector.modules_to_save" in name for name in trainable)
    assert not any("k_proj" in name or "embed_tokens" in name for name in trainable)
    ids, embeds = media_prompt_ids(seed=5), torch.randn(1, 1, MEDIA_DIM)
    with torch.no_grad():
        got = model.eval()(input_ids=ids, media_embeds=embeds).logits
        expected = AutoModelForCausalLM.from_pretrained(stage1)(input_ids=ids, media_embeds=embeds).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (start / "processor_config.json").is_file() or (start / "tokenizer.model").is_file()


def test_stage2_start_leaves_the_vision_tower_without_lora(tmp_path, spm_model_path):
    from mm_llama.imagebind import ImageBindVisionConfig
    from mm_llama.merge import init_stage2_from_stage1, load_stage2_model

    vision = ImageBindVisionConfig.from_preset("tiny", image_size=32)
    stage1 = save_stage1(tmp_path / "stage1", spm_model_path, vision_config=vision, image_size=32)
    start = init_stage2_from_stage1(stage1, tmp_path / "start", lora_r=2)
    model = load_stage2_model(start, merge=False)
    lora_layers = [name for name, _ in model.named_modules() if name.endswith("q_proj") and hasattr(_, "lora_A")]
    assert lora_layers and all("language_model" in name for name in lora_layers)


def test_clear_errors_for_wrong_folders(checkpoints, tmp_path):
    from mm_llama.merge import convert_checkpoint, merge_lora_checkpoint

    _, stage1, stage2 = checkpoints
    with pytest.raises(FileNotFoundError, match="not a stage-2"):
        merge_lora_checkpoint(stage1, tmp_path / "out")
    # An adapter whose recorded base model is not on this machine names the fix.
    moved = tmp_path / "moved_stage2"
    moved.mkdir()
    for item in stage2.iterdir():
        (moved / item.name).write_bytes(item.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nonexistent/stage1"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="--base_model"):
        merge_lora_checkpoint(moved, tmp_path / "out")
    # ... and --base_model fixes it.
    merged = merge_lora_checkpoint(moved, tmp_path / "out", base_model=stage1)
    assert (merged / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a stage-2 output"):
        convert_checkpoint(empty, tmp_path / "x")


def test_merge_command(checkpoints, tmp_path, capsys):
    from mm_llama.cli import main as cli

    _, _, stage2 = checkpoints
    assert cli(["merge", str(stage2), str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.startswith("merge: wrote")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert cli(["merge", str(tmp_path / "nope"), str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_chat_loader_merges_a_stage2_folder_on_load(checkpoints):
    from mm_llama.loading import load_model

    _, stage1, stage2 = checkpoints
    model, processor = load_model(stage2, device="cpu", dtype="float32")
    assert type(model) is MMLlamaForCausalLM and isinstance(processor, MMLlamaProcessor)
    ids, embeds = media_prompt_ids(seed=7), torch.randn(1, 1, MEDIA_DIM)
    with torch.no_grad():
        got = model(input_ids=ids, media_embeds=embeds).logits
    torch.testing.assert_close(got, _unmerged_logits(stage1, stage2, ids, embeds), rtol=1e-5, atol=1e-5)
