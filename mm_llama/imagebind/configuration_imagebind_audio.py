"""Configuration of ImageBind's audio path (Meta's ImageBind, the audio tower of `imagebind_huge` by default)."""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Architecture presets. "huge" is imagebind_huge's audio tower (Meta: audio_embed_dim=768, audio_num_blocks=12,
# audio_num_heads=12, out_embed_dim=1024, audio_drop_path=0.1); "tiny" exists for tests and the demo.
IMAGEBIND_AUDIO_PRESETS: dict[str, dict] = {
    "huge": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=1024, drop_path_rate=0.1),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=1024, drop_path_rate=0.1),
}


@strict
class ImageBindAudioConfig(PreTrainedConfig):
    r"""
    Configuration of [`ImageBindAudioModel`]: a ViT over log-mel spectrograms (`[1, num_mel_bins, target_length]`
    "images") with a Conv2d patch stem (kernel `patch_size`, stride `patch_stride`) followed by a LayerNorm, a class
    token, learned position embeddings, transformer blocks whose attention has learned key/value bias tokens
    (`nn.MultiheadAttention(add_bias_kv=True)`), a class-token head projected to `projection_dim`, L2 normalisation and
    a fixed logit scale (20 for ImageBind's audio). Defaults are ImageBind-huge's.

    Example:
    ```python
    >>> from mm_llama.imagebind import ImageBindAudioConfig
    >>> config = ImageBindAudioConfig.from_preset("tiny", projection_dim=32)
    >>> config.num_patches  # a 12 x 19 grid of 16x16 patches, stride 10, over 128 mel bins x 204 frames
    228
    ```"""

    model_type = "imagebind_audio_model"
    base_config_key = "audio_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 1
    num_mel_bins: int = 128
    target_length: int = 204
    patch_size: int = 16
    patch_stride: int = 10
    hidden_act: str = "gelu"
    # Trunk blocks and head use eps 1e-6 (Meta's _LAYER_NORM / head LayerNorm); the stem's LayerNorm is a plain
    # nn.LayerNorm(embed_dim), eps 1e-5.
    layer_norm_eps: float = 1e-6
    stem_layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    # Stochastic depth, training only: block i drops its residual branches with p = i / (L - 1) * drop_path_rate
    # (Meta's "progressive" schedule). Inference never drops.
    drop_path_rate: float = 0.1
    # Meta's LearnableLogitScaling(logit_scale_init=20.0, learnable=False, max_logit_scale=100): the normalised
    # embedding is multiplied by min(logit_scale, max_logit_scale). Not learned, so it is a setting here rather than a
    # weight (a float survives bf16 casts exactly); the converter checks it against the checkpoint's log_logit_scale.
    logit_scale: float = 20.0
    max_logit_scale: float = 100.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(mel, time) size of the patch grid: (12, 19) for 128 x 204 inputs with 16x16 patches at stride 10."""
        rows = (self.num_mel_bins - self.patch_size) // self.patch_stride + 1
        cols = (self.target_length - self.patch_size) // self.patch_stride + 1
        return rows, cols

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (without the class token): 228 for ImageBind-huge."""
        rows, cols = self.patch_grid
        return rows * cols

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageBindAudioConfig":
        """Builds a config from a named preset ("huge", "tiny"), with keyword overrides (unknown names are refused)."""
        if name not in IMAGEBIND_AUDIO_PRESETS:
            raise ValueError(
                f"Unknown ImageBind audio preset {name!r}; choose one of {sorted(IMAGEBIND_AUDIO_PRESETS)}."
            )
        known = {field.name for field in dataclasses.fields(cls)} | {"attn_implementation"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown ImageBindAudioConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**{**IMAGEBIND_AUDIO_PRESETS[name], **overrides})

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if min(self.num_mel_bins, self.target_length) < self.patch_size:
            raise ValueError(
                f"The spectrogram ({self.num_mel_bins} x {self.target_length}) must be at least patch_size "
                f"({self.patch_size}) along both axes."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}.")


__all__ = ["IMAGEBIND_AUDIO_PRESETS", "ImageBindAudioConfig"]
