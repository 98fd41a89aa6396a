"""ImageBindVisionModel behaviour on tiny random-init models: image/clip equivalence, normalisation, view averaging,
attention implementations, dtypes, save/load and input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel

SIZE = 28  # 2 x 2 patches of 14


def tiny_model(seed: int = 0, **overrides) -> ImageBindVisionModel:
    torch.manual_seed(seed)
    config = ImageBindVisionConfig.from_preset("tiny", **{"image_size": SIZE, "projection_dim": 32, **overrides})
    model = ImageBindVisionModel(config).eval()
    # The HF init (std 0.02) makes every output nearly the same vector; fan-in scaled weights and unit-scale
    # class/position embeddings make outputs depend on the input, so the tests can tell inputs apart.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:  # weight [out, *in]: std 1 / sqrt(fan_in)
                param.normal_(std=param[0].numel() ** -0.5)
        model.embeddings.class_embedding.normal_(std=1.0)
        model.embeddings.position_embedding.normal_(std=1.0)
    return model


@pytest.fixture(scope="module")
def model() -> ImageBindVisionModel:
    return tiny_model()


def test_presets_and_config_validation():
    huge = ImageBindVisionConfig.from_preset("huge")
    assert (huge.hidden_size, huge.num_hidden_layers, huge.num_attention_heads) == (1280, 32, 16)
    assert huge.layer_norm_eps == 1e-6
    assert huge.num_patches == 256 and huge.hidden_act == "gelu" and huge.projection_dim == 1024
    assert ImageBindVisionConfig.from_preset("tiny", image_size=SIZE).num_patches == 4
    with pytest.raises(ValueError, match="hiden_size"):
        ImageBindVisionConfig.from_preset("tiny", hiden_size=8)
    with pytest.raises(ValueError, match="Unknown ImageBind preset"):
        ImageBindVisionConfig.from_preset("giant")


def test_output_shapes_and_hidden_states(model):
    out = model(torch.randn(3, 3, SIZE, SIZE), output_hidden_states=True)
    assert out.embeds.shape == (3, 32)
    assert out.last_hidden_state.shape == (3, 1 + 4, 64)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    as_tuple = model(torch.randn(3, 3, SIZE, SIZE), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (3, 32)


def test_image_equals_its_two_frame_repeated_clip(model):
    images = torch.randn(2, 3, SIZE, SIZE)
    clip = images.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # [B, 3, 2, H, W]
    with torch.no_grad():
        from_images = model(images).embeds
        from_clip = model(clip).embeds
        from_single_frame = model(images.unsqueeze(2)).embeds  # T = 1 is repeated like an image
    torch.testing.assert_close(from_images, from_clip, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_images, from_single_frame, rtol=0, atol=1e-6)


def test_conv3d_on_repeated_frame_equals_conv2d_with_time_summed_kernel(model):
    image = torch.randn(2, 3, SIZE, SIZE)
    weight = model.embeddings.patch_embedding.weight.detach()  # [D, 3, 2, 14, 14]
    with torch.no_grad():
        conv3d = model.embeddings.patch_embedding(image.unsqueeze(2).repeat(1, 1, 2, 1, 1))  # [B, D, 1, 2, 2]
    conv2d = F.conv2d(image, weight.sum(dim=2), stride=14)  # [B, D, 2, 2]
    torch.testing.assert_close(conv3d.squeeze(2), conv2d, rtol=1e-5, atol=1e-5)


def test_image_and_clip_embeddings_have_unit_norm(model):
    with torch.no_grad():
        images = model(torch.randn(4, 3, SIZE, SIZE) * 3).embeds
        clips = model(torch.randn(4, 3, 2, SIZE, SIZE)).embeds
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(clips.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)


def test_video_embedding_is_mean_of_normalised_views_not_renormalised(model):
    views = torch.randn(2, 15, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        video = model(views).embeds
        per_view = torch.stack([model(views[b]).embeds for b in range(2)])  # [2, 15, P], each unit-norm
        embedded = model.embed_videos(views)
    torch.testing.assert_close(per_view.norm(dim=-1), torch.ones(2, 15), rtol=0, atol=1e-5)
    torch.testing.assert_close(video, per_view.mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(embedded, video, rtol=0, atol=0)
    # Distinct random views point in different directions, so their mean is strictly shorter than 1.
    assert (video.norm(dim=-1) < 0.999).all()


def test_video_of_identical_views_equals_the_view(model):
    clip = torch.randn(1, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        single = model(clip).embeds
        repeated = model(clip.unsqueeze(1).expand(1, 15, 3, 2, SIZE, SIZE)).embeds
    torch.testing.assert_close(repeated, single, rtol=0, atol=1e-6)


def test_sdpa_and_eager_agree_in_fp32():
    sdpa = tiny_model(seed=3)
    eager = tiny_model(seed=3)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.layers[0].self_attn.config._attn_implementation == "eager"
    pixels = torch.randn(2, 15, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        a, b = sdpa(pixels), eager(pixels)
    torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_from_pretrained_attn_implementation_switch(tmp_path, model):
    model.save_pretrained(tmp_path)
    eager = ImageBindVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels).embeds, model(pixels).embeds, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_close_to_fp32():
    fp32 = tiny_model(seed=4)
    bf16 = tiny_model(seed=4).to(torch.bfloat16)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    views = torch.randn(1, 15, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        low = bf16(pixels).embeds
        low_video = bf16(views).embeds
        ref = fp32(pixels).embeds
    assert low.dtype == torch.bfloat16 and low_video.dtype == torch.bfloat16
    assert torch.isfinite(low.float()).all() and torch.isfinite(low_video.float()).all()
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.99


def test_position_embedding_is_resized_for_other_square_sizes(model):
    with torch.no_grad():
        out = model(torch.randn(1, 3, 2 * SIZE, 2 * SIZE))
        same = model.embeddings._position_embedding_for(4)
    assert out.last_hidden_state.shape == (1, 1 + 16, 64)
    assert same is model.embeddings.position_embedding  # no resize at the native size


def test_save_and_reload_gives_identical_embeddings(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = ImageBindVisionModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).embeds, model(pixels).embeds)


def test_gradients_flow_for_fine_tuning():
    model = tiny_model(seed=5).train()
    model(torch.randn(2, 3, SIZE, SIZE)).embeds.sum().backward()
    assert model.embeddings.patch_embedding.weight.grad is not None
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 4, SIZE, SIZE), "channels"),
        ((2, 3, 3, SIZE, SIZE), "2 frames"),
        ((2, 3, 2, SIZE, 2 * SIZE), "square"),
        ((3, SIZE, SIZE), "pixel_values must be"),
        ((1, 15, 2, 3, SIZE, SIZE), r"\[B, V, C, T, H, W\]"),
    ],
)
def test_bad_input_shapes_are_explained(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_embed_helpers_check_their_layout(model):
    with pytest.raises(ValueError, match="embed_images"):
        model.embed_images(torch.randn(1, 3, 2, SIZE, SIZE))
    with pytest.raises(ValueError, match="embed_videos"):
        model.embed_videos(torch.randn(1, 3, SIZE, SIZE))
    assert model.embed_images(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 32)
