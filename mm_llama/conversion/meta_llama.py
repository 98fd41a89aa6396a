"""Meta LLaMA-2 checkpoint (`consolidated.NN.pth` + `params.json` + `tokenizer.model`) -> Hugging Face LLaMA folder.

transformers 5.x no longer ships `convert_llama_weights_to_hf.py`, so the mapping is implemented here from what
Meta's reference `llama/model.py` does:

* Meta saves one `consolidated.NN.pth` per model-parallel rank (7B: 1, 13B: 2, 70B: 8). Each rank holds its slice of
  the fairscale-parallel layers: `ColumnParallelLinear` weights (`wq`, `wk`, `wv`, `w1`, `w3`, `output`) are split
  along dim 0 (output features), `RowParallelLinear` weights (`wo`, `w2`) along dim 1 (input features), and the
  `ParallelEmbedding` (`tok_embeddings`) along dim 1 (the embedding dimension). RMSNorm weights are replicated.
* Meta's rotary embedding treats each head's features as interleaved pairs (2j, 2j+1) forming complex numbers;
  HF's `rotate_half` pairs feature j with j + head_dim/2. Permuting the output rows of `wq` and `wk` per head makes
  HF's attention compute exactly Meta's scores (`permute_for_rotate_half`).
* The SwiGLU hidden size is not in params.json: it is derived from `dim`, `multiple_of` and `ffn_dim_multiplier`
  (`ffn_hidden_size`).

The HF weights are written shard by shard (safetensors by default) while they are produced, so the peak memory is
about one output shard (`max_shard_size`) on top of the memory-mapped Meta shards, instead of a full model copy:
that is what makes 70B convertible on an ordinary machine. The output folder is the one
`LlamaForCausalLM.save_pretrained` writes (config.json, generation_config.json, model*.safetensors + index) plus the
tokenizer saved by `MMLlamaTokenizer`, and loads with `LlamaForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..loading import resolve_dtype
from ..progress import progress_bar
from .meta_checkpoint import (
    LLAMA2_MAX_POSITION_EMBEDDINGS,
    META_DEFAULT_TEMPERATURE,
    META_DEFAULT_TOP_P,
    PARAMS_FILE,
    MetaCheckpointError,
    MetaLlamaParams,
    _expected_shapes,
    _read_sentencepiece,
    _split_dim,
    check_meta_shards,
    find_tokenizer_model,
    load_meta_shards,
    read_params,
)

logger = logging.getLogger(__name__)

# Meta layer weight -> HF submodule of `model.layers.{i}`.
HF_LAYER_NAMES: dict[str, str] = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_LEVEL_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# --------------------------------------------------------------------------------------------------------------------
# weight mapping
# --------------------------------------------------------------------------------------------------------------------


def permute_for_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the output rows of a Meta `wq`/`wk` weight for HF's `rotate_half` rotary layout.

    Within each head, Meta rotates the pairs (2j, 2j+1); HF rotates (j, j + head_dim/2). Row j of an HF head is
    Meta row 2j and row j + head_dim/2 is Meta row 2j+1. The same reordering of q and k leaves q.k unchanged.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)
    )


def _gather(
    key: str, files: Sequence[Path], shards: Sequence[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """One full Meta weight from its model-parallel slices."""
    dim = _split_dim(key)
    if dim is None:
        # Replicated: every rank saved the same values; a difference means shards of different checkpoints.
        ref = shards[0][key]
        for path, state in zip(files[1:], shards[1:]):
            if not torch.equal(state[key], ref):
                raise MetaCheckpointError(
                    f"{path}: replicated weight {key} differs from {files[0].name}; the shards come from "
                    f"different checkpoints. Re-download the model folder."
                )
        return ref
    if len(shards) == 1:
        return shards[0][key]  # no copy: stays memory-mapped until converted
    return torch.cat([state[key] for state in shards], dim=dim)


def _to_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Casts to the output dtype; float16 overflow is an error rather than silent infs."""
    if dtype is None or tensor.dtype == dtype:
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            # A view into a larger storage (shared with other weights): safetensors refuses shared storage and
            # torch.save would write the whole storage, so give it its own.
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.contiguous()
    converted = tensor.to(dtype).contiguous()
    if dtype == torch.float16 and not torch.isfinite(converted).all():
        raise MetaCheckpointError(
            f"{key} overflows float16 (max {torch.finfo(torch.float16).max}); convert with --dtype bfloat16."
        )
    return converted


def hf_weight_name(meta_key: str) -> str:
    """The HF `LlamaForCausalLM` name of a Meta weight (`layers.3.attention.wq.weight` ->
    `model.layers.3.self_attn.q_proj.weight`)."""
    if meta_key.startswith("layers."):
        _, index, name = meta_key[: -len(".weight")].split(".", 2)
        return f"model.layers.{index}.{HF_LAYER_NAMES[name]}.weight"
    return _HF_TOP_LEVEL_NAMES[meta_key]


def iter_hf_weights(
    files: Sequence[Path],
    shards: Sequence[dict[str, torch.Tensor]],
    params: MetaLlamaParams,
    *,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF `LlamaForCausalLM` name, tensor) one weight at a time, so callers can write them out as they come.

    Call `check_meta_shards` first: this function assumes consistent shards. Draws a bar over the layers while
    `mm_llama.progress`'s switch is on.
    """
    tqdm_layers = progress_bar(total=params.n_layers, desc="Converting layers", unit="layer")
    for key in _expected_shapes(params, vocab_size=0):  # Meta's order: embeddings, layer by layer, norm, output
        weight = _gather(key, files, shards)
        if key.endswith("attention.wq.weight"):
            weight = permute_for_rotate_half(weight, params.n_heads)
        elif key.endswith("attention.wk.weight"):
            weight = permute_for_rotate_half(weight, params.n_kv_heads)
        yield hf_weight_name(key), _to_dtype(key, weight, dtype)
        if key.endswith("ffn_norm.weight"):
            tqdm_layers.update(1)
    tqdm_layers.close()


def meta_to_hf_state_dict(
    shards: Sequence[dict[str, torch.Tensor]],
    params: MetaLlamaParams,
    *,
    files: Sequence[Path] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The full HF `LlamaForCausalLM` state dict of Meta shards (validated first). Holds the whole model in memory;
    `convert_meta_llama` streams instead."""
    files = list(files) if files is not None else [Path(f"consolidated.{i:02d}.pth") for i in range(len(shards))]
    check_meta_shards(files, shards, params)
    return dict(iter_hf_weights(files, shards, params, dtype=dtype))


def llama_config_from_params(
    params: MetaLlamaParams,
    vocab_size: int,
    *,
    max_position_embeddings: int = LLAMA2_MAX_POSITION_EMBEDDINGS,
    dtype: str | torch.dtype | None = None,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
):
    """The `LlamaConfig` of a Meta checkpoint (HF names for Meta's `ModelArgs`)."""
    from transformers import LlamaConfig

    if params.vocab_size is not None and params.vocab_size != vocab_size:
        raise MetaCheckpointError(
            f"{params.source or PARAMS_FILE} says vocab_size={params.vocab_size} but the checkpoint/tokenizer has "
            f"{vocab_size} tokens; check that params.json belongs to this model."
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params.dim,
        intermediate_size=params.ffn_hidden_size,
        num_hidden_layers=params.n_layers,
        num_attention_heads=params.n_heads,
        num_key_value_heads=params.n_kv_heads,
        head_dim=params.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=params.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": params.rope_theta},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,  # Meta's `output` is a separate matrix
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes of a size such as 5_000_000, "5GB" (10**9 units) or "4GiB" (2**30 units), as transformers reads
    `max_shard_size`."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        result = convert_file_size_to_int(size)
    except ValueError as error:
        raise ValueError(f"Cannot parse size {size!r}: use bytes or a whole number with a unit, like '5GB' or "
                         "'4GiB'.") from error
    if not isinstance(result, int) or result <= 0:
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}.")
    return result


def _remove_stale_weights(output_dir: Path) -> None:
    """Deletes HF weight files of an earlier conversion so that from_pretrained cannot pick up stale ones."""
    for pattern in ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", "*.tmp-shard"):  # fmt: skip
        for path in output_dir.glob(pattern):
            logger.info("Removing stale weight file %s", path)
            path.unlink()


def save_weights_sharded(
    weights: Iterable[tuple[str, torch.Tensor]],
    output_dir: str | os.PathLike,
    *,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> list[Path]:
    """Writes (name, tensor) pairs as HF weight files while they are produced; returns the written files.

    The shard plan is huggingface_hub's `split_torch_state_dict_into_shards`, made up front from `shapes` (every
    weight's shape, in `dtype`) with meta tensors, so the layout is exactly `PreTrainedModel.save_pretrained`'s; each
    file is written as soon as its last weight arrives, so only about one shard is ever in memory (a 70B model
    converts on a machine with little RAM). PyTorch `.bin` files when `safe_serialization=False`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix, ext, index_name = ("model", "safetensors", "model.safetensors.index.json") if safe_serialization else (
        "pytorch_model", "bin", "pytorch_model.bin.index.json")
    plan = split_torch_state_dict_into_shards(
        {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()},
        filename_pattern=prefix + "{suffix}." + ext, max_shard_size=parse_size(max_shard_size),
    )
    _remove_stale_weights(output_dir)
    pending = {filename: {} for filename in plan.filename_to_tensors}
    written: list[Path] = []
    for name, tensor in weights:
        if name not in plan.tensor_to_filename or tuple(tensor.shape) != tuple(shapes[name]):
            raise MetaCheckpointError(f"Weight {name} {tuple(tensor.shape)} is not in the conversion plan "
                                      f"({shapes.get(name)}); the checkpoint does not match params.json.")
        filename = plan.tensor_to_filename[name]
        pending[filename][name] = tensor
        if len(pending[filename]) == len(plan.filename_to_tensors[filename]):
            path, partial = output_dir / filename, output_dir / f"{filename}.tmp-shard"
            if safe_serialization:
                save_file(pending.pop(filename), str(partial), metadata={"format": "pt"})
            else:
                torch.save(pending.pop(filename), partial)
            partial.replace(path)  # a killed conversion never leaves a complete-looking weight file
            written.append(path)
    if pending:  # files whose weights did not all arrive
        missing = sorted(name for filename, received in pending.items()
                         for name in plan.filename_to_tensors[filename] if name not in received)
        raise MetaCheckpointError(f"The conversion produced no tensor for {missing[:5]}; the checkpoint is incomplete.")
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (output_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(written)


def convert_meta_llama(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float16",
    safe_serialization: bool = True,
    max_shard_size: int | str = "5GB",
    max_position_embeddings: int = LLAMA2_MAX_POSITION_EMBEDDINGS,
) -> Path:
    """Converts a Meta LLaMA-2 model folder into a Hugging Face `LlamaForCausalLM` folder; returns `output_dir`.

    Args:
        input_dir: one Meta model folder (`consolidated.NN.pth`, `params.json`), e.g. `llama-2-7b-chat/`.
        output_dir: where config.json, generation_config.json, the weights and the tokenizer are written.
        tokenizer_path: Meta's `tokenizer.model` (or its folder); by default looked up in `input_dir` and its
            parent (Meta's download layout).
        dtype: "float16" (as Meta's HF releases), "bfloat16" (Meta's training dtype, lossless) or "float32".
        safe_serialization: safetensors (default) or PyTorch `.bin` files.
        max_shard_size: largest weight file, e.g. "5GB".
        max_position_embeddings: context length; params.json does not record it (LLaMA-2: 4096).

    A progress bar over the layers is drawn while `mm_llama.progress`'s switch is on.
    """
    from transformers import GenerationConfig

    from mm_llama.model.tokenization_mm_llama import MMLlamaTokenizer

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"Input folder {input_dir} does not exist: pass the Meta model folder as --input_dir.")

    # Cheap checks first, so that a missing tokenizer is reported before minutes of shard loading.
    params = read_params(input_dir)
    tokenizer_file = find_tokenizer_model(input_dir, tokenizer_path)
    sp_model = _read_sentencepiece(tokenizer_file)
    files, shards = load_meta_shards(input_dir)
    vocab_size = check_meta_shards(files, shards, params)
    if sp_model.vocab_size() != vocab_size:
        raise MetaCheckpointError(
            f"{tokenizer_file} has {sp_model.vocab_size()} tokens but the embeddings in {files[0]} have {vocab_size} "
            f"rows: the tokenizer belongs to another model. Pass the right one with --tokenizer_path."
        )

    config = llama_config_from_params(
        params,
        vocab_size,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        bos_token_id=sp_model.bos_id(),
        eos_token_id=sp_model.eos_id(),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Converting %s (%d shard(s), %d layers, dim %d) to %s in %s",
        input_dir, len(files), params.n_layers, params.dim, output_dir, dtype,
    )  # fmt: skip
    save_weights_sharded(
        iter_hf_weights(files, shards, params, dtype=torch_dtype),
        output_dir,
        shapes={hf_weight_name(key): shape for key, shape in _expected_shapes(params, vocab_size).items()},
        dtype=torch_dtype,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
    )
    config.save_pretrained(output_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        do_sample=True,
        temperature=META_DEFAULT_TEMPERATURE,
        top_p=META_DEFAULT_TOP_P,
        max_length=max_position_embeddings,
    ).save_pretrained(output_dir)

    tokenizer = MMLlamaTokenizer(vocab_file=str(tokenizer_file), model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(output_dir)
    logger.info("Saved the Hugging Face LLaMA model and tokenizer to %s", output_dir)
    return output_dir


__all__ = [
    "HF_LAYER_NAMES",
    "convert_meta_llama",
    "hf_weight_name",
    "iter_hf_weights",
    "llama_config_from_params",
    "meta_to_hf_state_dict",
    "parse_size",
    "permute_for_rotate_half",
    "save_weights_sharded",
]
