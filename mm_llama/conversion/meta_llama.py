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
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading import resolve_dtype

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_GLOB = "consolidated.*.pth"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


# LLaMA-2 was trained with a 4096-token context; params.json does not record it.
LLAMA2_MAX_POSITION_EMBEDDINGS = 4096
# Meta's reference sampling defaults (`example_chat_completion.py` / `generation.py`).
META_DEFAULT_TEMPERATURE = 0.6
META_DEFAULT_TOP_P = 0.9

# (dim, n_layers) -> (name, number of consolidated.NN.pth files Meta ships); only used to word error messages.
_KNOWN_LLAMA2_SIZES: dict[tuple[int, int], tuple[str, int]] = {
    (4096, 32): ("7B", 1),
    (5120, 40): ("13B", 2),
    (8192, 80): ("70B", 8),
}

# How each Meta weight is split across model-parallel shards: the dim to concatenate along, or None if replicated.
_SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings": 1,  # ParallelEmbedding: split over the embedding dim
    "output": 0,  # ColumnParallelLinear
    "norm": None,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,  # RowParallelLinear
    "feed_forward.w1": 0,
    "feed_forward.w2": 1,  # RowParallelLinear
    "feed_forward.w3": 0,
    "attention_norm": None,
    "ffn_norm": None,
}
# Meta layer weight -> HF submodule of `model.layers.{i}`.
_HF_LAYER_NAMES: dict[str, str] = {
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
# Present in some Meta checkpoints (the precomputed rotary frequencies); recomputed by HF, so not converted.
_IGNORED_KEYS = frozenset({"rope.freqs"})


class MetaCheckpointError(ValueError):
    """A Meta checkpoint folder whose content is inconsistent (shards, shapes, params.json, tokenizer)."""


# --------------------------------------------------------------------------------------------------------------------
# params.json
# --------------------------------------------------------------------------------------------------------------------


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden size as Meta's `FeedForward` computes it.

    `int(2 * 4 * dim / 3)`, scaled by `ffn_dim_multiplier` when given (70B: 1.3), rounded up to a multiple of
    `multiple_of`. 7B: 11008, 13B: 13824, 70B: 28672.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class MetaLlamaParams:
    """The fields of Meta's `params.json` (`ModelArgs` in `llama/model.py`) that define the architecture."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int | None  # None when params.json says -1 ("defined later by tokenizer")
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    source: Path | None = None

    @property
    def head_dim(self) -> int:
        """Per-head feature size (`dim // n_heads`)."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU hidden size (HF `intermediate_size`)."""
        return ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path | None = None) -> MetaLlamaParams:
        """Validates a parsed params.json; errors name `source` and the offending field."""
        where = str(source) if source is not None else PARAMS_FILE
        required = ("dim", "n_layers", "n_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise MetaCheckpointError(
                f"{where} lacks {', '.join(missing)}: it is not a Meta LLaMA params.json "
                f"(expected fields dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, norm_eps, ...)."
            )
        if raw.get("use_scaled_rope"):
            raise MetaCheckpointError(
                f"{where} sets use_scaled_rope (LLaMA-3.1 style rotary scaling); only LLaMA-2 checkpoints are "
                f"supported by this converter."
            )
        known = {
            "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
            "norm_eps", "rope_theta", "max_batch_size", "max_seq_len",
        }  # fmt: skip
        unknown = sorted(set(raw) - known)
        if unknown:
            logger.warning("%s: ignoring unknown fields %s", where, unknown)

        dim, n_layers, n_heads = int(raw["dim"]), int(raw["n_layers"]), int(raw["n_heads"])
        n_kv_heads = int(raw["n_kv_heads"]) if raw.get("n_kv_heads") is not None else n_heads
        if dim <= 0 or n_layers <= 0 or n_heads <= 0 or n_kv_heads <= 0:
            raise MetaCheckpointError(f"{where}: dim, n_layers, n_heads and n_kv_heads must be positive: {raw}")
        if dim % n_heads:
            raise MetaCheckpointError(f"{where}: dim={dim} is not divisible by n_heads={n_heads}.")
        if (dim // n_heads) % 2:
            raise MetaCheckpointError(f"{where}: the head size dim/n_heads={dim // n_heads} must be even for RoPE.")
        if n_heads % n_kv_heads:
            raise MetaCheckpointError(f"{where}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}.")
        vocab = raw.get("vocab_size", -1)
        multiplier = raw.get("ffn_dim_multiplier")
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=int(vocab) if vocab is not None and int(vocab) > 0 else None,
            multiple_of=int(raw.get("multiple_of", 256)),
            ffn_dim_multiplier=float(multiplier) if multiplier is not None else None,
            norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            source=source,
        )


def _model_folders_below(folder: Path) -> list[str]:
    """Names of sub-folders holding a params.json (a Meta download root holds one per model)."""
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob(f"*/{PARAMS_FILE}"))


def read_params(input_dir: str | os.PathLike) -> MetaLlamaParams:
    """Reads and validates `input_dir/params.json`.

    Raises FileNotFoundError naming the path when it is missing (and, when `input_dir` is a Meta download root, the
    model folders inside it that should be passed instead).
    """
    input_dir = Path(input_dir)
    path = input_dir / PARAMS_FILE
    if not path.is_file():
        below = _model_folders_below(input_dir)
        hint = (
            f" {input_dir} looks like a Meta download folder holding the model folders {below}: pass one of them, "
            f"e.g. --input_dir {input_dir / below[0]}."
            if below
            else " Pass the folder of one Meta model (the one with params.json and consolidated.00.pth), "
            "e.g. llama-2-7b-chat/."
        )
        raise FileNotFoundError(f"No {PARAMS_FILE} found at {path}.{hint}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetaCheckpointError(f"{path} is not valid JSON ({err}); re-download it from Meta.") from err
    if not isinstance(raw, dict):
        raise MetaCheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}.")
    return MetaLlamaParams.from_dict(raw, source=path)


# --------------------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------------------


def find_tokenizer_model(input_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Locates Meta's `tokenizer.model`.

    An explicit `tokenizer_path` (the file, or a folder holding it) wins. Otherwise `input_dir/tokenizer.model`, then
    `input_dir/../tokenizer.model`: Meta's download script puts one tokenizer beside the model folders
    (`llama/tokenizer.model`, `llama/llama-2-7b-chat/`).
    """
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"Tokenizer not found at {path}: pass the path of Meta's {TOKENIZER_FILE} (or of its folder) "
                f"as --tokenizer_path."
            )
        return path
    input_dir = Path(input_dir)
    candidates = [input_dir / TOKENIZER_FILE, input_dir.resolve().parent / TOKENIZER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"No {TOKENIZER_FILE} found at {candidates[0]} or {candidates[1]}: pass the path of Meta's "
        f"{TOKENIZER_FILE} (downloaded beside the model folders) with --tokenizer_path."
    )


def _read_sentencepiece(path: Path) -> Any:
    """Loads a sentencepiece model, turning a parse failure into an error that names the file."""
    from sentencepiece import SentencePieceProcessor

    try:
        return SentencePieceProcessor(model_file=str(path))
    except Exception as err:  # sentencepiece raises OSError/RuntimeError depending on the failure
        raise MetaCheckpointError(
            f"{path} is not a sentencepiece model ({err}); re-download Meta's {TOKENIZER_FILE}."
        ) from err


# --------------------------------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------------------------------


def find_shard_files(input_dir: str | os.PathLike) -> list[Path]:
    """The `consolidated.NN.pth` files of `input_dir`, in rank order; errors when none or when numbers are missing."""
    input_dir = Path(input_dir)
    numbered: list[tuple[int, Path]] = []
    for path in input_dir.glob(SHARD_GLOB):
        match = _SHARD_RE.match(path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    if not numbered:
        raise FileNotFoundError(
            f"No {SHARD_GLOB} files in {input_dir}: pass the folder of one Meta model (holding consolidated.00.pth "
            f"and params.json), and check that the download finished."
        )
    numbered.sort()
    ranks = [rank for rank, _ in numbered]
    expected = list(range(len(numbered)))
    if ranks != expected:
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise MetaCheckpointError(
            f"{input_dir}: model-parallel shards are numbered {ranks}; missing "
            f"{', '.join(f'consolidated.{m:02d}.pth' for m in missing)}. Re-download the missing files."
        )
    return [path for _, path in numbered]


def load_meta_shards(
    input_dir: str | os.PathLike, *, mmap: bool = True
) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Loads every `consolidated.NN.pth` of `input_dir` with `weights_only=True` onto the CPU.

    With `mmap=True` the tensors stay backed by the files (pages are read on use and can be dropped again), so
    loading 70B does not need 130 GB of RAM. Checkpoints in the legacy non-zip format cannot be memory-mapped and
    are read into memory instead.
    Returns (shard paths, state dicts), in rank order.
    """
    files = find_shard_files(input_dir)
    shards: list[dict[str, torch.Tensor]] = []
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if mmap and "mmap" in str(err).lower():
                logger.info("%s cannot be memory-mapped (%s); reading it into memory", path, err)
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise MetaCheckpointError(f"Could not read {path} ({err}); re-download it.") from err
        except Exception as err:  # pickle errors from weights_only, truncated zips, ...
            raise MetaCheckpointError(f"Could not read {path} ({err}); re-download it.") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MetaCheckpointError(f"{path} does not hold a state dict of tensors: it is not a Meta shard.")
        shards.append(state)
    return files, shards


def _expected_shapes(params: MetaLlamaParams, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every Meta weight implied by params.json, in model order (embeddings, the layers,
    the final norm, the output head)."""
    dim, hd, ffn = params.dim, params.head_dim, params.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab_size, dim)}
    per_layer = {
        "attention.wq": (params.n_heads * hd, dim),
        "attention.wk": (params.n_kv_heads * hd, dim),
        "attention.wv": (params.n_kv_heads * hd, dim),
        "attention.wo": (dim, params.n_heads * hd),
        "feed_forward.w1": (ffn, dim),
        "feed_forward.w2": (dim, ffn),
        "feed_forward.w3": (ffn, dim),
        "attention_norm": (dim,),
        "ffn_norm": (dim,),
    }
    for i in range(params.n_layers):
        for name, shape in per_layer.items():
            shapes[f"layers.{i}.{name}.weight"] = shape
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (vocab_size, dim)
    return shapes


def _split_dim(key: str) -> int | None:
    """Concatenation dim of a Meta weight name (`layers.3.attention.wq.weight` -> 0)."""
    name = key[: -len(".weight")]
    if name.startswith("layers."):
        name = name.split(".", 2)[2]
    return _SPLIT_DIM[name]


def check_meta_shards(
    files: Sequence[Path], shards: Sequence[dict[str, torch.Tensor]], params: MetaLlamaParams
) -> int:
    """Validates the shards against params.json before any conversion work; returns the vocabulary size.

    Checks that every shard holds exactly the expected weights, that the number of files matches the model-parallel
    size the shapes were saved with, and that each weight's slices have equal shapes which concatenate to the shape
    params.json implies. Every error names the file and the fix.
    """
    first = shards[0]
    if "tok_embeddings.weight" not in first:
        raise MetaCheckpointError(f"{files[0]} has no tok_embeddings.weight: it is not a Meta LLaMA shard.")
    # The embedding is split over its second dim, so every shard holds all vocabulary rows.
    vocab_size = int(first["tok_embeddings.weight"].shape[0])
    expected = _expected_shapes(params, vocab_size)

    for path, state in zip(files, shards):
        keys = set(state) - _IGNORED_KEYS
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            raise MetaCheckpointError(
                f"{path}: weights do not match {params.source or PARAMS_FILE} (n_layers={params.n_layers}): "
                f"{'; '.join(parts)}. Check that params.json belongs to these consolidated.*.pth files."
            )

    # Model-parallel size the checkpoint was saved with, read from how much of wq one shard holds.
    wq_key = "layers.0.attention.wq.weight"
    full_rows, local_rows = expected[wq_key][0], int(first[wq_key].shape[0])
    if local_rows <= 0 or full_rows % local_rows:
        raise MetaCheckpointError(
            f"{files[0]}: {wq_key} has {local_rows} rows, which does not divide the {full_rows} rows implied by "
            f"{params.source or PARAMS_FILE} (n_heads={params.n_heads}, dim={params.dim}). "
            f"Check that params.json belongs to these shards."
        )
    parallel_size = full_rows // local_rows
    if parallel_size != len(files):
        known = _KNOWN_LLAMA2_SIZES.get((params.dim, params.n_layers))
        hint = f" (LLaMA-2 {known[0]} ships {known[1]} shard(s))" if known else ""
        names = ", ".join(f"consolidated.{r:02d}.pth" for r in range(parallel_size))
        raise MetaCheckpointError(
            f"{files[0].parent}: {files[0].name} holds 1/{parallel_size} of each split weight ({wq_key} has "
            f"{local_rows} of {full_rows} rows), so the checkpoint was saved as {parallel_size} model-parallel "
            f"shard(s){hint}, but {len(files)} file(s) were found. Expected {names}: re-download the missing "
            f"files, or remove files that belong to another model."
        )

    for key, full_shape in expected.items():
        dim = _split_dim(key)
        ref_shape = tuple(first[key].shape)
        for path, state in zip(files[1:], shards[1:]):
            if tuple(state[key].shape) != ref_shape:
                raise MetaCheckpointError(
                    f"{path}: {key} has shape {tuple(state[key].shape)} but {files[0].name} has {ref_shape}; "
                    f"Meta splits weights evenly, so the shards come from different models or a file is corrupt. "
                    f"Re-download {path.name}."
                )
        joined = list(ref_shape)
        if dim is not None and joined:
            joined[dim] *= len(files)
        if tuple(joined) != full_shape:
            raise MetaCheckpointError(
                f"{key}: the {len(files)} shard(s) in {files[0].parent} give shape {tuple(joined)}, but "
                f"{params.source or PARAMS_FILE} (dim={params.dim}, n_heads={params.n_heads}, "
                f"n_kv_heads={params.n_kv_heads}, multiple_of={params.multiple_of}, "
                f"ffn_dim_multiplier={params.ffn_dim_multiplier}) implies {full_shape}. Check that params.json "
                f"belongs to these shards."
            )
    return vocab_size


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
        return f"model.layers.{index}.{_HF_LAYER_NAMES[name]}.weight"
    return _HF_TOP_LEVEL_NAMES[meta_key]


def iter_hf_weights(
    files: Sequence[Path],
    shards: Sequence[dict[str, torch.Tensor]],
    params: MetaLlamaParams,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF `LlamaForCausalLM` name, tensor) one weight at a time, so callers can write them out as they come.

    Call `check_meta_shards` first: this function assumes consistent shards.
    """
    from tqdm.auto import tqdm

    tqdm_layers = tqdm(total=params.n_layers, desc="Converting layers", unit="layer", disable=not progress)
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
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The full HF `LlamaForCausalLM` state dict of Meta shards (validated first). Holds the whole model in memory;
    `convert_meta_llama` streams instead."""
    files = list(files) if files is not None else [Path(f"consolidated.{i:02d}.pth") for i in range(len(shards))]
    check_meta_shards(files, shards, params)
    return dict(iter_hf_weights(files, shards, params, dtype=dtype, progress=progress))


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
    progress: bool = True,
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
        progress: show a progress bar over layers.
    """
    from transformers import GenerationConfig

    from mm_llama.tokenization_mm_llama import MMLlamaTokenizer

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
        iter_hf_weights(files, shards, params, dtype=torch_dtype, progress=progress),
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
    "LLAMA2_MAX_POSITION_EMBEDDINGS",
    "MetaCheckpointError",
    "MetaLlamaParams",
    "check_meta_shards",
    "convert_meta_llama",
    "ffn_hidden_size",
    "find_shard_files",
    "find_tokenizer_model",
    "hf_weight_name",
    "iter_hf_weights",
    "llama_config_from_params",
    "load_meta_shards",
    "meta_to_hf_state_dict",
    "parse_size",
    "permute_for_rotate_half",
    "read_params",
    "save_weights_sharded",
]
