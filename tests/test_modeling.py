"""MMLlamaForCausalLM: equivalence with LLaMA, media placement, loss weighting, generation, save/load round trips."""


import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mm_llama import MMLlamaConfig, MMLlamaForCausalLM
from mm_llama.model.loss_mm_llama import LossBackend
from mm_llama.testing_utils import tiny_llama, tiny_llama_config, tiny_mm_llama

MEDIA_DIM = 16


def make_model(projector_type="linear", tokens_per_media=1, seed=0, **kwargs) -> MMLlamaForCausalLM:
    return tiny_mm_llama(seed, MEDIA_DIM, projector_type=projector_type, tokens_per_media=tokens_per_media,
                         **kwargs).eval()


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=generator)


def test_text_only_logits_equal_llama():
    model = make_model()
    llama = LlamaForCausalLM(model.config.text_config).eval()
    llama.load_state_dict(model.language_model.state_dict())
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sdpa_is_the_default_attention():
    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_media_only_changes_logits_at_and_after_its_placeholder(projector_type):
    model = make_model(projector_type)
    ids = random_ids(1, 16)
    ids[0, 4] = 0
    ids[0, 10] = 0
    embeds = torch.randn(2, 1, MEDIA_DIM)
    changed = embeds.clone()
    changed[1] += 1.0  # the second media item, at position 10
    with torch.no_grad():
        base = model(input_ids=ids, media_embeds=embeds).logits
        other = model(input_ids=ids, media_embeds=changed).logits
    assert torch.equal(base[:, :10], other[:, :10])
    assert (base[:, 10:] - other[:, 10:]).abs().amax(-1).min() > 0


def test_media_fill_placeholders_in_batch_order():
    model = make_model(tokens_per_media=2)
    ids = random_ids(2, 8)
    ids[0, 2:4] = 0
    ids[1, 5:7] = 0
    embeds = torch.randn(2, 2, MEDIA_DIM)
    merged = model.merge_media_into_embeddings(ids, model.get_input_embeddings()(ids), embeds)
    projected = model.projector(embeds)
    torch.testing.assert_close(merged[0, 2:4], projected[0])
    torch.testing.assert_close(merged[1, 5:7], projected[1])
    torch.testing.assert_close(merged[0, 4:], model.get_input_embeddings()(ids)[0, 4:])


def test_placeholder_media_count_mismatch_is_a_clear_error():
    model = make_model()
    ids = random_ids(1, 8)
    ids[0, 3] = 0
    with pytest.raises(ValueError, match="1 media placeholder tokens .* 2 media"):
        model(input_ids=ids, media_embeds=torch.randn(2, 1, MEDIA_DIM))
    with pytest.raises(ValueError, match="no media was given"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=f"\\[total_media, tokens_per_media, {MEDIA_DIM}\\]"):
        model(input_ids=ids, media_embeds=torch.randn(1, 1, MEDIA_DIM + 1))
    with pytest.raises(ValueError, match="no vision tower"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28))


def _per_token_ce(model, ids, embeds):
    with torch.no_grad():
        logits = model(input_ids=ids, media_embeds=embeds).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")


def test_loss_honours_labels_and_weights_by_hand():
    model = make_model()
    ids = random_ids(1, 10)
    ids[0, 2] = 0
    embeds = torch.randn(1, 1, MEDIA_DIM)
    ce = _per_token_ce(model, ids, embeds)  # ce[t] is the loss of predicting token t+1
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        masked = model(input_ids=ids, media_embeds=embeds, labels=labels)
    torch.testing.assert_close(masked.loss, ce[2:].mean())
    # Weights 0 on the prompt equal masking.
    weights = torch.ones(1, 10)
    weights[0, :3] = 0
    with torch.no_grad():
        zero = model(input_ids=ids, media_embeds=embeds, labels=ids, loss_weights=weights)
    torch.testing.assert_close(zero.loss, masked.loss)
    # A prompt weight of 0.05: sum(w * ce) / sum(w), with the BOS (position 0) never a target.
    weights[0, 1:3] = 0.05
    labels_weighted = ids.clone()
    labels_weighted[0, 0] = -100
    with torch.no_grad():
        weighted = model(input_ids=ids, media_embeds=embeds, labels=labels_weighted, loss_weights=weights)
    w = weights[0, 1:]
    torch.testing.assert_close(weighted.loss, (ce * w).sum() / w.sum())
    assert weighted.num_answer_tokens.item() == 9  # no answer_mask: every labelled token counts
    # With an answer mask, accuracy and answer loss count only the answers; the optimised loss is unchanged.
    answer_mask = torch.zeros(1, 10, dtype=torch.bool)
    answer_mask[0, 3:] = True
    with torch.no_grad():
        masked_answers = model(input_ids=ids, media_embeds=embeds, labels=labels_weighted, loss_weights=weights,
                               answer_mask=answer_mask)
    torch.testing.assert_close(masked_answers.loss, weighted.loss)
    assert masked_answers.num_answer_tokens.item() == 7
    torch.testing.assert_close(masked_answers.answer_loss_sum, ce[2:].sum())


def test_a_loss_backend_gives_the_same_loss_and_accuracy_from_the_trained_positions_only():
    model = make_model()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels)
        sparse = model(input_ids=ids, labels=labels, loss_backend=LossBackend())
        chunked = model(input_ids=ids, labels=labels, loss_backend=LossBackend(chunk_size=3))
    torch.testing.assert_close(chunked.loss, full.loss)
    assert chunked.logits is None and chunked.num_correct_tokens == full.num_correct_tokens
    torch.testing.assert_close(sparse.loss, full.loss)
    assert sparse.logits.shape == (2 * 7, 320)
    torch.testing.assert_close(sparse.logits, full.logits[:, 4:-1].reshape(-1, 320))
    assert sparse.num_correct_tokens == full.num_correct_tokens
    assert full.num_answer_tokens.item() == 14
    predicted = full.logits[:, :-1].argmax(-1)
    assert full.num_correct_tokens.item() == int((predicted == ids[:, 1:])[:, 4:].sum())


def test_the_replaced_loss_arguments_are_refused_by_name():
    model = make_model()
    ids = random_ids(1, 6)
    with pytest.raises(TypeError, match=r"\['logits_for_labels_only'\].*loss_backend=LossBackend"):
        model(input_ids=ids, labels=ids, logits_for_labels_only=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 10)
    ids[:, 3] = 0
    embeds = torch.randn(2, 1, MEDIA_DIM)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        model.language_model.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.language_model.model.gradient_checkpointing
        model(input_ids=ids, media_embeds=embeds, labels=ids).loss.backward()
        grads.append(model.projector.layers[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def manual_greedy(model, ids, embeds, steps):
    """Greedy decoding without a KV cache: the full sequence (media included) is re-run at every step."""
    tokens = ids.clone()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=tokens, media_embeds=embeds, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


def test_generate_with_media_equals_manual_greedy_loop():
    model = make_model("mlp2x_gelu")
    model.generation_config.eos_token_id = None
    ids = random_ids(1, 9)
    ids[0, 3] = 0
    embeds = torch.randn(1, 1, MEDIA_DIM) * 5
    generated = model.generate(input_ids=ids, media_embeds=embeds, max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones_like(ids))
    assert torch.equal(generated, manual_greedy(model, ids, embeds, 8))
    other = model.generate(input_ids=ids, media_embeds=embeds * -1, max_new_tokens=8, do_sample=False,
                           attention_mask=torch.ones_like(ids))
    assert not torch.equal(generated, other)  # the media really conditions the output


def test_save_pretrained_reloads_with_auto_classes(tmp_path):
    model = make_model("mlp2x_gelu")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_mm_llama.py").exists() and (tmp_path / "configuration_mm_llama.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MMLlamaForCausalLM)
    ids = random_ids(1, 7)
    ids[0, 2] = 0
    embeds = torch.randn(1, 1, MEDIA_DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, media_embeds=embeds).logits, model(input_ids=ids, media_embeds=embeds).logits,
            rtol=0, atol=0,
        )


# A saved folder loading with trust_remote_code where mm_llama cannot be imported: tests/test_merge.py, on the
# merged folder (written by the same save_pretrained), in a fresh interpreter.


def test_from_text_pretrained_starts_from_llama_weights(tmp_path):
    llama = tiny_llama(seed=3).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = MMLlamaForCausalLM.from_text_pretrained(tmp_path / "llama", projector_type="mlp2x_gelu",
                                                    media_embed_dim=MEDIA_DIM).eval()
    assert model.config.projector_type == "mlp2x_gelu"
    assert all(not p.is_meta for p in model.parameters())
    ids = random_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llama(input_ids=ids).logits, rtol=0, atol=0)
    # a projector saved from one model initialises another
    from safetensors.torch import save_file

    save_file(model.projector.state_dict(), str(tmp_path / "projector.safetensors"))
    again = MMLlamaForCausalLM.from_text_pretrained(tmp_path / "llama", projector_type="mlp2x_gelu",
                                                    media_embed_dim=MEDIA_DIM,
                                                    projector_path=tmp_path / "projector.safetensors")
    for a, b in zip(again.projector.parameters(), model.projector.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        MMLlamaForCausalLM.from_text_pretrained(tmp_path / "llama", projector_type="linear", media_embed_dim=MEDIA_DIM,
                                                projector_path=tmp_path / "projector.safetensors")


def make_model_with_vision_tower() -> MMLlamaForCausalLM:
    from mm_llama.imagebind import ImageBindVisionConfig

    vision_config = ImageBindVisionConfig.from_preset("tiny", image_size=28, projection_dim=MEDIA_DIM)
    return make_model(vision_config=vision_config)


def test_vision_tower_on_raw_pixels_equals_precomputed_embeddings(tmp_path):
    model = make_model_with_vision_tower()
    assert model.vision_tower is not None
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    ids = random_ids(1, 12)
    ids[0, 3] = 0  # an image
    ids[0, 8] = 0  # a video
    images = torch.randn(1, 3, 28, 28)
    videos = torch.randn(1, 15, 3, 2, 28, 28)
    type_ids = torch.tensor([0, 1])
    with torch.no_grad():
        embeds = torch.stack([model.vision_tower.embed_images(images)[0], model.vision_tower.embed_videos(videos)[0]])
        expected = model(input_ids=ids, media_embeds=embeds.unsqueeze(1)).logits
        got = model(input_ids=ids, pixel_values=images, video_pixel_values=videos, media_type_ids=type_ids).logits
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="media_type_ids"):
        model(input_ids=ids, pixel_values=images, video_pixel_values=videos)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.vision_tower is not None
    with torch.no_grad():
        again = reloaded(input_ids=ids, pixel_values=images, video_pixel_values=videos, media_type_ids=type_ids).logits
    torch.testing.assert_close(again, got)  # same weights; conv kernels may differ in the last float bits


def test_vision_tower_dimension_must_match_the_projector():
    from mm_llama.imagebind import ImageBindVisionConfig

    with pytest.raises(Exception, match="media_embed_dim"):
        MMLlamaConfig(
            text_config=tiny_llama_config(),
            vision_config=ImageBindVisionConfig.from_preset("tiny", projection_dim=32),
            media_embed_dim=MEDIA_DIM,
        )


def test_a_batch_without_trained_tokens_has_zero_loss():
    model = make_model()
    ids = random_ids(1, 6)
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.num_answer_tokens.item() == 0
