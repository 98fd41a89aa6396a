"""Meta LLaMA-2 checkpoint folders, read and checked: `params.json`, `tokenizer.model` and the `consolidated.NN.pth`
shards (one per model-parallel rank: 7B 1, 13B 2, 70B 8), with errors that name the file and the fix. The conversion
into a Hugging Face folder is `meta_llama.py`.

Over 400 lines because it is the one place that knows what a Meta download holds; most of it is error messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


__all__ = [
    "LLAMA2_MAX_POSITION_EMBEDDINGS",
    "META_DEFAULT_TEMPERATURE",
    "META_DEFAULT_TOP_P",
    "MetaCheckpointError",
    "MetaLlamaParams",
    "check_meta_shards",
    "ffn_hidden_size",
    "find_shard_files",
    "find_tokenizer_model",
    "load_meta_shards",
    "read_params",
]
