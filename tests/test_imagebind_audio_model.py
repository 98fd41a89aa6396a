"""ImageBind audio tower: a random state dict in Meta's flat `imagebind_huge.pth` layout (other modalities included)
-> HF model, compared with an independent re-statement of Meta's audio forward; conversion modes; key errors."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from mm_llama.imagebind import (
    ImageBindAudioConfig,
    ImageBindAudioModel,
    ImageBindAudioProcessor,
    ImageBindVisionConfig,
    ImageBindVisionModel,
    convert_imagebind_audio_state_dict,
    convert_imagebind_checkpoint,
    load_imagebind_audio_checkpoint,
    load_imagebind_checkpoint,
    official_audio_shapes,
    official_vision_shapes,
)
from mm_llama.imagebind.conversion_imagebind import infer_audio_config
from mm_llama.imagebind.modeling_imagebind_audio import drop_path

HEADS = 4
SCALE = 7.5  # not Meta's 20, so that a converter or model ignoring the checkpoint's scale fails the parity test
LOG_SCALE = math.log(SCALE)


def tiny_config(**overrides) -> ImageBindAudioConfig:
    return ImageBindAudioConfig.from_preset("tiny", **{"projection_dim": 32, "logit_scale": SCALE, **overrides})


def official_state_dict(d: int = 64, mlp: int = 256, layers: int = 2, proj: int = 32, seed: int = 0,
                        log_scale: float = LOG_SCALE) -> dict:
    """Random tensors under Meta's flat audio key names (written out here, independently of the converter)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        std = std if std is not None else (math.prod(shape[1:]) ** -0.5 if len(shape) > 1 else 1.0)
        return torch.randn(*shape, generator=g) * std

    def ln():
        return 1 + 0.1 * w(d), 0.1 * w(d)

    pre = "modality_preprocessors.audio."
    sd = {
        pre + "cls_token": w(1, 1, d, std=1.0),
        # Small stem weights: token variance ~1e-5, so that the stem LayerNorm's eps (1e-5, not 1e-6) matters.
        pre + "rgbt_stem.proj.weight": w(d, 1, 16, 16, std=2e-4),
        pre + "pos_embedding_helper.pos_embed": w(1, 1 + 12 * 19, d, std=1.0),
    }
    sd[pre + "rgbt_stem.norm_layer.weight"], sd[pre + "rgbt_stem.norm_layer.bias"] = ln()
    for i in range(layers):
        b = f"modality_trunks.audio.blocks.{i}."
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = w(3 * d, d), 0.1 * w(3 * d)
        sd[b + "attn.bias_k"], sd[b + "attn.bias_v"] = w(1, 1, d, std=1.0), w(1, 1, d, std=1.0)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = w(d, d), 0.1 * w(d)
        sd[b + "norm_1.weight"], sd[b + "norm_1.bias"] = ln()
        sd[b + "norm_2.weight"], sd[b + "norm_2.bias"] = ln()
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = w(mlp, d), 0.1 * w(mlp)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = w(d, mlp), 0.1 * w(d)
    sd["modality_heads.audio.0.weight"], sd["modality_heads.audio.0.bias"] = ln()
    sd["modality_heads.audio.2.weight"] = w(proj, d)
    sd["modality_postprocessors.audio.1.log_logit_scale"] = torch.tensor(log_scale)
    # Other modalities, as the real all-modality checkpoint holds them: the audio converter must ignore these.
    sd["modality_preprocessors.text.token_embedding.weight"] = w(50, d)
    sd["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = w(3 * d, d)
    sd["modality_trunks.depth.blocks.0.attn.bias_k"] = w(1, 1, d)
    sd["modality_postprocessors.depth.1.log_logit_scale"] = torch.tensor(math.log(5.0))
    return sd


# ---- Independent re-statement of Meta's audio forward (plain torch, flat official keys) -------------------------


def meta_audio_forward(sd: dict, x: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """`ImageBindModel.forward({"audio": x})["audio"]` restated: x is [B, 1, 128, 204] or [B, S, 1, 128, 204]."""
    reduce_clips = x.ndim >= 5
    if reduce_clips:
        batch, clips = x.shape[:2]
        x = x.reshape(batch * clips, *x.shape[2:])
    p = "modality_preprocessors.audio."
    d = sd[p + "cls_token"].shape[-1]
    tokens = F.conv2d(x, sd[p + "rgbt_stem.proj.weight"], stride=10).flatten(2).transpose(1, 2)
    # PatchEmbedGeneric's norm_layer: a default nn.LayerNorm (eps 1e-5).
    tokens = F.layer_norm(tokens, (d,), sd[p + "rgbt_stem.norm_layer.weight"], sd[p + "rgbt_stem.norm_layer.bias"])
    tokens = torch.cat([sd[p + "cls_token"].expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + sd[p + "pos_embedding_helper.pos_embed"]

    t = "modality_trunks.audio."

    def layer_norm(h, key):
        return F.layer_norm(h, (d,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)

    h = tokens.transpose(0, 1)  # pre_transformer_layer: Identity (no LayerNorm for audio), "b l d -> l b d"
    i = 0
    while f"{t}blocks.{i}.attn.in_proj_weight" in sd:
        b = f"{t}blocks.{i}."
        attn = nn.MultiheadAttention(d, heads, bias=True, add_bias_kv=True)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[b + "attn.in_proj_weight"],
                "in_proj_bias": sd[b + "attn.in_proj_bias"],
                "bias_k": sd[b + "attn.bias_k"],
                "bias_v": sd[b + "attn.bias_v"],
                "out_proj.weight": sd[b + "attn.out_proj.weight"],
                "out_proj.bias": sd[b + "attn.out_proj.bias"],
            }
        )
        attn.eval()
        normed = layer_norm(h, b + "norm_1")
        h = h + attn(normed, normed, normed, need_weights=False, attn_mask=None)[0]  # drop path: identity in eval
        normed = layer_norm(h, b + "norm_2")
        hidden = F.gelu(F.linear(normed, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        h = h + F.linear(hidden, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        i += 1
    h = h.transpose(0, 1)
    head = "modality_heads.audio."
    out = F.linear(layer_norm(h, head + "0")[:, 0], sd[head + "2.weight"])
    # Normalize(dim=-1), then LearnableLogitScaling(learnable=False): clip(exp(log_logit_scale), max=100) * x.
    scale = torch.clip(sd["modality_postprocessors.audio.1.log_logit_scale"].exp(), max=100)
    out = scale * F.normalize(out, dim=-1, p=2)
    if reduce_clips:
        out = out.reshape(batch, clips, -1).mean(dim=1)
    return out


# ---- Tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official() -> dict:
    return official_state_dict()


@pytest.fixture(scope="module")
def converted_model(official) -> ImageBindAudioModel:
    model = ImageBindAudioModel(tiny_config()).eval()
    model.load_state_dict(convert_imagebind_audio_state_dict(official, tiny_config()), strict=True)
    return model


def test_converted_model_matches_meta_reference_forward(official, converted_model):
    torch.manual_seed(0)
    items = torch.randn(2, 3, 1, 128, 204)  # the processor's output: 3 clips per item, averaged
    clips = torch.randn(3, 1, 128, 204)
    with torch.no_grad():
        for features in (items, clips):
            expected = meta_audio_forward(official, features)
            torch.testing.assert_close(converted_model(features).embeds, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(converted_model.embed_audio(items), meta_audio_forward(official, items),
                                   rtol=0, atol=1e-5)
        # Per clip the embedding has the checkpoint's logit scale as its norm.
        norms = converted_model(clips).embeds.norm(dim=-1)
        torch.testing.assert_close(norms, torch.full((3,), 7.5), rtol=1e-5, atol=0)


def test_eager_attention_also_matches_reference(official):
    config = tiny_config(attn_implementation="eager")
    model = ImageBindAudioModel(config).eval()
    model.load_state_dict(convert_imagebind_audio_state_dict(official, config))
    assert model.config._attn_implementation == "eager"
    features = torch.randn(2, 3, 1, 128, 204)
    with torch.no_grad():
        torch.testing.assert_close(model(features).embeds, meta_audio_forward(official, features), rtol=0, atol=1e-5)


def test_logit_scale_is_capped_at_100_as_in_meta():
    official = official_state_dict(log_scale=math.log(150.0))
    config = tiny_config(logit_scale=150.0)
    model = ImageBindAudioModel(config).eval()
    model.load_state_dict(convert_imagebind_audio_state_dict(official, config))
    features = torch.randn(2, 1, 128, 204)
    with torch.no_grad():
        out = model(features).embeds
        torch.testing.assert_close(out, meta_audio_forward(official, features), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2,), 100.0), rtol=1e-5, atol=0)


def test_random_init_uses_meta_fixed_scale_and_hidden_states():
    model = ImageBindAudioModel(ImageBindAudioConfig.from_preset("tiny", num_hidden_layers=3)).eval()
    assert model.logit_scale == 20.0
    with torch.no_grad():
        out = model(torch.randn(1, 1, 128, 204), output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1] is out.last_hidden_state
    assert out.last_hidden_state.shape == (1, 1 + 228, 64)
    assert [layer.drop_path_prob for layer in model.layers] == pytest.approx([0.0, 0.05, 0.1])


def test_drop_path_is_per_token_position_in_training_and_off_in_eval():
    torch.manual_seed(0)
    x = torch.ones(4, 50, 8)
    dropped = drop_path(x, 0.5, training=True)
    assert set(dropped.unique().tolist()) <= {0.0, 2.0} and 0 < (dropped == 0).sum() < dropped.numel()
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # one decision per position, shared by the batch
    assert drop_path(x, 0.5, training=False) is x

    model = ImageBindAudioModel(tiny_config(drop_path_rate=0.5))
    features = torch.randn(2, 3, 1, 128, 204)
    model.eval()
    with torch.no_grad():
        reference = model(features).embeds
        assert torch.equal(model(features).embeds, reference)
    model.train()
    torch.manual_seed(1)
    trained = model(features).embeds
    assert not torch.allclose(trained, reference)
    model.gradient_checkpointing_enable()
    trained.sum().backward()
    assert model.layers[0].self_attn.bias_k.grad is not None


def test_input_shape_errors_are_clear(converted_model):
    with pytest.raises(ValueError, match=r"\[B, 1, 128, 204\]"):
        converted_model(torch.randn(1, 1, 128, 100))
    with pytest.raises(ValueError, match="embed_audio expects"):
        converted_model.embed_audio(torch.randn(1, 1, 128, 204))
    with pytest.raises(ValueError, match="input_features must be"):
        converted_model(torch.randn(128, 204))


def test_audio_checkpoint_save_reload_and_auto_classes(tmp_path, official, converted_model):
    checkpoint = tmp_path / "imagebind_tiny.pth"
    torch.save(official, checkpoint)
    loaded = load_imagebind_audio_checkpoint(checkpoint, tiny_config())
    assert not loaded.training
    loaded.save_pretrained(tmp_path / "hf")
    reloaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(reloaded, ImageBindAudioModel)
    assert AutoConfig.from_pretrained(tmp_path / "hf").model_type == "imagebind_audio_model"
    assert reloaded.config.logit_scale == pytest.approx(SCALE, rel=1e-6)
    features = torch.randn(2, 3, 1, 128, 204)
    with torch.no_grad():
        assert torch.equal(reloaded(features).embeds, converted_model(features).embeds)


def _combined_official(vision_config: ImageBindVisionConfig) -> dict:
    """Tiny audio keys plus random tiny vision keys, as one all-modality checkpoint."""
    g = torch.Generator().manual_seed(5)
    sd = official_state_dict()
    for key, shape in official_vision_shapes(vision_config).items():
        sd[key] = torch.randn(*shape, generator=g) * 0.1
    return sd


def test_convert_modalities_audio_and_all(tmp_path):
    vision_config = ImageBindVisionConfig.from_preset("tiny", image_size=28, projection_dim=32)
    official = _combined_official(vision_config)
    checkpoint = tmp_path / "imagebind.pth"
    torch.save(official, checkpoint)

    audio_dir = convert_imagebind_checkpoint(checkpoint, tmp_path / "audio_only", modality="audio",
                                             audio_config=tiny_config())
    assert {p.name for p in audio_dir.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    audio = ImageBindAudioModel.from_pretrained(audio_dir).eval()
    processor = AutoFeatureExtractor.from_pretrained(audio_dir)
    assert isinstance(processor, ImageBindAudioProcessor)
    assert (processor.num_mel_bins, processor.target_length, processor.num_clips) == (128, 204, 3)

    both = convert_imagebind_checkpoint(checkpoint, tmp_path / "both", config=vision_config, modality="all",
                                        audio_config=tiny_config())
    audio_sub = ImageBindAudioModel.from_pretrained(both, subfolder="audio").eval()
    vision_sub = ImageBindVisionModel.from_pretrained(both, subfolder="vision").eval()
    vision_only = load_imagebind_checkpoint(checkpoint, vision_config)
    features, pixels = torch.randn(1, 3, 1, 128, 204), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = meta_audio_forward(official, features)
        torch.testing.assert_close(audio(features).embeds, expected, rtol=0, atol=1e-5)
        assert torch.equal(audio_sub(features).embeds, audio(features).embeds)
        assert torch.equal(vision_sub(pixels).embeds, vision_only(pixels).embeds)

    # The default stays vision-only, written into output_dir itself.
    vision_dir = convert_imagebind_checkpoint(checkpoint, tmp_path / "vision", config=vision_config)
    assert ImageBindVisionModel.from_pretrained(vision_dir).config.model_type == "imagebind_vision_model"

    with pytest.raises(ValueError, match="modality must be one of"):
        convert_imagebind_checkpoint(checkpoint, tmp_path / "x", modality="text")
    with pytest.raises(ValueError, match="audio_config="):
        convert_imagebind_checkpoint(checkpoint, tmp_path / "x", config=vision_config, modality="audio")
    # A mismatching audio config fails before anything is written, also in "all" mode.
    with pytest.raises(ValueError, match="wrong shape audio key"):
        convert_imagebind_checkpoint(checkpoint, tmp_path / "bad", config=vision_config, modality="all",
                                     audio_config=tiny_config(hidden_size=32, num_attention_heads=4))
    assert not (tmp_path / "bad").exists()


def test_end_to_end_file_to_embedding(tmp_path, converted_model):
    rate = 16000
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate) * 32767).astype("<i2")
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    features = ImageBindAudioProcessor()([path, path])["input_features"]
    with torch.no_grad():
        embeds = converted_model.embed_audio(features)
    assert embeds.shape == (2, 32)
    torch.testing.assert_close(embeds[0], embeds[1], rtol=0, atol=1e-6)  # rows of one batch: same up to float sums


def _error(sd: dict) -> str:
    with pytest.raises(ValueError) as info:
        convert_imagebind_audio_state_dict(sd, tiny_config())
    return str(info.value)


def test_missing_unexpected_and_misshaped_audio_keys_are_listed(official):
    sd = dict(official)
    del sd["modality_trunks.audio.blocks.1.attn.bias_v"]
    sd["modality_trunks.audio.pre_transformer_layer.0.weight"] = torch.zeros(64)  # audio has no pre-trunk LN
    sd["modality_preprocessors.audio.rgbt_stem.proj.weight"] = torch.zeros(64, 1, 14, 14)
    message = _error(sd)
    assert "1 missing audio key" in message and "modality_trunks.audio.blocks.1.attn.bias_v" in message
    assert "1 unexpected audio key" in message and "pre_transformer_layer.0.weight" in message
    assert "rgbt_stem.proj.weight: checkpoint (64, 1, 14, 14), expected (64, 1, 16, 16)" in message


def test_non_imagebind_state_dict_and_unknown_architecture_are_refused(official):
    with pytest.raises(ValueError, match="no ImageBind audio keys"):
        convert_imagebind_audio_state_dict({"modality_trunks.vision.blocks.0.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="pass config=ImageBindAudioConfig"):
        convert_imagebind_audio_state_dict(official)  # projection 32 matches no preset
    with pytest.raises(ValueError, match=r"logit scale .* = 7\.5\) differs from config.logit_scale = 20"):
        convert_imagebind_audio_state_dict(official, tiny_config(logit_scale=20.0))


def test_huge_audio_layout_and_meta_device_load():
    huge = ImageBindAudioConfig.from_preset("huge")
    assert (huge.hidden_size, huge.num_hidden_layers, huge.num_attention_heads, huge.projection_dim) == (
        768, 12, 12, 1024)
    shapes = official_audio_shapes(huge)
    assert len(shapes) == 5 + 12 * 14 + 3 + 1
    assert sum(math.prod(s) for s in shapes.values()) == 86_235_649
    assert shapes["modality_preprocessors.audio.rgbt_stem.proj.weight"] == (768, 1, 16, 16)
    assert shapes["modality_preprocessors.audio.pos_embedding_helper.pos_embed"] == (1, 229, 768)
    assert shapes["modality_trunks.audio.blocks.11.attn.bias_k"] == (1, 1, 768)
    assert shapes["modality_heads.audio.2.weight"] == (1024, 768)

    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd["modality_postprocessors.audio.1.log_logit_scale"] = torch.tensor(math.log(20.0))  # float32, as Meta's
    sd["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.empty(3840, 1280, device="meta")
    inferred = infer_audio_config(sd)
    assert inferred.hidden_size == 768 and inferred.logit_scale == pytest.approx(20.0, rel=1e-6)
    converted = convert_imagebind_audio_state_dict(sd)  # config inferred: the huge preset
    with torch.device("meta"):
        model = ImageBindAudioModel(huge)
    model.load_state_dict(converted, strict=True, assign=True)
    # Every checkpoint number but the fixed scale is a parameter.
    assert sum(p.numel() for p in model.parameters()) + 1 == 86_235_649
