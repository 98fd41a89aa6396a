"""ImageBind's audio path (log-mel spectrogram clips -> one embedding in the joint space) as a Hugging Face model.

Computes what Meta's `imagebind_huge` computes for the audio modality:

    fbank clips [B, 1, 128, 204] --Conv2d(k=16, stride=10, no bias)--> [B, 12 x 19 = 228, D] tokens
    -> LayerNorm (the stem's, eps 1e-5) -> prepend class token, add learned position embedding
    -> L pre-norm transformer blocks (MHA with learned key/value bias tokens, exact GELU MLP, LayerNorm eps 1e-6)
       (no pre-trunk LayerNorm, unlike vision; stochastic depth 0 -> 0.1 across the blocks, training only)
    -> head: LayerNorm, token 0, Linear D -> projection_dim (no bias)
    -> postprocessor: L2 normalise, multiply by min(logit_scale, 100) = 20 (Meta: a fixed, not learned, buffer)
    -> for items of several clips [B, S, 1, 128, 204] (3 clips by default): mean over the S clip embeddings.

So, unlike the vision embedding (unit norm per view), an audio embedding has norm 20 per clip and at most 20 after
the clip mean, exactly as Meta's model returns it.

The blocks are transformers' CLIP encoder layers with two changes: the attention appends learned `bias_k`/`bias_v`
tokens to the keys/values (`nn.MultiheadAttention(add_bias_kv=True)`), and the residual branches go through drop
path. Attention dispatches to SDPA or eager through `config._attn_implementation` like the vision tower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, eager_attention_forward
from transformers.utils import ModelOutput

from .configuration_imagebind_audio import ImageBindAudioConfig
from .modeling_imagebind import ImageBindPreTrainedModel


@dataclass
class ImageBindAudioModelOutput(ModelOutput):
    """Output of [`ImageBindAudioModel`].

    Args:
        embeds: `[B, projection_dim]`. Per clip: L2-normalised then scaled by the logit scale (20); for items of S clips
            `[B, S, ...]` the mean of the S scaled clip embeddings (not renormalised, as in Meta's code).
        last_hidden_state: `[B (* S), 1 + num_patches, hidden_size]`: output of the last block, before the head norm.
        hidden_states: with `output_hidden_states=True`, a tuple of `num_hidden_layers + 1` tensors shaped like
            `last_hidden_state`: the trunk input (embeddings), then the output of each block.
    """

    embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch `[B, L, D]`, as ImageBind applies it.

    Meta's blocks run sequence-first (`[L, B, D]`) and timm's DropPath draws one keep/drop decision per index of
    dim 0, so ImageBind drops per token position (shared by the batch), not per sample. This reproduces that on
    the batch-first layout; kept branches are scaled by `1 / (1 - drop_prob)`. Identity at inference.
    """
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep = 1.0 - drop_prob
    mask = hidden_states.new_empty((1, hidden_states.shape[1], 1)).bernoulli_(keep)
    return hidden_states * mask.div_(keep)


class ImageBindAudioAttention(CLIPAttention):
    """CLIP attention plus learned key/value bias tokens (`nn.MultiheadAttention(add_bias_kv=True)`).

    After the in-projection, `bias_k` / `bias_v` (`[1, 1, D]`) are appended to every sequence's keys / values, so
    each query attends over `L + 1` keys. The official stacked in-projection is split into q/k/v by the converter.
    """

    def __init__(self, config: ImageBindAudioConfig):
        super().__init__(config)
        self.bias_k = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.bias_v = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, L, D]` -> (`[B, L, D]`, attention weights `[B, H, L, L + 1]` for eager attention, else None)."""
        if attention_mask is not None:
            raise ValueError("ImageBind audio attention takes no attention mask (every clip has the same length).")
        batch, length, _ = hidden_states.shape
        queries = self.q_proj(hidden_states)
        keys = torch.cat([self.k_proj(hidden_states), self.bias_k.expand(batch, 1, -1)], dim=1)  # [B, L + 1, D]
        values = torch.cat([self.v_proj(hidden_states), self.bias_v.expand(batch, 1, -1)], dim=1)

        queries = queries.view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, H, L, d]
        keys = keys.view(batch, length + 1, -1, self.head_dim).transpose(1, 2)  # [B, H, L + 1, d]
        values = values.view(batch, length + 1, -1, self.head_dim).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            None,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class ImageBindAudioEncoderLayer(CLIPEncoderLayer):
    """Pre-norm block of ImageBind's audio trunk: x + DropPath(attn(LN1 x)), then x + DropPath(MLP(LN2 x))."""

    def __init__(self, config: ImageBindAudioConfig, drop_path_prob: float = 0.0):
        super().__init__(config)
        self.self_attn = ImageBindAudioAttention(config)
        self.drop_path_prob = float(drop_path_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`[B, L, D]` -> `[B, L, D]`."""
        attn_output, _ = self.self_attn(
            hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = hidden_states + drop_path(attn_output, self.drop_path_prob, self.training)
        mlp_output = self.mlp(self.layer_norm2(hidden_states))
        return hidden_states + drop_path(mlp_output, self.drop_path_prob, self.training)


class ImageBindAudioEmbeddings(nn.Module):
    """Conv2d patch stem + LayerNorm + class token + learned position embedding (Meta's `AudioPreprocessor`)."""

    def __init__(self, config: ImageBindAudioConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_stride,
            bias=False,
        )
        self.patch_layernorm = nn.LayerNorm(config.hidden_size, eps=config.stem_layer_norm_eps)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.hidden_size))

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """Tokenises spectrogram clips.

        Args:
            input_features: `[B, 1, num_mel_bins, target_length]` normalised log-mel clips (exactly that size: the
                patch grid is not square, and Meta's position-embedding interpolation only handles square grids).

        Returns:
            `[B, 1 + num_patches, hidden_size]` tokens, class token first, patches in (mel, time) row-major order.
        """
        expected = (self.config.num_channels, self.config.num_mel_bins, self.config.target_length)
        if tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"ImageBind audio clips must be [B, {expected[0]}, {expected[1]}, {expected[2]}] (channels, mel bins, "
                f"frames), got shape {tuple(input_features.shape)}; use ImageBindAudioProcessor to make them."
            )
        patches = self.patch_embedding(input_features.to(self.patch_embedding.weight.dtype))  # [B, D, h, w]
        patches = self.patch_layernorm(patches.flatten(2).transpose(1, 2))  # [B, h*w, D]
        tokens = torch.cat([self.class_embedding.expand(patches.shape[0], -1, -1), patches], dim=1)
        return tokens + self.position_embedding


class ImageBindAudioPreTrainedModel(ImageBindPreTrainedModel):
    """Weight initialisation and HF plumbing of ImageBind audio models."""

    config_class = ImageBindAudioConfig
    config: ImageBindAudioConfig
    base_model_prefix = "imagebind_audio"
    main_input_name = "input_features"
    input_modalities = ("audio",)
    _no_split_modules = ["ImageBindAudioEncoderLayer", "ImageBindAudioEmbeddings"]
    _embeddings_class = ImageBindAudioEmbeddings

    def _init_weights(self, module: nn.Module) -> None:
        """The towers' shared init, plus the attention's key/value bias tokens."""
        super()._init_weights(module)
        if isinstance(module, ImageBindAudioAttention):
            # nn.MultiheadAttention initialises its key/value bias tokens with xavier_normal_.
            init.xavier_normal_(module.bias_k)
            init.xavier_normal_(module.bias_v)


class ImageBindAudioModel(ImageBindAudioPreTrainedModel):
    """ImageBind's audio encoder: spectrogram clips `[B, 1, 128, 204]` or items of S clips `[B, S, 1, 128, 204]` ->
    one embedding `[B, projection_dim]` per item (see the module docstring for the scale).

    Example:
    ```python
    >>> import torch
    >>> from mm_llama.imagebind import ImageBindAudioConfig, ImageBindAudioModel
    >>> model = ImageBindAudioModel(ImageBindAudioConfig.from_preset("tiny")).eval()
    >>> model.embed_audio(torch.randn(2, 3, 1, 128, 204)).shape
    torch.Size([2, 1024])
    ```
    """

    def __init__(self, config: ImageBindAudioConfig):
        super().__init__(config)
        self.embeddings = ImageBindAudioEmbeddings(config)
        layers = config.num_hidden_layers
        # Meta's "progressive" schedule: torch.linspace(0, drop_path_rate, num_blocks).
        rates = [config.drop_path_rate * i / (layers - 1) if layers > 1 else 0.0 for i in range(layers)]
        self.layers = nn.ModuleList([ImageBindAudioEncoderLayer(config, rate) for rate in rates])
        self.head_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.audio_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The Conv2d patch stem (HF convention: the module that turns inputs into the first hidden states)."""
        return self.embeddings.patch_embedding

    @property
    def logit_scale(self) -> float:
        """The factor applied to the normalised embedding: `min(logit_scale, max_logit_scale)` (20 for ImageBind)."""
        return min(self.config.logit_scale, self.config.max_logit_scale)

    def forward(
        self,
        input_features: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageBindAudioModelOutput | tuple:
        """Embeds spectrogram clips or multi-clip items.

        Args:
            input_features: `[B, 1, num_mel_bins, target_length]` clips, or `[B, S, 1, num_mel_bins, target_length]`
                items with S clips each (`ImageBindAudioProcessor` output: S = 3).
            output_hidden_states: also return every block's output.
            return_dict: return an [`ImageBindAudioModelOutput`] (default) rather than a tuple.

        Returns:
            `embeds` `[B, projection_dim]`, `last_hidden_state` `[B (* S), 1 + num_patches, hidden_size]` and
            optionally `hidden_states`.
        """
        num_clips = None
        if input_features.ndim == 5:  # Meta: inputs of 5 dims and more are [B, S, ...] with S clips
            num_clips = input_features.shape[1]
            input_features = input_features.flatten(0, 1)
        if input_features.ndim != 4:
            raise ValueError(
                "input_features must be clips [B, 1, mel, frames] or items of clips [B, S, 1, mel, frames]; got shape "
                f"{tuple(input_features.shape)}."
            )

        hidden = self.embeddings(input_features)  # [B*, 1 + N, D]; no pre-trunk LayerNorm for audio
        return self._encode(hidden, self.audio_projection, num_clips, self.logit_scale, output_hidden_states,
                            return_dict, ImageBindAudioModelOutput)

    def embed_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """`[B, S, 1, 128, 204]` clips (`ImageBindAudioProcessor(audio=...)`) -> mean clip embedding `[B, P]`.

        Gradients are tracked as in `forward`; wrap the call in `torch.no_grad()` for a frozen tower.
        """
        if input_features.ndim != 5:
            raise ValueError(
                f"embed_audio expects [B, clips, 1, mel, frames], got shape {tuple(input_features.shape)}."
            )
        return self(input_features, return_dict=True).embeds

    def embed_media(self, input_features: torch.Tensor) -> torch.Tensor:
        """The entry point MM-LLaMA uses for audio (as `ImageBindVisionModel.embed_media` for images and videos):
        `embed_audio` divided by the fixed logit scale, i.e. the mean of unit-norm clip embeddings `[B, P]`.

        Meta's audio head multiplies each normalised clip embedding by 20, its vision head does not; the projector is
        trained on vision embeddings (means of unit vectors), so audio reaches it on that same scale.
        """
        return self.embed_audio(input_features) / self.logit_scale


__all__ = [
    "ImageBindAudioModel",
    "ImageBindAudioModelOutput",
    "ImageBindAudioPreTrainedModel",
]
