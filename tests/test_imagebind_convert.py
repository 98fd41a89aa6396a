"""Checkpoint conversion: a random state dict in Meta's flat `imagebind_huge.pth` layout (other modalities included)
-> HF model, compared with an independent re-statement of Meta's vision forward; key/shape errors; the scripts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.imagebind import (
    ImageBindProcessor,
    ImageBindVisionConfig,
    ImageBindVisionModel,
    convert_imagebind_state_dict,
    load_imagebind_checkpoint,
    official_vision_shapes,
)

SIZE = 28
HEADS = 4
REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> ImageBindVisionConfig:
    return ImageBindVisionConfig.from_preset("tiny", **{"image_size": SIZE, "projection_dim": 32, **overrides})


def official_state_dict(d: int = 64, mlp: int = 256, layers: int = 2, proj: int = 32, tokens: int = 5, seed: int = 0):
    """Random tensors under Meta's flat key names (written out here, independently of the converter)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        std = std if std is not None else (math.prod(shape[1:]) ** -0.5 if len(shape) > 1 else 1.0)
        return torch.randn(*shape, generator=g) * std

    def ln():
        return 1 + 0.1 * w(d), 0.1 * w(d)

    sd = {
        "modality_preprocessors.vision.cls_token": w(1, 1, d, std=1.0),
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": w(d, 3, 2, 14, 14),
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed": w(1, tokens, d, std=1.0),
    }
    pre = "modality_trunks.vision.pre_transformer_layer.0."
    sd[pre + "weight"], sd[pre + "bias"] = ln()
    for i in range(layers):
        b = f"modality_trunks.vision.blocks.{i}."
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = w(3 * d, d), 0.1 * w(3 * d)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = w(d, d), 0.1 * w(d)
        sd[b + "norm_1.weight"], sd[b + "norm_1.bias"] = ln()
        sd[b + "norm_2.weight"], sd[b + "norm_2.bias"] = ln()
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = w(mlp, d), 0.1 * w(mlp)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = w(d, mlp), 0.1 * w(d)
    sd["modality_heads.vision.0.weight"], sd["modality_heads.vision.0.bias"] = ln()
    sd["modality_heads.vision.2.weight"] = w(proj, d)
    # Other modalities, as the real all-modality checkpoint holds them: the converter must ignore these.
    sd["modality_preprocessors.text.token_embedding.weight"] = w(50, d)
    sd["modality_trunks.audio.blocks.0.attn.in_proj_weight"] = w(3 * d, d)
    sd["modality_trunks.audio.blocks.0.mlp.fc1.weight"] = w(mlp, d)
    sd["modality_heads.audio.2.weight"] = w(proj, d)
    sd["modality_postprocessors.text.1.log_logit_scale"] = torch.tensor(4.6)
    return sd


# ---- Independent re-statement of Meta's vision forward (plain torch, flat official keys) ----------------------


def _meta_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Meta's `interpolate_pos_encoding` for a 1-frame-patch layout: bicubic scale of the 2-D grid, class kept."""
    old = pos.shape[1] - 1
    if old == num_patches:
        return pos
    side, dim = int(math.sqrt(old)), pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, scale_factor=math.sqrt(num_patches / old), mode="bicubic")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def meta_vision_forward(sd: dict, x: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """`ImageBindModel.forward({"vision": x})["vision"]` restated: x is [B,3,H,W] (image) or [B,S,3,T,H,W]."""
    reduce_views = x.ndim >= 5  # Meta: 5-D and more is [B, S, ...] with S clips/views
    if reduce_views:
        batch, views = x.shape[:2]
        x = x.reshape(batch * views, *x.shape[2:])
    if x.ndim == 4:
        x = x.unsqueeze(2)
    if x.shape[2] == 1:  # PadIm2Video(pad_type="repeat", ntimes=2)
        x = x.repeat(1, 1, 2, 1, 1)
    p = "modality_preprocessors.vision."
    stem = sd[p + "rgbt_stem.proj.1.weight"]
    tokens = F.conv3d(x, stem, stride=tuple(stem.shape[2:])).flatten(2).transpose(1, 2)
    tokens = torch.cat([sd[p + "cls_token"].expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + _meta_pos_embed(sd[p + "pos_embedding_helper.pos_embed"], tokens.shape[1] - 1)

    t = "modality_trunks.vision."
    d = tokens.shape[-1]

    def layer_norm(h, key):
        return F.layer_norm(h, (d,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)

    h = layer_norm(tokens, t + "pre_transformer_layer.0").transpose(0, 1)  # "b l d -> l b d"
    i = 0
    while f"{t}blocks.{i}.attn.in_proj_weight" in sd:
        b = f"{t}blocks.{i}."
        attn = nn.MultiheadAttention(d, heads, bias=True)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[b + "attn.in_proj_weight"],
                "in_proj_bias": sd[b + "attn.in_proj_bias"],
                "out_proj.weight": sd[b + "attn.out_proj.weight"],
                "out_proj.bias": sd[b + "attn.out_proj.bias"],
            }
        )
        attn.eval()
        normed = layer_norm(h, b + "norm_1")
        h = h + attn(normed, normed, normed, need_weights=False, attn_mask=None)[0]
        normed = layer_norm(h, b + "norm_2")
        hidden = F.gelu(F.linear(normed, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        h = h + F.linear(hidden, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        i += 1
    h = h.transpose(0, 1)  # "l b d -> b l d"
    head = "modality_heads.vision."
    h = layer_norm(h, head + "0")[:, 0]
    out = F.normalize(F.linear(h, sd[head + "2.weight"]), dim=-1)
    if reduce_views:
        out = out.reshape(batch, views, -1).mean(dim=1)
    return out


# ---- Tests ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official() -> dict:
    return official_state_dict()


@pytest.fixture(scope="module")
def converted_model(official) -> ImageBindVisionModel:
    model = ImageBindVisionModel(tiny_config()).eval()
    model.load_state_dict(convert_imagebind_state_dict(official, tiny_config()), strict=True)
    return model


def test_converted_model_matches_meta_reference_forward(official, converted_model):
    torch.manual_seed(0)
    images = torch.randn(3, 3, SIZE, SIZE)
    videos = torch.randn(2, 15, 3, 2, SIZE, SIZE)
    larger = torch.randn(1, 3, 4 * 14, 4 * 14)  # another square size: the position grid is resized bicubically
    with torch.no_grad():
        for pixels in (images, videos, larger):
            expected = meta_vision_forward(official, pixels)
            torch.testing.assert_close(converted_model(pixels).embeds, expected, rtol=0, atol=1e-6)


def test_eager_attention_also_matches_reference(official):
    config = tiny_config(attn_implementation="eager")
    model = ImageBindVisionModel(config).eval()
    model.load_state_dict(convert_imagebind_state_dict(official, config))
    assert model.config._attn_implementation == "eager"
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images).embeds, meta_vision_forward(official, images), rtol=0, atol=1e-6)


def test_convert_save_reload_gives_identical_embeddings(tmp_path, official, converted_model):
    checkpoint = tmp_path / "imagebind_tiny.pth"
    torch.save(official, checkpoint)
    loaded = load_imagebind_checkpoint(checkpoint, tiny_config())
    loaded.save_pretrained(tmp_path / "hf")
    reloaded = ImageBindVisionModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    videos = torch.randn(1, 15, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).embeds, converted_model(pixels).embeds)
        assert torch.equal(reloaded(videos).embeds, loaded(videos).embeds)
    assert not reloaded.training and reloaded.dtype == torch.float32


def test_in_projection_is_split_in_q_k_v_order(official):
    sd = convert_imagebind_state_dict(official, tiny_config())
    stacked = official["modality_trunks.vision.blocks.1.attn.in_proj_weight"]
    assert torch.equal(sd["layers.1.self_attn.q_proj.weight"], stacked[:64])
    assert torch.equal(sd["layers.1.self_attn.k_proj.weight"], stacked[64:128])
    assert torch.equal(sd["layers.1.self_attn.v_proj.weight"], stacked[128:])
    assert not any("audio" in key or "text" in key for key in sd)


def test_huge_layout_has_meta_key_count_and_parameter_count():
    shapes = official_vision_shapes(ImageBindVisionConfig.from_preset("huge"))
    assert len(shapes) == 392
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 1) == 632.8
    assert shapes["modality_preprocessors.vision.rgbt_stem.proj.1.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["modality_trunks.vision.blocks.31.attn.in_proj_weight"] == (3840, 1280)


def test_huge_checkpoint_layout_loads_into_huge_model_without_allocating():
    """Meta-device tensors in the huge layout: config inference, conversion and a strict load, with no 2.5 GB."""
    huge = ImageBindVisionConfig.from_preset("huge")
    sd = {k: torch.empty(s, device="meta") for k, s in official_vision_shapes(huge).items()}
    sd["modality_trunks.audio.blocks.0.attn.in_proj_weight"] = torch.empty(2304, 768, device="meta")
    converted = convert_imagebind_state_dict(sd)  # config inferred: the huge preset
    with torch.device("meta"):
        model = ImageBindVisionModel(huge)
    model.load_state_dict(converted, strict=True, assign=True)
    expected = sum(math.prod(s) for s in official_vision_shapes(huge).values())
    assert sum(p.numel() for p in model.parameters()) == expected


def _error(sd: dict) -> str:
    with pytest.raises(ValueError) as info:
        convert_imagebind_state_dict(sd, tiny_config())
    return str(info.value)


def test_missing_vision_key_is_named(official):
    sd = dict(official)
    del sd["modality_trunks.vision.blocks.1.mlp.fc2.bias"]
    message = _error(sd)
    assert "1 missing vision key" in message and "modality_trunks.vision.blocks.1.mlp.fc2.bias" in message


def test_unexpected_vision_key_is_named(official):
    sd = dict(official)
    sd["modality_trunks.vision.blocks.2.attn.in_proj_weight"] = torch.zeros(192, 64)  # a third block
    sd["modality_heads.vision.1.weight"] = torch.zeros(3)
    message = _error(sd)
    assert "2 unexpected vision key" in message
    assert "modality_trunks.vision.blocks.2.attn.in_proj_weight" in message
    assert "modality_heads.vision.1.weight" in message


def test_misshaped_vision_key_is_named_with_both_shapes(official):
    sd = dict(official)
    sd["modality_preprocessors.vision.cls_token"] = torch.zeros(1, 1, 32)
    message = _error(sd)
    expected = "modality_preprocessors.vision.cls_token: checkpoint (1, 1, 32), expected (1, 1, 64)"
    assert expected in message


def test_all_problems_are_listed_together(official):
    sd = dict(official)
    del sd["modality_heads.vision.2.weight"]
    sd["modality_trunks.vision.blocks.0.extra"] = torch.zeros(1)
    sd["modality_trunks.vision.blocks.0.mlp.fc1.weight"] = torch.zeros(8, 64)
    message = _error(sd)
    assert "missing" in message and "unexpected" in message and "wrong shape" in message


def test_non_imagebind_state_dict_and_unknown_architecture_are_refused(official):
    with pytest.raises(ValueError, match="no ImageBind vision keys"):
        convert_imagebind_state_dict({"model.layers.0.weight": torch.zeros(2)})
    # Tiny weights with a 28-pixel position table match no preset: the error asks for an explicit config.
    with pytest.raises(ValueError, match="pass config="):
        convert_imagebind_state_dict(official)


def test_missing_or_unreadable_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mm-llama download-imagebind"):
        load_imagebind_checkpoint(tmp_path / "nope.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.pth"):
        load_imagebind_checkpoint(broken)


def test_convert_command_writes_a_loadable_folder(tmp_path, capsys):
    official = official_state_dict(proj=1024)  # the tiny preset's projection_dim, so --preset tiny fits
    checkpoint = tmp_path / "imagebind.pth"
    torch.save(official, checkpoint)
    from mm_llama.cli import main as cli

    out = tmp_path / "out"
    assert cli(["convert-imagebind", "--checkpoint", str(checkpoint), "--output_dir", str(out), "--preset", "tiny",
                        "--image_size", str(SIZE)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = ImageBindVisionModel.from_pretrained(out).eval()
    assert ImageBindProcessor.from_pretrained(out).image_size == SIZE
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).embeds, meta_vision_forward(official, pixels), rtol=0, atol=1e-6)

    # A config that does not fit the weights (56-pixel position table) fails with the shape listing, exit code 1.
    assert cli(["convert-imagebind", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "bad"), "--preset", "tiny",
                        "--image_size", "56"]) == 1
    assert "pos_embedding_helper.pos_embed: checkpoint (1, 5, 64), expected (1, 17, 64)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
