"""Meta's flat `imagebind_huge.pth` state dict (all modalities) -> [`ImageBindVisionModel`] and
[`ImageBindAudioModel`] weights.

Vision key mapping (official -> HF), `i` over blocks:

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

Audio key mapping (official -> HF):

    modality_preprocessors.audio.cls_token                      -> embeddings.class_embedding         [1, 1, D]
    modality_preprocessors.audio.rgbt_stem.proj.weight          -> embeddings.patch_embedding.weight  [D, 1, 16, 16]
    modality_preprocessors.audio.rgbt_stem.norm_layer.*         -> embeddings.patch_layernorm.*
    modality_preprocessors.audio.pos_embedding_helper.pos_embed -> embeddings.position_embedding      [1, 229, D]
    modality_trunks.audio.blocks.i.attn.bias_k / bias_v         -> layers.i.self_attn.bias_k / bias_v  [1, 1, D]
    modality_trunks.audio.blocks.i.(other block keys)           -> as for vision (in_proj split in q/k/v)
    modality_heads.audio.0.{weight,bias}                        -> head_layernorm.*
    modality_heads.audio.2.weight                               -> audio_projection.weight            [P, D]
    modality_postprocessors.audio.1.log_logit_scale             -> config.logit_scale = exp(value)   [] (log 20)

The audio trunk has no pre-transformer LayerNorm (Meta: pre_transformer_ln=False), so it has no such keys.
Keys of modalities not being converted are ignored; every key of a converted modality must be accounted for.

Over 400 lines because both towers' key mappings read one flat checkpoint and share its checks and entry point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .configuration_imagebind import IMAGEBIND_VISION_PRESETS, ImageBindVisionConfig
from .configuration_imagebind_audio import IMAGEBIND_AUDIO_PRESETS, ImageBindAudioConfig
from .modeling_imagebind import ImageBindVisionModel
from .modeling_imagebind_audio import ImageBindAudioModel

VISION_PREFIXES = (
    "modality_preprocessors.vision.",
    "modality_trunks.vision.",
    "modality_heads.vision.",
    "modality_postprocessors.vision.",
)
_PRE = "modality_preprocessors.vision."
_TRUNK = "modality_trunks.vision."
_HEAD = "modality_heads.vision."
AUDIO_PREFIXES = (
    "modality_preprocessors.audio.",
    "modality_trunks.audio.",
    "modality_heads.audio.",
    "modality_postprocessors.audio.",
)
_APRE = "modality_preprocessors.audio."
_ATRUNK = "modality_trunks.audio."
_AHEAD = "modality_heads.audio."
_APOST = "modality_postprocessors.audio."
MODALITIES = ("vision", "audio", "all")


def _block_shapes(block: str, d: int, m: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one official transformer block (vision and audio share them; audio adds bias_k/bias_v)."""
    return {
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
        shapes.update(_block_shapes(f"{_TRUNK}blocks.{i}.", d, m))
    return shapes


def official_audio_shapes(config: ImageBindAudioConfig) -> dict[str, tuple[int, ...]]:
    """Every audio key of the official checkpoint with its expected shape, for `config` (177 keys for huge)."""
    d, m, p = config.hidden_size, config.intermediate_size, config.projection_dim
    shapes: dict[str, tuple[int, ...]] = {
        _APRE + "cls_token": (1, 1, d),
        _APRE + "rgbt_stem.proj.weight": (d, config.num_channels, config.patch_size, config.patch_size),
        _APRE + "rgbt_stem.norm_layer.weight": (d,),
        _APRE + "rgbt_stem.norm_layer.bias": (d,),
        _APRE + "pos_embedding_helper.pos_embed": (1, 1 + config.num_patches, d),
        _AHEAD + "0.weight": (d,),
        _AHEAD + "0.bias": (d,),
        _AHEAD + "2.weight": (p, d),
        _APOST + "1.log_logit_scale": (),
    }
    for i in range(config.num_hidden_layers):
        block = f"{_ATRUNK}blocks.{i}."
        shapes.update(_block_shapes(block, d, m))
        shapes.update({block + "attn.bias_k": (1, 1, d), block + "attn.bias_v": (1, 1, d)})
    return shapes


def _preset_matching(state_dict: dict[str, torch.Tensor], modality: str, presets: dict, config_class: type,
                     official_shapes: Callable, prefix: str) -> str:
    """The name of the preset whose `official_shapes` the checkpoint's keys have (the head count is not stored in
    the weights); ValueError naming the config class to pass when none does."""
    for name in presets:
        expected = official_shapes(config_class.from_preset(name))
        if all(k in state_dict and tuple(state_dict[k].shape) == s for k, s in expected.items()):
            return name
    cls_token = state_dict.get(prefix + "cls_token")
    width = None if cls_token is None else tuple(cls_token.shape)
    raise ValueError(
        f"The checkpoint's {modality} weights (cls_token shape {width}) match no preset in "
        f"{sorted(presets)}; pass config={config_class.__name__}(...) describing them."
    )


def infer_vision_config(state_dict: dict[str, torch.Tensor]) -> ImageBindVisionConfig:
    """The vision preset whose shapes the checkpoint's vision keys have.

    Raises:
        ValueError: no preset matches; pass an explicit `ImageBindVisionConfig`.
    """
    name = _preset_matching(state_dict, "vision", IMAGEBIND_VISION_PRESETS, ImageBindVisionConfig,
                            official_vision_shapes, _PRE)
    return ImageBindVisionConfig.from_preset(name)


def _checkpoint_logit_scale(state_dict: dict[str, torch.Tensor]) -> float:
    """exp of the checkpoint's fixed audio log-logit-scale (20 for imagebind_huge)."""
    return float(state_dict[_APOST + "1.log_logit_scale"].double().exp())


def infer_audio_config(state_dict: dict[str, torch.Tensor]) -> ImageBindAudioConfig:
    """The audio preset whose shapes the checkpoint's audio keys have, with the checkpoint's logit scale.

    Raises:
        ValueError: no preset matches; pass an explicit `ImageBindAudioConfig`.
    """
    name = _preset_matching(state_dict, "audio", IMAGEBIND_AUDIO_PRESETS, ImageBindAudioConfig,
                            official_audio_shapes, _APRE)
    return ImageBindAudioConfig.from_preset(name, logit_scale=_checkpoint_logit_scale(state_dict))


def _block_hf_key(trunk: str, official: str) -> list[str]:
    """HF key(s) of one official block key under `trunk` (in_proj keys map to three)."""
    index, rest = official[len(trunk + "blocks.") :].split(".", 1)
    layer = f"layers.{index}."
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_") :]  # "weight" or "bias"
        return [f"{layer}self_attn.{q}_proj.{kind}" for q in ("q", "k", "v")]
    block_renames = {
        "attn.out_proj.": "self_attn.out_proj.",
        "attn.bias_": "self_attn.bias_",  # audio only: bias_k / bias_v
        "norm_1.": "layer_norm1.",
        "norm_2.": "layer_norm2.",
    }
    for old, new in block_renames.items():
        if rest.startswith(old):
            return [layer + new + rest[len(old) :]]
    return [layer + rest]  # mlp.fc1.* / mlp.fc2.* keep their names


def vision_hf_keys(official: str) -> list[str]:
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
    return _block_hf_key(_TRUNK, official)


def _audio_hf_key(official: str) -> list[str]:
    """HF key(s) of one official audio key (in_proj keys map to three)."""
    renames = {
        _APRE + "cls_token": "embeddings.class_embedding",
        _APRE + "rgbt_stem.proj.weight": "embeddings.patch_embedding.weight",
        _APRE + "rgbt_stem.norm_layer.weight": "embeddings.patch_layernorm.weight",
        _APRE + "rgbt_stem.norm_layer.bias": "embeddings.patch_layernorm.bias",
        _APRE + "pos_embedding_helper.pos_embed": "embeddings.position_embedding",
        _AHEAD + "0.weight": "head_layernorm.weight",
        _AHEAD + "0.bias": "head_layernorm.bias",
        _AHEAD + "2.weight": "audio_projection.weight",
        _APOST + "1.log_logit_scale": None,  # a fixed factor: checked against config.logit_scale, not a weight
    }
    if official in renames:
        return [] if renames[official] is None else [renames[official]]
    return _block_hf_key(_ATRUNK, official)


def _check_and_map(
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    prefixes: tuple[str, ...],
    modality: str,
    config_summary: str,
    hf_key,
) -> dict[str, torch.Tensor]:
    """Checks that the `modality` keys of `state_dict` are exactly `expected` (listing every problem), then renames.

    q/k/v are contiguous copies of the stacked in-projection's thirds; other tensors are shared with the input.
    """
    present = {key for key in state_dict if key.startswith(prefixes)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    )
    if missing or unexpected or misshaped:
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                problems.append(f"{len(items)} {title} {modality} key(s):\n  " + "\n  ".join(items))
        raise ValueError(
            f"The ImageBind checkpoint does not match the {modality} config ({config_summary}):\n" + "\n".join(problems)
        )

    converted: dict[str, torch.Tensor] = {}
    for key in expected:
        targets = hf_key(key)
        tensor = state_dict[key]
        if not targets:
            continue
        if len(targets) == 3:
            # nn.MultiheadAttention stacks q, k, v (in that order) along dim 0.
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                converted[target] = part.contiguous().clone()
        else:
            converted[targets[0]] = tensor
    return converted


def _require_modality(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...], modality: str) -> None:
    """Raises ValueError, naming the file's first keys, when the state dict has no key of the modality."""
    if not any(key.startswith(prefixes) for key in state_dict):
        raise ValueError(
            f"The state dict has no ImageBind {modality} keys (modality_*.{modality}.*); is this Meta's "
            f"imagebind_huge.pth? First keys: {list(state_dict)[:5]}"
        )


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
    _require_modality(state_dict, VISION_PREFIXES, "vision")
    config = config if config is not None else infer_vision_config(state_dict)
    summary = (
        f"hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
        f"image_size={config.image_size}, projection_dim={config.projection_dim}"
    )
    return _check_and_map(state_dict, official_vision_shapes(config), VISION_PREFIXES, "vision", summary, vision_hf_keys)


def convert_imagebind_audio_state_dict(
    state_dict: dict[str, torch.Tensor], config: ImageBindAudioConfig | None = None
) -> dict[str, torch.Tensor]:
    """Official flat ImageBind state dict -> [`ImageBindAudioModel`] state dict (audio weights only).

    Args:
        state_dict: the flat dict `torch.load("imagebind_huge.pth", weights_only=True)` returns (all modalities).
        config: the architecture; inferred from the shapes when it matches a preset ("huge", "tiny").

    Raises:
        ValueError: listing missing audio keys, unexpected audio keys and keys whose shape is wrong.
    """
    _require_modality(state_dict, AUDIO_PREFIXES, "audio")
    config = config if config is not None else infer_audio_config(state_dict)
    summary = (
        f"hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
        f"spectrogram={config.num_mel_bins}x{config.target_length}, projection_dim={config.projection_dim}"
    )
    converted = _check_and_map(
        state_dict, official_audio_shapes(config), AUDIO_PREFIXES, "audio", summary, _audio_hf_key
    )
    scale = _checkpoint_logit_scale(state_dict)
    # float32 log(20) round-trips to 20 within ~1e-7; anything further off is a different model.
    if not math.isclose(scale, config.logit_scale, rel_tol=1e-5):
        raise ValueError(
            f"The checkpoint's audio logit scale (exp({_APOST}1.log_logit_scale) = {scale:.6g}) differs from "
            f"config.logit_scale = {config.logit_scale}; pass a config with logit_scale={scale:.6g}."
        )
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
        # mmap keeps the 4.5 GB all-modality file out of RAM; only the converted modalities' tensors get touched.
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({err}); a partial download can be resumed with "
            "mm-llama download-imagebind."
        ) from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state_dict).__name__}, not a flat state dict.")
    return state_dict


def _model_from_state_dict(model_class: type, config, state_dict: dict[str, torch.Tensor],
                           dtype: torch.dtype | None):
    """Builds `model_class(config)` without allocating random weights (the huge vision tower is 2.5 GB), then takes
    the converted checkpoint's tensors (strict: every key accounted for)."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _vision_model(
    official: dict[str, torch.Tensor], config: ImageBindVisionConfig | None, dtype: torch.dtype | None
) -> ImageBindVisionModel:
    config = config if config is not None else infer_vision_config(official)
    return _model_from_state_dict(ImageBindVisionModel, config, convert_imagebind_state_dict(official, config), dtype)


def _audio_model(
    official: dict[str, torch.Tensor], config: ImageBindAudioConfig | None, dtype: torch.dtype | None
) -> ImageBindAudioModel:
    config = config if config is not None else infer_audio_config(official)
    return _model_from_state_dict(ImageBindAudioModel, config, convert_imagebind_audio_state_dict(official, config),
                                  dtype)


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
    return _vision_model(_read_state_dict(path), config, dtype)


def load_imagebind_audio_checkpoint(
    path: str | os.PathLike,
    config: ImageBindAudioConfig | None = None,
    dtype: torch.dtype | None = None,
) -> ImageBindAudioModel:
    """Builds an [`ImageBindAudioModel`] (eval mode) from Meta's `.pth` file (see `load_imagebind_checkpoint`)."""
    return _audio_model(_read_state_dict(path), config, dtype)


def convert_imagebind_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: ImageBindVisionConfig | None = None,
    dtype: torch.dtype | None = None,
    modality: str = "vision",
    audio_config: ImageBindAudioConfig | None = None,
) -> Path:
    """`imagebind_huge.pth` -> `save_pretrained` folder(s) (config.json, model.safetensors, preprocessor_config.json).

    Args:
        checkpoint_path: Meta's flat all-modality checkpoint.
        output_dir: where to write.
        config: the vision architecture (inferred from the weights when None).
        dtype: cast the weights to this dtype (default: keep the checkpoint's).
        modality: "vision" writes the vision model and `ImageBindProcessor` into `output_dir`; "audio" writes the
            audio model and `ImageBindAudioProcessor` into `output_dir`; "all" writes both, into
            `output_dir/vision` and `output_dir/audio` (load with `from_pretrained(output_dir, subfolder="audio")`).
        audio_config: the audio architecture (inferred from the weights when None).

    Returns:
        The output folder.
    """
    from .processing_imagebind import ImageBindProcessor
    from .processing_imagebind_audio import ImageBindAudioProcessor

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if modality == "audio" and config is not None:
        raise ValueError("config= describes the vision tower; pass audio_config=ImageBindAudioConfig(...) for audio.")
    if modality == "vision" and audio_config is not None:
        raise ValueError("audio_config= was given but modality='vision' converts no audio; use modality='audio'/'all'.")
    official = _read_state_dict(checkpoint_path)  # read once, even for "all"
    output_dir = Path(output_dir)
    # Convert everything before writing anything, so a mismatch leaves no half-written folder behind.
    vision = _vision_model(official, config, dtype) if modality in ("vision", "all") else None
    audio = _audio_model(official, audio_config, dtype) if modality in ("audio", "all") else None
    if vision is not None:
        folder = output_dir / "vision" if modality == "all" else output_dir
        vision.save_pretrained(folder)
        ImageBindProcessor(image_size=vision.config.image_size).save_pretrained(folder)
    if audio is not None:
        folder = output_dir / "audio" if modality == "all" else output_dir
        audio.save_pretrained(folder)
        ImageBindAudioProcessor(
            num_mel_bins=audio.config.num_mel_bins, target_length=audio.config.target_length
        ).save_pretrained(folder)
    return output_dir


__all__ = [
    "AUDIO_PREFIXES",
    "MODALITIES",
    "VISION_PREFIXES",
    "convert_imagebind_audio_state_dict",
    "convert_imagebind_checkpoint",
    "convert_imagebind_state_dict",
    "infer_audio_config",
    "infer_vision_config",
    "load_imagebind_audio_checkpoint",
    "load_imagebind_checkpoint",
    "official_audio_shapes",
    "official_vision_shapes",
    "vision_hf_keys",
]
