"""Configuration of ImageBind's vision path (Meta's ImageBind, the "huge" model by default)."""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Architecture presets. "huge" is Meta's imagebind_huge; the small ones exist for tests and the demo.
IMAGEBIND_VISION_PRESETS: dict[str, dict] = {
    "huge": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                 projection_dim=1024),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=1024),
}


@strict
class ImageBindVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`ImageBindVisionModel`]: a ViT with a Conv3d patch stem over 2-frame clips, a class-token head
    projected to `projection_dim` and L2-normalised. Defaults are ImageBind-huge's.

    Example:
    ```python
    >>> from mm_llama.imagebind import ImageBindVisionConfig
    >>> config = ImageBindVisionConfig.from_preset("tiny", image_size=32)
    ```"""

    model_type = "imagebind_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 1280
    intermediate_size: int = 5120
    projection_dim: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    # Conv3d kernel/stride along time; an image is repeated to `num_frames` frames before the stem.
    temporal_patch_size: int = 2
    num_frames: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (without the class token) for a `num_frames` x `image_size`^2 clip: 256 for huge."""
        grid = self.image_size // self.patch_size
        return (self.num_frames // self.temporal_patch_size) * grid * grid

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageBindVisionConfig":
        """Builds a config from a named preset ("huge", "tiny"), with keyword overrides.

        Unknown override names are refused (a typo such as `hiden_size` would otherwise be stored silently as an
        extra attribute and the preset value used instead).
        """
        if name not in IMAGEBIND_VISION_PRESETS:
            raise ValueError(f"Unknown ImageBind preset {name!r}; choose one of {sorted(IMAGEBIND_VISION_PRESETS)}.")
        known = {field.name for field in dataclasses.fields(cls)} | {"attn_implementation"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown ImageBindVisionConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**{**IMAGEBIND_VISION_PRESETS[name], **overrides})

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})."
            )
        if self.num_frames % self.temporal_patch_size != 0:
            raise ValueError(
                f"num_frames ({self.num_frames}) must be a multiple of temporal_patch_size "
                f"({self.temporal_patch_size})."
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size}).")


__all__ = ["ImageBindVisionConfig", "IMAGEBIND_VISION_PRESETS"]
