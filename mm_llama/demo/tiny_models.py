"""Tiny stand-ins for the real checkpoints, each written in the real checkpoint's on-disk format so that the real
loading code runs on them:

- `train_tokenizer`: a sentencepiece BPE `tokenizer.model` trained on the corpus text with LLaMA's settings.
- `pretrain_tiny_llama`: a tiny LLaMA pre-trained on the corpus text (it stands in for LLaMA-2-chat, which already
  knows language and how to answer questions), saved as Meta's `consolidated.00.pth` + `params.json` +
  `tokenizer.model`; the demo converts it with `scripts/convert_meta_checkpoint.py`.
- `pretrain_tiny_imagebind`: a tiny ImageBind vision encoder saved as a flat state dict in the key layout of Meta's
  `imagebind_huge.pth`; the demo converts it with `scripts/convert_imagebind_checkpoint.py`. A random-init encoder
  separates colours but hardly shapes or motion (measured: linear-probe accuracy 0.43 on shapes, 0.31 on
  directions, chance 0.33 / 0.25), whereas the real ImageBind was pre-trained on web-scale data and does. So the
  stand-in is pre-trained briefly on its OWN synthetic media (never the demo corpus) to predict the attributes of a
  scene from its 1024-d embedding; the attribute heads are then thrown away and only the encoder is kept.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .corpus import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    VIDEO_FRAMES,
    render_image,
    render_video_frames,
    sample_image_scene,
    sample_video_scene,
)

ProgressFn = Callable[[int, int, dict], None]  # (step, total, metrics) -> None


# ================================================================================================ tokenizer
def train_tokenizer(text_file: str | Path, output_dir: str | Path, vocab_size: int = 512) -> Path:
    """Trains a BPE sentencepiece model with Meta's LLaMA settings on `text_file`; returns `tokenizer.model`.

    LLaMA's settings: BPE, byte fallback (256 byte pieces, so any text encodes), digits split, unk=0 "<unk>",
    bos=1 "<s>", eos=2 "</s>", no pad, identity normalisation, whitespace kept, dummy prefix.
    """
    import sentencepiece as spm

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    with open(text_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, max_sentence_length=8192, minloglevel=2,
    )
    path = output_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


# ================================================================================================ tiny LLaMA
@dataclass
class TinyLlamaSpec:
    """Meta `params.json` fields of the stand-in LLaMA (LLaMA-2-7B: dim 4096, 32 layers, 32 heads, multiple_of 256)."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    multiple_of: int = 32
    norm_eps: float = 1e-5

    def params_json(self) -> dict:
        # vocab_size -1: "defined by the tokenizer", as in Meta's LLaMA-2 params.json files.
        return {**asdict(self), "vocab_size": -1}


def _inverse_rotate_half_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF `q_proj`/`k_proj` rows -> Meta's interleaved rotary layout (the inverse of the converter's permutation)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_llama_to_meta_state_dict(model, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` state dict in Meta's `consolidated.00.pth` names and layout (one model-parallel rank)."""
    hf = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(model.config.num_hidden_layers):
        for hf_name, meta_name in names.items():
            weight = hf[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                weight = _inverse_rotate_half_permutation(weight, n_heads)
            elif hf_name == "self_attn.k_proj":
                weight = _inverse_rotate_half_permutation(weight, n_kv_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = weight.contiguous()
    return meta


def _encode_pretraining_item(item: dict, processor) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and soft-caption ids of one pre-training item. Chats are encoded by `MMLlamaProcessor`
    exactly as at chat time (the LLaMA-2 format, media markers and placeholder included), with a loss on every text
    token, as in pre-training; plain text is `<s> text </s>`. The soft-caption ids (empty without one) are the
    caption whose mean token embedding fills the media placeholder."""
    tokenizer = processor.tokenizer
    if "messages" in item:
        encoded = processor.encode_conversation(item, prompt_loss_weight=1.0)
        soft_caption = tokenizer.encode_text(item["soft_caption"]) if item.get("soft_caption") else []
        return encoded.input_ids, encoded.labels, soft_caption
    ids = [tokenizer.bos_token_id] + tokenizer.encode_text(item["text"]) + [tokenizer.eos_token_id]
    return ids, [-100] + ids[1:], []


def _embed_with_soft_captions(model, input_ids: torch.Tensor, soft_captions: list[list[int]],
                              media_token_id: int) -> torch.Tensor:
    """Input embeddings [batch, seq, hidden] where each row's media placeholder holds the mean embedding of that
    row's soft caption (the embedding table is trained through it)."""
    embed = model.get_input_embeddings()
    inputs_embeds = embed(input_ids)
    rows = [row for row, caption in enumerate(soft_captions) if caption]
    if not rows:
        return inputs_embeds
    vectors = torch.stack([embed(torch.tensor(soft_captions[row], device=input_ids.device)).mean(0) for row in rows])
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[rows] = input_ids[rows] == media_token_id
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), vectors.to(inputs_embeds.dtype))


def pretrain_tiny_llama(
    pretrain_jsonl: str | Path,
    tokenizer_model: str | Path,
    output_dir: str | Path,
    *,
    spec: TinyLlamaSpec | None = None,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    on_step: ProgressFn | None = None,
) -> dict:
    """Pre-trains a tiny LLaMA on the corpus text and writes it in Meta's format to `output_dir`
    (`consolidated.00.pth`, `params.json`, `tokenizer.model`). Returns a summary (final loss, parameters, time).

    The model is built from the params.json fields with the converter's own `llama_config_from_params`, so that the
    Meta checkpoint written here converts back to exactly the trained model.
    """
    from mm_llama import MMLlamaProcessor, MMLlamaTokenizer
    from mm_llama.conversion.meta_llama import MetaLlamaParams, llama_config_from_params
    from transformers import LlamaForCausalLM

    started = time.monotonic()
    spec = spec or TinyLlamaSpec()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = MMLlamaTokenizer(vocab_file=str(tokenizer_model))
    processor = MMLlamaProcessor(tokenizer=tokenizer)
    with open(pretrain_jsonl, encoding="utf-8") as f:
        examples = [_encode_pretraining_item(json.loads(line), processor) for line in f if line.strip()]
    if not examples:
        raise ValueError(f"{pretrain_jsonl} holds no pre-training items.")

    params = MetaLlamaParams.from_dict(spec.params_json())
    config = llama_config_from_params(params, tokenizer.vocab_size, max_position_embeddings=512, dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    pad_id = tokenizer.eos_token_id
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        length = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in batch], device=device)
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab, _ in batch], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in batch],
                                      device=device)
        inputs_embeds = _embed_with_soft_captions(model, input_ids, [soft for _, _, soft in batch],
                                                  processor.media_token_id)
        loss = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if on_step is not None:
            on_step(step + 1, steps, {"loss": loss_value})

    model = model.cpu().eval()
    torch.save(hf_llama_to_meta_state_dict(model, params.n_heads, params.n_kv_heads), output_dir / "consolidated.00.pth")
    (output_dir / "params.json").write_text(json.dumps(spec.params_json(), indent=2) + "\n")
    (output_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return {
        "final_loss": loss_value,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": tokenizer.vocab_size,
        "examples": len(examples),
        "steps": steps,
        "seconds": time.monotonic() - started,
        "path": str(output_dir),
    }


# ================================================================================================ tiny ImageBind
IMAGEBIND_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px: a big enough grid for position and motion, cheap on a CPU

# Attribute heads of the stand-in's pre-training: name -> classes. A label of -1 means "does not apply".
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),       # image colour / a clip's first colour
    "new_colour": tuple(COLOURS),   # colour a "turn" clip ends with
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "direction": DIRECTIONS,
    "kind": ("still", "move", "turn"),
}


def imagebind_to_meta_state_dict(model) -> dict[str, torch.Tensor]:
    """An `ImageBindVisionModel` state dict in the flat key layout of Meta's `imagebind_huge.pth` (vision keys).

    The inverse of the converter's mapping: q/k/v are stacked into `attn.in_proj_*` (in that order, as
    `nn.MultiheadAttention` stores them) and the HF names are mapped back to `modality_*.vision.*`."""
    hf = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    pre, trunk, head = "modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision."
    meta = {
        pre + "cls_token": hf["embeddings.class_embedding"],
        pre + "rgbt_stem.proj.1.weight": hf["embeddings.patch_embedding.weight"],
        pre + "pos_embedding_helper.pos_embed": hf["embeddings.position_embedding"],
        trunk + "pre_transformer_layer.0.weight": hf["pre_layernorm.weight"],
        trunk + "pre_transformer_layer.0.bias": hf["pre_layernorm.bias"],
        head + "0.weight": hf["head_layernorm.weight"],
        head + "0.bias": hf["head_layernorm.bias"],
        head + "2.weight": hf["visual_projection.weight"],
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"{trunk}blocks.{i}."
        for kind in ("weight", "bias"):
            meta[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [hf[src + f"self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")], dim=0)
            meta[dst + f"attn.out_proj.{kind}"] = hf[src + f"self_attn.out_proj.{kind}"]
            meta[dst + f"norm_1.{kind}"] = hf[src + f"layer_norm1.{kind}"]
            meta[dst + f"norm_2.{kind}"] = hf[src + f"layer_norm2.{kind}"]
            meta[dst + f"mlp.fc1.{kind}"] = hf[src + f"mlp.fc1.{kind}"]
            meta[dst + f"mlp.fc2.{kind}"] = hf[src + f"mlp.fc2.{kind}"]
    return meta


# Shape and motion are harder for a small ViT than colour (which the mean pixel already gives away): weigh them up.
_ATTRIBUTE_WEIGHTS: dict[str, float] = {"shape": 3.0, "direction": 3.0}


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """`[1, 1 + grid*grid, dim]` 2-D sine-cosine position embedding (MAE's fixed init; the class position is 0).

    Why: the stem's patch features are ~100x larger than the default 0.02-std random position embedding, so after
    the pre-trunk LayerNorm a short training cannot find where things are (measured: direction of motion stayed at
    chance). Starting from positions of unit scale makes "where" as easy to read as "what colour"."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega),
             torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega)]
    table = torch.cat(parts, dim=1)
    table = torch.cat([table, torch.zeros(grid * grid, dim - table.shape[1])], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)


def _labels(**given: str) -> list[int]:
    return [(_ATTRIBUTES[name].index(given[name]) if name in given else -1) for name in _ATTRIBUTES]


def _stand_in_examples(count: int, seed: int, image_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(pixels [3, 2, S, S], labels) of freshly drawn scenes, preprocessed by the real ImageBind transforms: images
    with `load_image` (then repeated to 2 frames, as the model does), clips with `load_video` on their first and last
    frame (what ImageBind samples from a 2 s clip)."""
    from mm_llama.imagebind import load_image, load_video

    rng = random.Random(f"imagebind-stand-in-{seed}")
    for i in range(count):
        if i % 2 == 0:
            scene = sample_image_scene(rng)
            pixels = load_image(render_image(scene, seed=rng.getrandbits(32)), image_size=image_size)
            yield pixels.unsqueeze(1).expand(-1, 2, -1, -1), _labels(
                colour=scene.colour, shape=scene.shape, background=scene.background, size=scene.size, kind="still")
        else:
            scene = sample_video_scene(rng, kind=("move", "turn")[(i // 2) % 2])
            frames = render_video_frames(scene, seed=rng.getrandbits(32), indices=[0, VIDEO_FRAMES - 1])
            # Two frames at 1 fps = a 2 s clip whose frames ImageBind keeps: both.
            views = load_video(frames, image_size=image_size, num_clips=1, num_crops=1, fps=1.0)
            labels = dict(colour=scene.colour, shape=scene.shape, background=scene.background, kind=scene.kind)
            labels.update(direction=scene.direction) if scene.kind == "move" else labels.update(new_colour=scene.new_colour)
            yield views[0], _labels(**labels)


def pretrain_tiny_imagebind(
    output_file: str | Path,
    *,
    image_size: int = IMAGEBIND_IMAGE_SIZE,
    held_out_examples: int = 400,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config_overrides: dict | None = None,
    on_step: ProgressFn | None = None,
) -> dict:
    """Pre-trains the "tiny" ImageBind preset on its own synthetic scenes and saves it to `output_file` as a flat
    `.pth` state dict in Meta's key layout. Returns a summary (held-out attribute accuracies of the pre-training
    heads, which are not saved, time)."""
    from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel

    started = time.monotonic()
    torch.manual_seed(seed)
    # initializer_range 1/sqrt(width) instead of the default 0.02 (tuned for huge's width 1280): at 0.02 a 64-wide
    # ViT starts with almost no signal from the patches into the class token and learns shapes far more slowly.
    overrides = {"initializer_range": 0.125, **(config_overrides or {})}
    config = ImageBindVisionConfig.from_preset("tiny", image_size=image_size, **overrides)
    model = ImageBindVisionModel(config)
    with torch.no_grad():
        grid = config.image_size // config.patch_size
        model.embeddings.position_embedding.copy_(sincos_position_embedding(grid, config.hidden_size))
    model = model.to(device)
    heads = nn.ModuleDict({name: nn.Linear(model.config.projection_dim, len(classes))
                           for name, classes in _ATTRIBUTES.items()}).to(device)
    # Fresh scenes for every batch (drawing one costs ~1 ms), so the encoder cannot memorise a finite set; the
    # held-out scenes come from another random stream.
    def batch_of(stream: Iterator[tuple[torch.Tensor, list[int]]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [next(stream) for _ in range(size)]
        return torch.stack([p for p, _ in examples]), torch.tensor([lab for _, lab in examples])

    train_stream = _stand_in_examples(steps * batch_size, seed, image_size)
    held_out_pixels, held_out_labels = batch_of(_stand_in_examples(held_out_examples, seed + 10_000, image_size),
                                                held_out_examples)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)

    def logits_of(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # The heads read the L2-normalised embedding (scaled up: unit vectors give tiny logits), which is what the
        # MM-LLaMA projector will read.
        embeds = model(batch.to(device, torch.float32), return_dict=True).embeds * 20.0
        return {name: head(embeds) for name, head in heads.items()}

    model.train()
    for step in range(steps):
        pixels, target = batch_of(train_stream, batch_size)
        out, target = logits_of(pixels), target.to(device)
        loss = sum(_ATTRIBUTE_WEIGHTS.get(name, 1.0) * nn.functional.cross_entropy(out[name], target[:, k],
                                                                                    ignore_index=-1)
                   for k, name in enumerate(_ATTRIBUTES) if (target[:, k] >= 0).any())
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, steps, {"loss": loss.item()})

    model.eval()
    accuracy = {}
    with torch.no_grad():
        out, target = logits_of(held_out_pixels), held_out_labels.to(device)
        for k, name in enumerate(_ATTRIBUTES):
            mask = target[:, k] >= 0
            if mask.any():
                accuracy[name] = (out[name][mask].argmax(-1) == target[mask, k]).float().mean().item()
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(imagebind_to_meta_state_dict(model.cpu()), output_file)
    return {"held_out_attribute_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": image_size, "held_out_examples": held_out_examples, "steps": steps,
            "seconds": time.monotonic() - started, "path": str(output_file)}


__all__ = [
    "IMAGEBIND_IMAGE_SIZE", "TinyLlamaSpec", "hf_llama_to_meta_state_dict", "imagebind_to_meta_state_dict",
    "pretrain_tiny_imagebind", "pretrain_tiny_llama", "train_tokenizer",
]
