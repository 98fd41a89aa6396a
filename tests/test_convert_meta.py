"""Meta LLaMA-2 checkpoint conversion: a tiny random model written in Meta's format must give, after conversion to
`LlamaForCausalLM`, the logits of Meta's reference forward pass (re-stated below in plain torch)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mm_llama.conversion import (
    MetaCheckpointError,
    convert_meta_llama,
    ffn_hidden_size,
    load_meta_shards,
    meta_to_hf_state_dict,
    parse_size,
    read_params,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320  # the conftest tokenizer

# LLaMA-2-7B-like: no n_kv_heads (MHA), no ffn_dim_multiplier, vocab_size -1 (taken from the tokenizer).
MHA_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 48, "norm_eps": 1e-05, "vocab_size": -1}
# LLaMA-2-70B-like: GQA with n_kv_heads < n_heads, ffn_dim_multiplier 1.3; plus a non-default rope_theta.
GQA_PARAMS = {
    "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-05, "vocab_size": -1, "rope_theta": 500000.0,
}  # fmt: skip

# How Meta's fairscale model-parallel layers split each weight across ranks (None: replicated on every rank).
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


# ---------------------------------------------------------------------------------------------------------------------
# Writing a tiny model in Meta's format
# ---------------------------------------------------------------------------------------------------------------------


def _hidden(params: dict) -> int:
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return params["multiple_of"] * math.ceil(hidden / params["multiple_of"])


def random_meta_weights(params: dict, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unsharded Meta-layout fp32 weights, scaled so activations and logits are O(1) (a sensitive comparison)."""
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv, hd, hidden = params.get("n_kv_heads", n_heads), dim // n_heads, _hidden(params)

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm() -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(dim, generator=g)

    weights = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g)}
    for i in range(params["n_layers"]):
        weights.update(
            {
                f"layers.{i}.attention.wq.weight": linear(n_heads * hd, dim) * 2.0,
                f"layers.{i}.attention.wk.weight": linear(n_kv * hd, dim) * 2.0,
                f"layers.{i}.attention.wv.weight": linear(n_kv * hd, dim),
                f"layers.{i}.attention.wo.weight": linear(dim, n_heads * hd),
                f"layers.{i}.feed_forward.w1.weight": linear(hidden, dim),
                f"layers.{i}.feed_forward.w2.weight": linear(dim, hidden),
                f"layers.{i}.feed_forward.w3.weight": linear(hidden, dim),
                f"layers.{i}.attention_norm.weight": norm(),
                f"layers.{i}.ffn_norm.weight": norm(),
            }
        )
    weights["norm.weight"] = norm()
    weights["output.weight"] = linear(vocab, dim) * 3.0
    return weights


def shard_like_meta(weights: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Rank state dicts as Meta's model-parallel training saved them."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in weights.items():
        name = key[: -len(".weight")].split(".", 2)[-1] if key.startswith("layers.") else key[: -len(".weight")]
        if name in COLUMN_PARALLEL:
            pieces = tensor.chunk(num_shards, dim=0)
        elif name in ROW_PARALLEL or name == "tok_embeddings":  # ParallelEmbedding splits the embedding dim
            pieces = tensor.chunk(num_shards, dim=1)
        else:
            pieces = [tensor] * num_shards  # RMSNorm weights are replicated
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()  # each rank owns its tensors (no shared storage)
    for shard in shards:  # some Meta checkpoints carry the precomputed rotary frequencies; not converted
        shard["rope.freqs"] = torch.ones(4)
    return shards


def write_meta_checkpoint(
    folder: Path, params: dict, weights: dict[str, torch.Tensor], num_shards: int, tokenizer: Path | None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shard_like_meta(weights, num_shards)):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Meta's reference forward pass (llama/model.py), re-stated on the unsharded Meta-layout weights
# ---------------------------------------------------------------------------------------------------------------------


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64 [end, dim/2]


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Consecutive feature pairs (2j, 2j+1) of each head are one complex number, rotated by position.
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_c.shape[1], 1, xq_c.shape[-1])
    xq_out = torch.view_as_real(xq_c * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_c * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bsz, seqlen, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(bsz, seqlen, n_kv, n_rep, hd).reshape(bsz, seqlen, n_kv * n_rep, hd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def meta_reference_logits(weights: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv, eps = params.get("n_kv_heads", n_heads), params["norm_eps"]
    hd = dim // n_heads
    bsz, seqlen = tokens.shape
    freqs_cis = precompute_freqs_cis(hd, seqlen * 2, params.get("rope_theta", 10000.0))[:seqlen]
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)

    h = weights["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        w = {k.split(".", 2)[2][: -len(".weight")]: v for k, v in weights.items() if k.startswith(f"layers.{i}.")}
        x = rms_norm(h, w["attention_norm"], eps)
        xq = (x @ w["attention.wq"].T).view(bsz, seqlen, n_heads, hd)
        xk = (x @ w["attention.wk"].T).view(bsz, seqlen, n_kv, hd)
        xv = (x @ w["attention.wv"].T).view(bsz, seqlen, n_kv, hd)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys, values = repeat_kv(xk, n_heads // n_kv), repeat_kv(xv, n_heads // n_kv)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = xq @ keys.transpose(2, 3) / math.sqrt(hd) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        attn = (scores @ values).transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + attn @ w["attention.wo"].T
        x = rms_norm(h, w["ffn_norm"], eps)
        h = h + (F.silu(x @ w["feed_forward.w1"].T) * (x @ w["feed_forward.w3"].T)) @ w["feed_forward.w2"].T
    return rms_norm(h, weights["norm.weight"], eps) @ weights["output.weight"].T


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def _load_hf(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize(
    ("params", "num_shards"), [(MHA_PARAMS, 2), (GQA_PARAMS, 2), (MHA_PARAMS, 1)], ids=["mha-2", "gqa-2", "mha-1"]
)
def test_converted_model_matches_meta_reference(tmp_path, spm_model_path, params, num_shards):
    weights = random_meta_weights(params)
    src = write_meta_checkpoint(tmp_path / "meta", params, weights, num_shards, spm_model_path)
    out = convert_meta_llama(src, tmp_path / "hf", dtype="float32")

    config = json.loads((out / "config.json").read_text())
    n_heads = params["n_heads"]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == VOCAB  # params.json says -1: taken from the tokenizer
    assert config["intermediate_size"] == _hidden(params) == ffn_hidden_size(
        params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")
    )
    assert config["num_attention_heads"] == n_heads
    assert config["num_key_value_heads"] == params.get("n_kv_heads", n_heads)
    assert config["rms_norm_eps"] == params["norm_eps"]
    assert config["max_position_embeddings"] == 4096
    assert config["rope_parameters"]["rope_theta"] == params.get("rope_theta", 10000.0)
    assert config["tie_word_embeddings"] is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    model = _load_hf(out)
    tokens = _tokens()
    expected = meta_reference_logits(weights, params, tokens)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    # The q/k permutation matters: Meta's unpermuted wq/wk in HF's layout change the logits well beyond tolerance.
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(weights["layers.0.attention.wq.weight"])
        model.model.layers[0].self_attn.k_proj.weight.copy_(weights["layers.0.attention.wk.weight"])
        assert (model(input_ids=tokens).logits - expected).abs().max() > 1e-2


def test_state_dict_helpers_agree_with_converted_files(tmp_path, spm_model_path):
    weights = random_meta_weights(GQA_PARAMS, seed=3)
    src = write_meta_checkpoint(tmp_path / "meta", GQA_PARAMS, weights, 2, spm_model_path)
    files, shards = load_meta_shards(src)
    assert [f.name for f in files] == ["consolidated.00.pth", "consolidated.01.pth"]
    state = meta_to_hf_state_dict(shards, read_params(src), files=files)
    # Unsplit weights round-trip exactly: wv (column), wo/w2 (row), the embedding (split on dim 1), norms.
    torch.testing.assert_close(state["model.embed_tokens.weight"], weights["tok_embeddings.weight"], rtol=0, atol=0)
    pairs = {
        "model.layers.1.self_attn.o_proj.weight": "layers.1.attention.wo.weight",
        "model.layers.1.mlp.down_proj.weight": "layers.1.feed_forward.w2.weight",
        "model.layers.0.self_attn.v_proj.weight": "layers.0.attention.wv.weight",
        "model.layers.0.mlp.up_proj.weight": "layers.0.feed_forward.w3.weight",
        "model.layers.1.post_attention_layernorm.weight": "layers.1.ffn_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for hf_name, meta_name in pairs.items():
        torch.testing.assert_close(state[hf_name], weights[meta_name], rtol=0, atol=0)
    assert "rope.freqs" not in state and len(state) == 3 + 9 * GQA_PARAMS["n_layers"]


def test_legacy_non_zip_shards_are_read_without_mmap(tmp_path, spm_model_path):
    # Files in torch's pre-1.6 format cannot be memory-mapped: they are read into memory instead.
    weights = random_meta_weights(MHA_PARAMS, seed=4)
    src = write_meta_checkpoint(tmp_path / "meta", MHA_PARAMS, weights, 2, spm_model_path)
    for path in src.glob("consolidated.*.pth"):
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    _, shards = load_meta_shards(src)
    torch.testing.assert_close(torch.cat([s["output.weight"] for s in shards]), weights["output.weight"])
    out = convert_meta_llama(src, tmp_path / "hf", dtype="float32")
    with torch.no_grad():
        logits = _load_hf(out)(input_ids=_tokens()).logits
    torch.testing.assert_close(logits, meta_reference_logits(weights, MHA_PARAMS, _tokens()), atol=1e-5, rtol=1e-5)


def test_float16_sharded_and_bin_outputs_load(tmp_path, spm_model_path):
    weights = random_meta_weights(MHA_PARAMS, seed=5)
    src = write_meta_checkpoint(tmp_path / "meta", MHA_PARAMS, weights, 2, spm_model_path)
    ref = convert_meta_llama(src, tmp_path / "fp32", dtype="float32")
    ref_state = _load_hf(ref).state_dict()

    out = convert_meta_llama(src, tmp_path / "fp16", dtype="float16", max_shard_size="60KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref_state) - {k for k in ref_state if "rotary" in k}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    from transformers import LlamaForCausalLM

    fp16 = LlamaForCausalLM.from_pretrained(out)
    assert fp16.dtype == torch.float16
    for name, tensor in fp16.state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name].half(), rtol=0, atol=0)

    # A second conversion into the same folder replaces the earlier weight files instead of mixing with them.
    out = convert_meta_llama(src, tmp_path / "fp16", dtype="bfloat16")
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]

    binary = convert_meta_llama(src, tmp_path / "bin", dtype="float32", safe_serialization=False)
    assert (binary / "pytorch_model.bin").is_file() and not list(binary.glob("*.safetensors"))
    for name, tensor in _load_hf(binary).state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=0)


def test_saved_tokenizer_encodes_like_sentencepiece(tmp_path, spm_model_path):
    from sentencepiece import SentencePieceProcessor

    from mm_llama.model.tokenization_mm_llama import MMLlamaTokenizer

    src = write_meta_checkpoint(tmp_path / "meta", MHA_PARAMS, random_meta_weights(MHA_PARAMS), 1, spm_model_path)
    out = convert_meta_llama(src, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == spm_model_path.read_bytes()
    tokenizer = MMLlamaTokenizer.from_pretrained(out)
    sp = SentencePieceProcessor(model_file=str(spm_model_path))
    for text in ["Hello there  [INST] caf\u00e9 \u4f60\u597d", "Tabs\tand  double  spaces,\nnew <unk> lines 1234"]:
        assert tokenizer.encode_text(text) == sp.encode(text)
        assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_command_finds_tokenizer_in_meta_download_layout(tmp_path, spm_model_path, capsys):
    from mm_llama.cli import main as cli

    # Meta's download: llama/tokenizer.model beside llama/llama-2-7b-chat/{params.json, consolidated.00.pth}.
    root = tmp_path / "llama"
    root.mkdir()
    shutil.copy(spm_model_path, root / "tokenizer.model")
    src = write_meta_checkpoint(root / "llama-2-7b-chat", MHA_PARAMS, random_meta_weights(MHA_PARAMS), 2, None)
    out = tmp_path / "hf"
    argv = ["--input_dir", str(src), "--output_dir", str(out), "--dtype", "bfloat16", "--no_progress"]
    assert cli(["convert-meta", *argv]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # Passing the download root instead of a model folder names the model folders to use.
    assert cli(["convert-meta", "--input_dir", str(root), "--output_dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "params.json" in err and "llama-2-7b-chat" in err

    # An explicit --tokenizer_path that does not exist is reported with the path.
    bad = tmp_path / "nowhere" / "tokenizer.model"
    assert cli(["convert-meta", "--input_dir", str(src), "--output_dir", str(out), "--tokenizer_path", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def meta_dir(tmp_path, spm_model_path) -> Path:
    """A valid 2-shard GQA checkpoint folder with its tokenizer."""
    return write_meta_checkpoint(tmp_path / "meta", GQA_PARAMS, random_meta_weights(GQA_PARAMS), 2, spm_model_path)


def _convert(src: Path, tmp_path: Path, **kwargs) -> Path:
    return convert_meta_llama(src, tmp_path / "out", **kwargs)


def test_missing_params_json(meta_dir, tmp_path):
    (meta_dir / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No params\.json found at .*meta.params\.json"):
        _convert(meta_dir, tmp_path)


def test_no_shards(meta_dir, tmp_path):
    for path in meta_dir.glob("consolidated.*.pth"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"No consolidated\.\*\.pth files in .*meta"):
        _convert(meta_dir, tmp_path)


def test_missing_last_shard(meta_dir, tmp_path):
    (meta_dir / "consolidated.01.pth").unlink()
    with pytest.raises(MetaCheckpointError, match=r"saved as 2 model-parallel shard\(s\).*1 file\(s\) were found"):
        _convert(meta_dir, tmp_path)


def test_gap_in_shard_numbers(meta_dir, tmp_path):
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    with pytest.raises(MetaCheckpointError, match=r"missing consolidated\.01\.pth"):
        _convert(meta_dir, tmp_path)


def test_inconsistent_shapes_across_shards(meta_dir, tmp_path):
    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-8].clone()
    torch.save(shard, meta_dir / "consolidated.01.pth")
    match = r"consolidated\.01\.pth: layers\.1\.feed_forward\.w2\.weight has shape"
    with pytest.raises(MetaCheckpointError, match=match):
        _convert(meta_dir, tmp_path)


def test_replicated_weights_differ_across_shards(meta_dir, tmp_path):
    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1.0
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(MetaCheckpointError, match=r"consolidated\.01\.pth: replicated weight norm\.weight differs"):
        _convert(meta_dir, tmp_path)


def test_params_json_not_matching_shards(meta_dir, tmp_path):
    params = dict(GQA_PARAMS, ffn_dim_multiplier=None)  # 70B-style multiplier dropped: wrong hidden size
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(MetaCheckpointError, match=r"feed_forward\.w1\.weight.*implies .*params\.json belongs"):
        _convert(meta_dir, tmp_path)
    (meta_dir / "params.json").write_text(json.dumps(dict(GQA_PARAMS, n_layers=3)))
    with pytest.raises(MetaCheckpointError, match=r"consolidated\.00\.pth: weights do not match .*n_layers=3.*missing"):
        _convert(meta_dir, tmp_path)


def test_missing_tokenizer(meta_dir, tmp_path):
    (meta_dir / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"No tokenizer\.model found at .*--tokenizer_path"):
        _convert(meta_dir, tmp_path)


def test_tokenizer_of_another_model(meta_dir, tmp_path):
    from conftest import train_tiny_sentencepiece

    other = train_tiny_sentencepiece(tmp_path / "other", vocab_size=340)
    with pytest.raises(MetaCheckpointError, match=r"has 340 tokens but the embeddings .* have 320 rows"):
        _convert(meta_dir, tmp_path, tokenizer_path=other)


def test_bad_arguments(meta_dir, tmp_path):
    with pytest.raises(ValueError, match="Unknown dtype .float8.; use float32, bfloat16 or float16"):
        _convert(meta_dir, tmp_path, dtype="float8")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="Cannot parse size"):
        parse_size("lots")


def test_ffn_hidden_size_of_llama2_models():
    assert ffn_hidden_size(4096, 256) == 11008  # 7B
    assert ffn_hidden_size(5120, 256) == 13824  # 13B
    assert ffn_hidden_size(8192, 4096, 1.3) == 28672  # 70B
