"""Configuration of MM-LLaMA: a LLaMA language model, a projector and an optional ImageBind vision tower."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
IMAGEBIND_VISION_MODEL_TYPE = "imagebind_vision_model"


def _imagebind_vision_config_class() -> type[PreTrainedConfig]:
    """`ImageBindVisionConfig`, looked up lazily.

    This module does not import the ImageBind code, so that a checkpoint without a vision tower loads with
    `trust_remote_code=True` where `mm_llama` is not installed; a vision tower does need the package.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if IMAGEBIND_VISION_MODEL_TYPE not in CONFIG_MAPPING:
        try:
            import mm_llama.imagebind  # noqa: F401  (importing it registers the ImageBind config)
        except ImportError as error:
            raise ImportError(
                "This MM-LLaMA config has a `vision_config` (an ImageBind vision tower), whose code ships with the "
                "`mm_llama` package: `pip install mm-llama` (or the repository) to load it."
            ) from error
    return CONFIG_MAPPING[IMAGEBIND_VISION_MODEL_TYPE]


@strict
class MMLlamaConfig(PreTrainedConfig):
    r"""
    Configuration of [`MMLlamaForCausalLM`].

    Args:
        text_config: the language model's `LlamaConfig` (LLaMA-2-7B-chat's by default).
        vision_config: an `ImageBindVisionConfig` for an optional built-in vision tower; `None` when the model
            is fed precomputed ImageBind embeddings (training, and chat with embedding files).
        media_embed_dim: size of one media embedding vector (ImageBind-huge: 1024).
        tokens_per_media: how many placeholder tokens (and projected vectors) stand for one image or video.
        projector_type: "linear" (the original MM-LLaMA) or "mlp2x_gelu" (LLaVA-1.5's two-layer MLP).
        projector_dropout: dropout on the projector output during training (the original MM-LLaMA: 0.1 in stage 1).
        projector_bias: whether the projector's linear layers have a bias (the original's 1024 -> 4096 Linear has
            none).
        media_token_id: id of the placeholder token; LLaMA's `<unk>` (0), so no vocabulary change is needed.

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from mm_llama import MMLlamaConfig
    >>> config = MMLlamaConfig(text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2), projector_type="linear")
    ```"""

    model_type = "mm_llama"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    media_embed_dim: int = 1024
    tokens_per_media: int = 1
    projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    projector_dropout: float = 0.0
    projector_bias: bool = True
    media_token_id: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = _imagebind_vision_config_class()(**self.vision_config)
        super().__post_init__(**kwargs)
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"Unknown projector_type {self.projector_type!r}; choose one of {PROJECTOR_TYPES}.")
        if not 0.0 <= self.projector_dropout < 1.0:
            raise ValueError(f"projector_dropout must be in [0, 1), got {self.projector_dropout}.")
        if self.tokens_per_media < 1:
            raise ValueError(f"tokens_per_media must be >= 1, got {self.tokens_per_media}.")
        if self.vision_config is not None and self.tokens_per_media != 1:
            raise ValueError("The ImageBind vision tower gives one vector per media item: use tokens_per_media=1.")
        if self.vision_config is not None and self.vision_config.projection_dim != self.media_embed_dim:
            raise ValueError(
                f"media_embed_dim ({self.media_embed_dim}) must equal the vision tower's projection_dim "
                f"({self.vision_config.projection_dim})."
            )


__all__ = ["MMLlamaConfig", "PROJECTOR_TYPES"]
