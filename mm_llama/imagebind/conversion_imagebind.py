"""Meta's flat `imagebind_huge.pth` state dict (all modalities) -> [`ImageBindVisionModel`] weights.

Key mapping (official -> HF), `i` over blocks:

    modality_preprocessors.vision.cls_token                     -> embeddings.class_embedding         [1, 1, D]
    modality_preprocessors.vision.rgbt_stem.proj.1.weight       -> embeddings.patch_embedding.weight  [D, 3, 2, p, p]
    modality_preprocessors.vision.pos_embedding_helper.pos_embed -> embeddings.position_embedding     [1, 1 + N, D]
    modality_trunks.vision.pre_transformer_layer.0.{weight,bias} -> pre_layernorm.*
    modality_trunks.vision.blocks.i.attn.in_proj_{weight,bias}  -> layers.i.self_attn.{q,k,v}_proj.*  (split in 3)
    modality_trunks.vision.blocks.i.attn.out_proj.*              -> layers.i.self_attn.out_proj.*
    modality_trunks.vision.blocks.i.norm_1.* / norm_2.*          -> layers.i.layer_norm1.* / layer_norm2.*
    modality_trunks.vision.blocks.i.mlp.fc1.* / fc2.*            -> layers.i.mlp.fc1.* / fc2.*
    modality_heads.vision.0.{weight,bias}                        -> head_layernorm.*
    modality_heads.vision.2.weight                               -> visual_projection.weight          [P, D]

Keys of other modalities (text, audio, depth, thermal, imu) are ignored; every vision key must be accounted for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .configuration_imagebind import IMAGEBIND_VISION_PRESETS, ImageBindVisionConfig
from .modeling_imagebind import ImageBindVisionModel

VISION_PREFIXES = (
    "modality_preprocessors.vision.",
    "modality_trunks.vision.",
    "modality_heads.vision.",
    "modality_postprocessors.vision.",
)
_PRE = "modality_preprocessors.vision."
_TRUNK = "modality_trunks.vision."
_HEAD = "modality_heads.vision."


def official_vision_shapes(config: ImageBindVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision key of the official checkpoint with its expected shape, for `config` (392 keys for huge)."""
    d, m, p = config.hidden_size, config.intermediate_size, config.projection_dim
    shapes: dict[str, tuple[int, ...]] = {
        _PRE + "cls_token": (1, 1, d),
        _PRE + "rgbt_stem.proj.1.weight": (
            d,
            config.num_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size,
        ),
        _PRE + "pos_embedding_helper.pos_embed": (1, 1 + config.num_patches, d),
        _TRUNK + "pre_transformer_layer.0.weight": (d,),
        _TRUNK + "pre_transformer_layer.0.bias": (d,),
        _HEAD + "0.weight": (d,),
        _HEAD + "0.bias": (d,),
        _HEAD + "2.weight": (p, d),
    }
    for i in range(config.num_hidden_layers):
        block = f"{_TRUNK}blocks.{i}."
        shapes.update(
            {
                block + "attn.in_proj_weight": (3 * d, d),
                block + "attn.in_proj_bias": (3 * d,),
                block + "attn.out_proj.weight": (d, d),
                block + "attn.out_proj.bias": (d,),
                block + "norm_1.weight": (d,),
                block + "norm_1.bias": (d,),
                block + "norm_2.weight": (d,),
                block + "norm_2.bias": (d,),
                block + "mlp.fc1.weight": (m, d),
                block + "mlp.fc1.bias": (m,),
                block + "mlp.fc2.weight": (d, m),
                block + "mlp.fc2.bias": (d,),
            }
        )
    return shapes


def infer_vision_config(state_dict: dict[str, torch.Tensor]) -> ImageBindVisionConfig:
    """The preset whose shapes the checkpoint's vision keys have (the head count is not stored in the weights).

    Raises:
        ValueError: no preset matches; pass an explicit `ImageBindVisionConfig`.
    """
    for name in IMAGEBIND_VISION_PRESETS:
        config = ImageBindVisionConfig.from_preset(name)
        expected = official_vision_shapes(config)
        if all(k in state_dict and tuple(state_dict[k].shape) == s for k, s in expected.items()):
            return config
    cls_token = state_dict.get(_PRE + "cls_token")
    width = None if cls_token is None else tuple(cls_token.shape)
    raise ValueError(
        f"The checkpoint's vision weights (cls_token shape {width}) match no preset in "
        f"{sorted(IMAGEBIND_VISION_PRESETS)}; pass config=ImageBindVisionConfig(...) describing them."
    )


def _hf_key(official: str) -> list[str]:
    """HF key(s) of one official vision key (in_proj keys map to three)."""
    renames = {
        _PRE + "cls_token": "embeddings.class_embedding",
        _PRE + "rgbt_stem.proj.1.weight": "embeddings.patch_embedding.weight",
        _PRE + "pos_embedding_helper.pos_embed": "embeddings.position_embedding",
        _TRUNK + "pre_transformer_layer.0.weight": "pre_layernorm.weight",
        _TRUNK + "pre_transformer_layer.0.bias": "pre_layernorm.bias",
        _HEAD + "0.weight": "head_layernorm.weight",
        _HEAD + "0.bias": "head_layernorm.bias",
        _HEAD + "2.weight": "visual_projection.weight",
    }
    if official in renames:
        return [renames[official]]
    index, rest = official[len(_TRUNK + "blocks.") :].split(".", 1)
    layer = f"layers.{index}."
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_") :]  # "weight" or "bias"
        return [f"{layer}self_attn.{q}_proj.{kind}" for q in ("q", "k", "v")]
    block_renames = {"attn.out_proj.": "self_attn.out_proj.", "norm_1.": "layer_norm1.", "norm_2.": "layer_norm2."}
    for old, new in block_renames.items():
        if rest.startswith(old):
            return [layer + new + rest[len(old) :]]
    return [layer + rest]  # mlp.fc1.* / mlp.fc2.* keep their names


def convert_imagebind_state_dict(
    state_dict: dict[str, torch.Tensor], config: ImageBindVisionConfig | None = None
) -> dict[str, torch.Tensor]:
    """Official flat ImageBind state dict -> [`ImageBindVisionModel`] state dict (vision weights only).

    Args:
        state_dict: the flat dict `torch.load("imagebind_huge.pth", weights_only=True)` returns (all modalities).
        config: the architecture; inferred from the shapes when it matches a preset ("huge", "tiny").

    Returns:
        HF keys -> tensors (q/k/v are contiguous copies of the stacked in-projection's thirds, other tensors are
        shared with the input).

    Raises:
        ValueError: listing missing vision keys, unexpected vision keys and keys whose shape is wrong.
    """
    if not any(key.startswith(VISION_PREFIXES) for key in state_dict):
        raise ValueError(
            "The state dict has no ImageBind vision keys (modality_*.vision.*); is this Meta's imagebind_huge.pth? "
            f"First keys: {list(state_dict)[:5]}"
        )
    config = config if config is not None else infer_vision_config(state_dict)
    expected = official_vision_shapes(config)
    vision_keys = {key for key in state_dict if key.startswith(VISION_PREFIXES)}
    missing = sorted(set(expected) - vision_keys)
    unexpected = sorted(vision_keys - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    )
    if missing or unexpected or misshaped:
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                problems.append(f"{len(items)} {title} vision key(s):\n  " + "\n  ".join(items))
        raise ValueError(
            "The ImageBind checkpoint does not match the vision config "
            f"(hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
            f"image_size={config.image_size}, projection_dim={config.projection_dim}):\n" + "\n".join(problems)
        )

    converted: dict[str, torch.Tensor] = {}
    for key in expected:
        targets = _hf_key(key)
        tensor = state_dict[key]
        if len(targets) == 3:
            # nn.MultiheadAttention stacks q, k, v (in that order) along dim 0.
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                converted[target] = part.contiguous().clone()
        else:
            converted[targets[0]] = tensor
    return converted


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` of a checkpoint file with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageBind checkpoint {str(path)!r} not found; download it with "
            "`mm-llama download-imagebind --output imagebind_huge.pth`."
        )
    try:
        # mmap keeps the 4.5 GB all-modality file out of RAM; only vision tensors get touched.
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({err}); a partial download can be resumed with "
            "mm-llama download-imagebind."
        ) from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state_dict).__name__}, not a flat state dict.")
    return state_dict


def load_imagebind_checkpoint(
    path: str | os.PathLike,
    config: ImageBindVisionConfig | None = None,
    dtype: torch.dtype | None = None,
) -> ImageBindVisionModel:
    """Builds an [`ImageBindVisionModel`] (eval mode) from Meta's `.pth` file.

    Args:
        path: `imagebind_huge.pth` (or a file in the same flat layout).
        config: architecture; inferred from the weight shapes when it matches a preset.
        dtype: cast the weights to this dtype (default: keep the checkpoint's, float32 for Meta's).
    """
    official = _read_state_dict(path)
    config = config if config is not None else infer_vision_config(official)
    state_dict = convert_imagebind_state_dict(official, config)
    # Build without allocating random weights (the huge model is 2.5 GB), then take the checkpoint's tensors.
    with torch.device("meta"):
        model = ImageBindVisionModel(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def convert_imagebind_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: ImageBindVisionConfig | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """`imagebind_huge.pth` -> a `save_pretrained` folder (config.json, model.safetensors, preprocessor_config.json).

    Returns:
        The output folder, loadable with `ImageBindVisionModel.from_pretrained` and
        `ImageBindProcessor.from_pretrained`.
    """
    from .processing_imagebind import ImageBindProcessor

    model = load_imagebind_checkpoint(checkpoint_path, config=config, dtype=dtype)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    ImageBindProcessor(image_size=model.config.image_size).save_pretrained(output_dir)
    return output_dir


__all__ = [
    "VISION_PREFIXES",
    "convert_imagebind_checkpoint",
    "convert_imagebind_state_dict",
    "infer_vision_config",
    "load_imagebind_checkpoint",
    "official_vision_shapes",
]
