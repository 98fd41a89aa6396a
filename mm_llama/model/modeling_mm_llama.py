"""MM-LLaMA: LLaMA-2-chat with media embeddings projected into its token embedding space.

The language model is an unmodified `LlamaForCausalLM`. A media item (image or video) is one ImageBind embedding
(or `tokens_per_media` of them); the projector maps it to the LLM width and it replaces the placeholder tokens
(`config.media_token_id`, LLaMA's `<unk>`) in the input embeddings, in order. Without media the model is exactly
the language model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_utils import slice_logits_to_keep
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .configuration_mm_llama import MMLlamaConfig
from .loss_mm_llama import LossBackend, causal_lm_loss

# Inputs that describe the prompt's media; generation passes them on the prefill step only.
MEDIA_INPUT_NAMES = ("media_embeds", "pixel_values", "video_pixel_values", "media_type_ids")


@dataclass
class MMLlamaCausalLMOutput(ModelOutput):
    """Output of [`MMLlamaForCausalLM`].

    loss: the optimised loss, sum(w * CE) / sum(w) over the trained next-token targets (see `loss_mm_llama`).
    logits: [batch, seq_len, vocab]; with labels and a `loss_backend`, [num_trained_tokens, vocab] (the full
        loss) or None (the chunked / Liger loss).
    num_correct_tokens / num_answer_tokens / answer_loss_sum: sums over the ANSWER targets (argmax hits, count, CE)
        from which `token_accuracy` and `answer_loss` are computed after summing over batches and processes.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    num_correct_tokens: torch.LongTensor | None = None
    num_answer_tokens: torch.LongTensor | None = None
    answer_loss_sum: torch.FloatTensor | None = None


class MMLlamaProjector(nn.Module):
    """Maps media embeddings [..., media_embed_dim] to the language model's width [..., hidden_size]."""

    def __init__(self, config: MMLlamaConfig):
        super().__init__()
        hidden_size, bias = config.text_config.hidden_size, config.projector_bias
        if config.projector_type == "linear":
            self.layers = nn.Sequential(nn.Linear(config.media_embed_dim, hidden_size, bias=bias))
        else:  # "mlp2x_gelu", as LLaVA-1.5
            self.layers = nn.Sequential(
                nn.Linear(config.media_embed_dim, hidden_size, bias=bias), ACT2FN["gelu"],
                nn.Linear(hidden_size, hidden_size, bias=bias),
            )
        self.dropout = nn.Dropout(config.projector_dropout)

    def forward(self, media_embeds: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layers(media_embeds))


class MMLlamaPreTrainedModel(PreTrainedModel):
    config_class = MMLlamaConfig
    config: MMLlamaConfig
    base_model_prefix = ""
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' deprecated alias of `is_activation_checkpointing`, answered without its FutureWarning: PEFT
        (0.21) reads the alias on every adapter load, which would warn in every stage-2 run, merge and chat."""
        return self.is_activation_checkpointing

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Sub-models (LLaMA, ImageBind) initialise their own modules; only the projector is ours.
        if isinstance(module, MMLlamaProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for layer in module.layers:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, mean=0.0, std=std)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
        else:
            super()._init_weights(module)


def _imagebind_vision_model(vision_config) -> nn.Module:
    """Builds `ImageBindVisionModel`; imported lazily so a checkpoint without a vision tower needs no ImageBind code."""
    try:
        modeling = importlib.import_module("mm_llama.imagebind")
    except ImportError as error:
        raise ImportError(
            "This MM-LLaMA checkpoint has an ImageBind vision tower, whose code ships with the `mm_llama` package: "
            "install it to load the tower, or use a checkpoint without `vision_config` and precomputed embeddings."
        ) from error
    return modeling.ImageBindVisionModel(vision_config)


class MMLlamaForCausalLM(MMLlamaPreTrainedModel, GenerationMixin):
    """LLaMA with media inputs. Holds `language_model` (`LlamaForCausalLM`), `projector` and, when
    `config.vision_config` is set, a frozen `vision_tower` (ImageBind) that embeds raw pixels."""

    def __init__(self, config: MMLlamaConfig):
        super().__init__(config)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.projector = MMLlamaProjector(config)
        self.vision_tower = _imagebind_vision_model(config.vision_config) if config.vision_config else None
        if self.vision_tower is not None:
            self.vision_tower.requires_grad_(False)
        self.post_init()

    @property
    def _tied_weights_keys(self) -> dict[str, str]:  # noqa: D401  (PreTrainedModel reads it as an attribute)
        if not self.config.tie_word_embeddings:
            return {}
        return {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_text_pretrained(
        cls,
        llama_path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        projector_path: str | Path | None = None,
        **config_overrides,
    ) -> "MMLlamaForCausalLM":
        """Builds an MM-LLaMA model whose language model is a plain LLaMA checkpoint (e.g. Meta's LLaMA-2-7B-chat
        converted to HF format), with a freshly initialised projector: the starting point of stage 1.

        Args:
            llama_path: folder or Hub id of a `LlamaForCausalLM` checkpoint.
            dtype: dtype of the language model (and projector), e.g. torch.bfloat16.
            attn_implementation: "sdpa" (default), "eager" or "flash_attention_2".
            projector_path: optional projector weights (a `.safetensors`/`.bin` state dict of `MMLlamaProjector`)
                to initialise from.
            **config_overrides: `MMLlamaConfig` fields (projector_type, media_embed_dim, vision_config, ...).
        """
        load_kwargs = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        language_model = LlamaForCausalLM.from_pretrained(llama_path, **load_kwargs)
        config = MMLlamaConfig(text_config=language_model.config, **config_overrides)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        # Build the wrapper without allocating a second, random LLM, then put the loaded one in its place.
        with torch.device("meta"):
            model = cls(config)
        model.language_model = language_model
        model.projector = MMLlamaProjector(config)
        model._init_weights(model.projector)
        if config.vision_config is not None:
            model.vision_tower = _imagebind_vision_model(config.vision_config).requires_grad_(False)
        if projector_path is not None:
            model.load_projector(projector_path)
        model.projector.to(dtype=language_model.dtype)
        return model

    def load_projector(self, path: str | Path) -> None:
        """Loads projector weights from a state-dict file (`projector.safetensors` or a torch `.bin`/`.pt`).

        Keys may be the projector's own (`layers.0.weight`) or prefixed (`projector.layers.0.weight`).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Projector weights not found: {path}. Pass the projector file of a stage-1 run.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = {key.removeprefix("projector."): value for key, value in state_dict.items()}
        missing, unexpected = self.projector.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the {self.config.projector_type!r} projector: missing keys {missing}, "
                f"unexpected keys {unexpected}. Check projector_type and media_embed_dim."
            )

    # ---------------------------------------------------------------- media

    def embed_media(
        self,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        media_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the frozen vision tower on raw media (its `embed_media`) and returns ImageBind embeddings in
        placeholder order: [num_media, 1, media_embed_dim]. See `ImageBindVisionModel.embed_media` for the inputs."""
        if self.vision_tower is None:
            raise ValueError(
                "Raw pixel inputs need a vision tower, but this model has no vision tower (config.vision_config is None). "
                "Pass precomputed ImageBind `media_embeds`, or build the model with a vision_config."
            )
        with torch.no_grad():
            return self.vision_tower.embed_media(pixel_values, video_pixel_values, media_type_ids).unsqueeze(1)

    def merge_media_into_embeddings(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, media_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Replaces the placeholder positions of `inputs_embeds`, in row-major order, with projected media.

        Args:
            input_ids: [batch, seq_len]
            inputs_embeds: [batch, seq_len, hidden]
            media_embeds: [total_media, tokens_per_media, media_embed_dim] (or [total_media, media_embed_dim]
                when tokens_per_media is 1), the batch's media in placeholder order.
        Returns:
            [batch, seq_len, hidden]
        """
        if media_embeds.dim() == 2:
            media_embeds = media_embeds.unsqueeze(1)
        if media_embeds.dim() != 3 or media_embeds.shape[-1] != self.config.media_embed_dim:
            raise ValueError(
                f"media_embeds must be [total_media, tokens_per_media, {self.config.media_embed_dim}], "
                f"got {tuple(media_embeds.shape)}."
            )
        placeholder_mask = input_ids == self.config.media_token_id
        num_placeholders = int(placeholder_mask.sum())
        num_media_tokens = media_embeds.shape[0] * media_embeds.shape[1]
        if num_placeholders != num_media_tokens:
            raise ValueError(
                f"The batch has {num_placeholders} media placeholder tokens (id {self.config.media_token_id}) but "
                f"{media_embeds.shape[0]} media x {media_embeds.shape[1]} tokens = {num_media_tokens} media vectors "
                "were given. Each image/video needs exactly tokens_per_media placeholders; build inputs with "
                "MMLlamaProcessor, which inserts them."
            )
        projected = self.projector(media_embeds.to(self.projector.layers[0].weight.dtype))
        projected = projected.reshape(-1, projected.shape[-1]).to(inputs_embeds.dtype)
        # masked_scatter fills masked positions in row-major order, i.e. placeholder order.
        return inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), projected)

    # ---------------------------------------------------------------- forward

    def _embed_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        media_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        media_type_ids: torch.Tensor | None = None,
        decoding: bool = False,
    ) -> torch.Tensor:
        """The language model's input embeddings [batch, seq_len, hidden], media merged in at the placeholders.

        Arguments as in `forward`; `decoding`: a decoding step (a KV cache is given), whose ids are not checked for
        placeholders so that it never syncs on them and compiles whole.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if pixel_values is not None or video_pixel_values is not None:
            if media_embeds is not None:
                raise ValueError("Pass either media_embeds or raw pixel inputs, not both.")
            media_embeds = self.embed_media(pixel_values, video_pixel_values, media_type_ids)
        if inputs_embeds is not None:
            if media_embeds is not None:
                raise ValueError("media_embeds need input_ids to locate the placeholders; got inputs_embeds instead.")
            return inputs_embeds
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if media_embeds is not None:
            return self.merge_media_into_embeddings(input_ids, inputs_embeds, media_embeds)
        if not decoding and bool((input_ids == self.config.media_token_id).any()):
            raise ValueError(
                f"input_ids contain media placeholder tokens (id {self.config.media_token_id}) but no media was "
                "given: pass media_embeds (or pixel_values / video_pixel_values)."
            )
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        media_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        media_type_ids: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        loss_weights: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_backend: LossBackend | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> MMLlamaCausalLMOutput:
        """
        Args:
            input_ids: [batch, seq_len] token ids, with `tokens_per_media` placeholders per media item.
            media_embeds: [total_media, tokens_per_media, media_embed_dim] precomputed ImageBind embeddings of the
                batch, in placeholder order (row by row).
            pixel_values / video_pixel_values / media_type_ids: raw media for the vision tower (see `embed_media`).
            position_ids: for packed batches (`mm_llama.data.packing`), positions restarting at 0 for every
                conversation, with `attention_mask=None`: attention then stays within each conversation.
            labels / loss_weights / answer_mask / num_items_in_batch: the loss inputs of
                `loss_mm_llama.causal_lm_loss`: [batch, seq_len] target ids (-100: no loss; shifted inside),
                per-token weights (the loss is sum(w * CE) / sum(w)), answer-token mask (token accuracy and answer
                loss count only those; None: every labelled token) and the gradient-accumulation denominator
                passed by the HF Trainer.
            loss_backend: with labels, how the loss is computed, chosen by the caller (`MMLlamaTrainer` builds it
                from its TrainingArguments); a `LossBackend` applies the LM head only at trained positions (it
                dominates a training step at a 32k vocabulary), and `logits` is then [num_trained, vocab] or None.
                It is run here rather than by the trainer because under FSDP / ZeRO-3 the LM head weight is gathered
                only inside this forward. None: logits at every position, as a plain transformers forward.
        """
        replaced = {"logits_for_labels_only", "loss_chunk_size", "use_liger_loss"} & kwargs.keys()
        if replaced:
            raise TypeError(f"MMLlamaForCausalLM.forward no longer takes {sorted(replaced)}: pass "
                            "loss_backend=LossBackend(chunk_size=..., use_liger=...) from mm_llama.model.loss_mm_llama.")
        inputs_embeds = self._embed_inputs(input_ids, inputs_embeds, media_embeds, pixel_values, video_pixel_values,
                                          media_type_ids, decoding=cache is not None)
        if labels is not None and use_cache is None:
            # A forward with labels (training, evaluation) never needs a KV cache; packed batches must have none,
            # since a cache turns off transformers' packed-sequence attention mask (config.use_cache is True).
            use_cache = False
        outputs = self.language_model.model(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        lm_head = self.language_model.lm_head
        loss = stats = None
        if labels is not None:
            loss, stats, logits = causal_lm_loss(outputs.last_hidden_state, lm_head, labels, loss_weights,
                                                 answer_mask, num_items_in_batch, loss_backend)
        else:
            logits = lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        return MMLlamaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache if hasattr(outputs, "cache") else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_correct_tokens=stats.answer_correct if stats is not None else None,
            num_answer_tokens=stats.answer_tokens if stats is not None else None,
            answer_loss_sum=stats.answer_loss_sum if stats is not None else None,
        )

    def prepare_inputs_for_generation(self, input_ids, cache=None, is_first_iteration=False, **kwargs):
        media_inputs = {name: kwargs.pop(name, None) for name in MEDIA_INPUT_NAMES}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        # Media are merged into the prompt once, on the prefill step; later steps read them from the KV cache.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update({name: value for name, value in media_inputs.items() if value is not None})
        return model_inputs


__all__ = ["MMLlamaForCausalLM", "MMLlamaPreTrainedModel", "MMLlamaProjector", "MMLlamaCausalLMOutput"]
