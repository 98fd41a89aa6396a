"""ImageBind's vision path (images and short videos -> one L2-normalised embedding) as a Hugging Face model.

Computes what Meta's `imagebind_huge` computes for the vision modality:

    pixels [B, 3, T=2, S, S] --Conv3d (2, p, p), no bias--> [B, N, D] tokens
    -> prepend class token, add learned position embedding -> LayerNorm (pre-trunk)
    -> L pre-norm transformer blocks (standard MHA, exact GELU MLP), LayerNorm eps 1e-6 everywhere
    -> head: LayerNorm, token 0, Linear D -> projection_dim (no bias) -> L2 normalise
    -> for several views per item (a video's 15 clips x crops): mean of the normalised view embeddings.

The trunk blocks are transformers' CLIP encoder layers: with `hidden_act="gelu"` and `layer_norm_eps=1e-6` they
compute exactly ImageBind's blocks (the official stacked q/k/v in-projection is split into q_proj/k_proj/v_proj by
`convert_imagebind_state_dict`), and they dispatch to SDPA or eager attention through `config._attn_implementation`.
Only the Conv3d patch stem and the view averaging are ImageBind's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.utils import ModelOutput

from .configuration_imagebind import ImageBindVisionConfig

# `media_type_ids` values, as MMLlamaProcessor writes them.
IMAGE_TYPE_ID, VIDEO_TYPE_ID = 0, 1


@dataclass
class ImageBindVisionModelOutput(ModelOutput):
    """Output of [`ImageBindVisionModel`].

    Args:
        embeds: `[B, projection_dim]`. L2-normalised embedding per item; for multi-view input `[B, V, ...]` the mean of
            the V normalised view embeddings (not renormalised, as in Meta's code).
        last_hidden_state: `[B, 1 + num_patches, hidden_size]` (`[B * V, ...]` for multi-view input): output of the last
            transformer block, before the head LayerNorm.
        hidden_states: with `output_hidden_states=True`, a tuple of `num_hidden_layers + 1` tensors shaped like
            `last_hidden_state`: the trunk input (after the pre-trunk LayerNorm), then the output of each block.
    """

    embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class ImageBindVisionEmbeddings(nn.Module):
    """Conv3d patch stem + class token + learned position embedding (ImageBind's `RGBDTPreprocessor` for vision)."""

    def __init__(self, config: ImageBindVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.num_frames = config.num_frames
        self.grid_size = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv3d(
            config.num_channels,
            config.hidden_size,
            kernel_size=(config.temporal_patch_size, config.patch_size, config.patch_size),
            stride=(config.temporal_patch_size, config.patch_size, config.patch_size),
            bias=False,
        )
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.hidden_size))

    def _position_embedding_for(self, num_patch_tokens: int) -> torch.Tensor:
        """Position embedding `[1, 1 + num_patch_tokens, D]`, bicubically resized when the input grid differs.

        Mirrors Meta's `interpolate_pos_encoding_2d`: the class position is kept and the square patch grid is resized
        with `scale_factor = sqrt(new / old)` (not a target size: the two give slightly different sampling positions).
        """
        pos = self.position_embedding
        old = pos.shape[1] - 1
        if num_patch_tokens == old:
            return pos
        if self.config.num_frames // self.config.temporal_patch_size != 1:
            raise ValueError(
                "Position-embedding interpolation is only defined for a single temporal patch "
                f"(num_frames / temporal_patch_size = 1); got config num_frames={self.config.num_frames}."
            )
        old_grid, dim = int(math.isqrt(old)), pos.shape[-1]
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        # bicubic interpolation is not implemented for bf16 on every backend; Meta also casts to fp32 here.
        grid = patch_pos.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=math.sqrt(num_patch_tokens / old), mode="bicubic")
        if grid.shape[-1] * grid.shape[-2] != num_patch_tokens:
            raise ValueError(f"Cannot resize a {old_grid}x{old_grid} position grid to {num_patch_tokens} patches.")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, num_patch_tokens, dim).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokenises clips.

        Args:
            pixel_values: `[B, C, T, H, W]` normalised clips with `T == config.num_frames` and square `H == W`
                (any multiple of the patch size; the position grid is resized when `H != config.image_size`).

        Returns:
            `[B, 1 + (T / t) * (H / p) * (W / p), hidden_size]` tokens, class token first, patches in (t, h, w)
            row-major order.
        """
        batch, _, frames, height, width = pixel_values.shape
        if frames != self.num_frames:
            raise ValueError(
                f"ImageBind expects clips of {self.num_frames} frames (images are repeated to that), got {frames}."
            )
        if height != width:
            raise ValueError(f"ImageBind expects square frames (crop them first), got {height}x{width}.")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, t, h, w]
        patches = patches.flatten(2).transpose(1, 2)  # [B, t*h*w, D]
        tokens = torch.cat([self.class_embedding.expand(batch, -1, -1), patches], dim=1)
        return tokens + self._position_embedding_for(patches.shape[1])


class ImageBindPreTrainedModel(PreTrainedModel):
    """What the vision and audio towers share: HF plumbing, the init of their token embeddings (`_embeddings_class`,
    with a class token and a learned position table) and the trunk + head run of their forwards (`_encode`)."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _embeddings_class: type[nn.Module]

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for training from scratch and for tests; real weights come from the converted checkpoint."""
        super()._init_weights(module)
        std = self.config.initializer_range * self.config.initializer_factor
        if isinstance(module, self._embeddings_class):
            init.normal_(module.class_embedding, std=std)
            init.normal_(module.position_embedding, std=std)

    def _encode(self, hidden: torch.Tensor, projection: nn.Module, num_items: int | None, scale: float,
                output_hidden_states: bool | None, return_dict: bool | None, output_class: type[ModelOutput]):
        """The blocks and the modality head (`imagebind_head`) on embedded tokens `[B (* S), 1 + N, D]`, returned as
        `output_class` (embeds, last_hidden_state, hidden_states) or, with `return_dict=False`, a tuple."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, None)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
        embeds = imagebind_head(hidden, self.head_layernorm, projection, num_items, scale)
        if not return_dict:
            return tuple(v for v in (embeds, hidden, all_hidden) if v is not None)
        return output_class(embeds=embeds, last_hidden_state=hidden, hidden_states=all_hidden)


class ImageBindVisionPreTrainedModel(ImageBindPreTrainedModel):
    """Weight initialisation and HF plumbing of ImageBind vision models."""

    config_class = ImageBindVisionConfig
    config: ImageBindVisionConfig
    base_model_prefix = "imagebind_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    _no_split_modules = ["CLIPEncoderLayer", "ImageBindVisionEmbeddings"]
    _embeddings_class = ImageBindVisionEmbeddings


def imagebind_head(hidden: torch.Tensor, layernorm: nn.Module, projection: nn.Module, num_views: int | None,
                   scale: float = 1.0) -> torch.Tensor:
    """Meta's modality head and postprocessor, shared by the vision and audio towers: layer norm of the class token,
    projection, L2 normalisation times `scale` (1 for vision, the fixed logit scale for audio), then the mean over an
    item's `num_views` views or clips (not renormalised, as Meta's).

    Args:
        hidden: `[B * num_views, tokens, hidden]` last hidden states (class token first).
    Returns:
        `[B, projection_dim]`
    """
    # LayerNorm is per token, so normalising token 0 alone equals Meta's "LN over all tokens, then select 0".
    embeds = F.normalize(projection(layernorm(hidden[:, 0])), dim=-1) * scale  # [B*, P]
    if num_views is not None:
        # Average in fp32 so that bf16 models do not lose the mean's precision.
        embeds = embeds.float().unflatten(0, (-1, num_views)).mean(dim=1).to(embeds.dtype)
    return embeds


class ImageBindVisionModel(ImageBindVisionPreTrainedModel):
    """ImageBind's vision encoder: images `[B,3,H,W]`, clips `[B,3,T,H,W]` or multi-view items `[B,V,3,T,H,W]` ->
    one embedding `[B, projection_dim]` per item (L2-normalised for images and clips).

    Example:
    ```python
    >>> import torch
    >>> from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel
    >>> model = ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=28)).eval()
    >>> model(torch.randn(2, 3, 28, 28)).embeds.shape
    torch.Size([2, 1024])
    ```
    """

    def __init__(self, config: ImageBindVisionConfig):
        super().__init__(config)
        self.embeddings = ImageBindVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.head_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The Conv3d patch stem (HF convention: the module that turns inputs into the first hidden states)."""
        return self.embeddings.patch_embedding

    def _as_clips(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Brings any accepted input to clips `[B*, C, T, H, W]`; returns them and V (None when not multi-view)."""
        if pixel_values.ndim == 4:  # images [B, C, H, W] -> [B, C, 1, H, W], repeated to T below
            pixel_values = pixel_values.unsqueeze(2)
        num_views = None
        if pixel_values.ndim == 6:  # [B, V, C, T, H, W] -> [B*V, C, T, H, W]
            num_views = pixel_values.shape[1]
            pixel_values = pixel_values.flatten(0, 1)
        if pixel_values.ndim != 5:
            raise ValueError(
                "pixel_values must be images [B,3,H,W], clips [B,3,T,H,W] or multi-view items [B,V,3,T,H,W]; "
                f"got shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"Expected {self.config.num_channels} channels at dim {1 if num_views is None else 2}, got shape "
                f"{tuple(pixel_values.shape)} (video views must be laid out [B, V, C, T, H, W])."
            )
        if pixel_values.shape[2] == 1:
            # Meta's PadIm2Video(pad_type="repeat"): a single frame is repeated to the clip length.
            pixel_values = pixel_values.expand(-1, -1, self.config.num_frames, -1, -1)
        return pixel_values, num_views

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageBindVisionModelOutput | tuple:
        """Embeds images, clips or multi-view items.

        Args:
            pixel_values: `[B, 3, H, W]` normalised images, `[B, 3, T, H, W]` clips (T = 1 or `config.num_frames`), or
                `[B, V, 3, T, H, W]` items with V views each (a video: 5 clips x 3 crops = 15 views, clip-major).
            output_hidden_states: also return every block's output.
            return_dict: return an [`ImageBindVisionModelOutput`] (default) rather than a tuple.

        Returns:
            `embeds` `[B, projection_dim]`, `last_hidden_state` `[B (* V), 1 + num_patches, hidden_size]` and optionally
            `hidden_states`.
        """
        clips, num_views = self._as_clips(pixel_values)
        hidden = self.pre_layernorm(self.embeddings(clips))  # [B*, 1 + N, D]
        return self._encode(hidden, self.visual_projection, num_views, 1.0, output_hidden_states, return_dict,
                            ImageBindVisionModelOutput)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` normalised images (`ImageBindProcessor(images=...)`) -> unit-norm `[B, projection_dim]`.

        Gradients are tracked as in `forward`; wrap the call in `torch.no_grad()` for a frozen tower.
        """
        if pixel_values.ndim != 4:
            raise ValueError(f"embed_images expects [B, 3, H, W], got shape {tuple(pixel_values.shape)}.")
        return self(pixel_values, return_dict=True).embeds

    def embed_media(
        self,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        media_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The one embedding entry point (dataset building, chat, the MM-LLaMA model's pixel path): images and/or
        videos as `ImageBindProcessor` returns them -> embeddings `[num_media, projection_dim]` in media order.

        Args:
            pixel_values: `[num_images, 3, S, S]` images.
            video_pixel_values: `[num_videos, V, 3, T, S, S]` videos.
            media_type_ids: `[num_images + num_videos]` with IMAGE_TYPE_ID (0) / VIDEO_TYPE_ID (1) in media order;
                needed only when both kinds are given (otherwise the order is the given one).
        """
        image_embeds = self.embed_images(pixel_values) if pixel_values is not None else None
        video_embeds = self.embed_videos(video_pixel_values) if video_pixel_values is not None else None
        if image_embeds is None or video_embeds is None:
            if image_embeds is None and video_embeds is None:
                raise ValueError("embed_media needs pixel_values, video_pixel_values or both.")
            return image_embeds if video_embeds is None else video_embeds
        if media_type_ids is None:
            raise ValueError("Both images and videos were given: pass media_type_ids to say their order.")
        media_type_ids = media_type_ids.to(image_embeds.device)
        counts = (int((media_type_ids == IMAGE_TYPE_ID).sum()), int((media_type_ids == VIDEO_TYPE_ID).sum()))
        if counts != (len(image_embeds), len(video_embeds)):
            raise ValueError(
                f"media_type_ids lists {counts[0]} images and {counts[1]} videos, but {len(image_embeds)} images and "
                f"{len(video_embeds)} videos were given."
            )
        embeds = image_embeds.new_empty(len(media_type_ids), image_embeds.shape[-1])
        embeds[media_type_ids == IMAGE_TYPE_ID] = image_embeds
        embeds[media_type_ids == VIDEO_TYPE_ID] = video_embeds.to(image_embeds.dtype)
        return embeds

    def embed_videos(self, video_pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, V, 3, T, S, S]` video views (`ImageBindProcessor(videos=...)`) -> mean view embedding `[B, P]`."""
        if video_pixel_values.ndim != 6:
            raise ValueError(f"embed_videos expects [B, V, 3, T, H, W], got shape {tuple(video_pixel_values.shape)}.")
        return self(video_pixel_values, return_dict=True).embeds


__all__ = ["IMAGE_TYPE_ID", "VIDEO_TYPE_ID", "imagebind_head", "ImageBindPreTrainedModel", "ImageBindVisionModel",
           "ImageBindVisionModelOutput", "ImageBindVisionPreTrainedModel"]
