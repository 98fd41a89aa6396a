"""Tiny stand-ins for the real checkpoints, each written in the real checkpoint's on-disk format so that the real
loading code runs on them:

- `train_tokenizer`: a sentencepiece BPE `tokenizer.model` with LLaMA's settings (the one tokenizer trainer of the
  project: the demo, the tests and the training benchmark use it).
- `pretrain_tiny_llama`: a 0.17M-parameter LLaMA pre-trained on the corpus text (it stands in for LLaMA-2-chat,
  which already knows language and how to answer questions), saved as Meta's `consolidated.00.pth` +
  `params.json` + `tokenizer.model`; the demo converts it with the real converter. Its pre-training includes chats
  whose media placeholders hold a "scene code" (`SceneCodes`), so that it can read content from a vector at the
  placeholder, as a 7B model can and a tiny one cannot unaided: that is what lets stage 1 (LLM frozen) work.
- `pretrain_tiny_imagebind`: a tiny ImageBind vision encoder saved as a flat state dict in the key layout of Meta's
  `imagebind_huge.pth`; the demo converts it with the real converter. A random-init encoder separates colours but
  hardly sizes, shapes or motion, whereas the real ImageBind was pre-trained on web-scale data. So the stand-in is
  pre-trained briefly on its OWN synthetic media (never the demo corpus), each after a random JPEG / H.264 round
  trip (`codec_noise`), to predict the attributes of a scene from its 1024-d embedding; the attribute heads are
  then thrown away and only the encoder is kept.

The two stand-ins never see each other: the LLaMA never sees pixels or ImageBind embeddings, the ImageBind never
sees the LLaMA's codes. Mapping one onto the other is what stages 1 and 2 learn.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .corpus import (
    SCENE_ATTRIBUTES,
    VIDEO_FPS,
    VIDEO_FRAMES,
    ImageScene,
    VideoScene,
    render_image,
    render_video_frames,
    sample_image_scene,
    sample_video_scene,
    scene_attributes,
    write_mp4,
)

ProgressFn = Callable[[int, int, dict], None]  # (step, total, metrics) -> None


# ================================================================================================ tokenizer
def train_tokenizer(text: str | os.PathLike | Iterable[str], output_dir: str | os.PathLike,
                    vocab_size: int = 512) -> Path:
    """Trains a BPE sentencepiece model with Meta's LLaMA settings; writes `output_dir/tokenizer.model`, returns it.

    `text` is a text file (one sentence per line) or an iterable of lines. LLaMA's settings: BPE, byte fallback
    (256 byte pieces, so any text encodes), digits split, unk=0 "<unk>", bos=1 "<s>", eos=2 "</s>", no pad,
    identity normalisation, whitespace kept, dummy prefix. Deterministic for the same lines and vocabulary size.
    """
    import sentencepiece as spm

    if isinstance(text, (str, os.PathLike)):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file to train the tokenizer on.")
        with path.open(encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        lines = list(text)
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError("The tokenizer's training text is empty; give at least one non-blank line.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
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

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    multiple_of: int = 32
    norm_eps: float = 1e-5

    def params_json(self) -> dict:
        # vocab_size -1: "defined by the tokenizer", as in Meta's LLaMA-2 params.json files.
        return {**asdict(self), "vocab_size": -1}


def _unpermute_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF `q_proj`/`k_proj` rows -> Meta's interleaved rotary layout: the inverse of the converter's own
    `permute_for_rotate_half`, read off by permuting row numbers with it."""
    from mm_llama.conversion.meta_llama import permute_for_rotate_half

    rows = torch.arange(weight.shape[0], dtype=torch.float64).unsqueeze(1)
    order = permute_for_rotate_half(rows, n_heads).squeeze(1).long()  # HF row r is Meta row order[r]
    meta = torch.empty_like(weight)
    meta[order] = weight
    return meta


# Meta name -> HF name of the weights outside the layers: `iter_hf_weights` (conversion/meta_llama.py) names these three
# inline rather than in a table, so they are restated here; the round-trip test checks them against the converter.
_META_TO_HF_OUTSIDE_LAYERS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                              "output.weight": "lm_head.weight"}


def hf_llama_to_meta_state_dict(model, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` state dict in Meta's `consolidated.00.pth` names and layout (one model-parallel rank):
    the inverse of the converter, built from its own layer-name table and rotary permutation."""
    from mm_llama.conversion.meta_llama import HF_LAYER_NAMES as META_TO_HF_LAYER_NAMES

    hf = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    meta = {meta_name: hf[hf_name] for meta_name, hf_name in _META_TO_HF_OUTSIDE_LAYERS.items()}
    for i in range(model.config.num_hidden_layers):
        for meta_name, hf_name in META_TO_HF_LAYER_NAMES.items():
            weight = hf[f"model.layers.{i}.{hf_name}.weight"]
            if meta_name == "attention.wq":
                weight = _unpermute_rotate_half(weight, n_heads)
            elif meta_name == "attention.wk":
                weight = _unpermute_rotate_half(weight, n_kv_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = weight.contiguous()
    return meta


class SceneCodes(nn.Module):
    """The stand-in LLaMA's pre-training "media": one learned vector per attribute value of `SCENE_ATTRIBUTES`; a
    scene's code is the sum of its attributes' vectors (`corpus.scene_attributes`: a still image has kind, colour,
    shape, background and size; a clip that changes colour has kind, colour, new colour, shape and background).

    Why: a 7B chat model can read content from a vector in its input space that it was never trained on; a tiny
    model cannot. Pre-training with a code at each media placeholder, in chats whose answers only the code can give,
    teaches it to read one, so that stage 1 (LLM frozen) has a target: map ImageBind's embedding to a vector the
    model reads as the scene. The table is thrown away after pre-training; stages 1 and 2 never see it."""

    def __init__(self, dim: int, init_std: float = 0.02):
        super().__init__()
        self.offsets: dict[str, int] = {}
        total = 0
        for name, values in SCENE_ATTRIBUTES.items():
            self.offsets[name] = total
            total += len(values)
        self.table = nn.EmbeddingBag(total, dim, mode="sum")
        nn.init.normal_(self.table.weight, std=init_std)

    def indices(self, scene: dict[str, str]) -> list[int]:
        """Table rows of a scene (`corpus.scene_attributes`); a value outside the vocabulary is an error."""
        try:
            return [self.offsets[name] + SCENE_ATTRIBUTES[name].index(value) for name, value in scene.items()]
        except (KeyError, ValueError) as error:
            raise ValueError(f"Scene {scene} has an attribute or value outside SCENE_ATTRIBUTES ({error}).") from None

    def forward(self, scenes: list[list[int]]) -> torch.Tensor:
        """`[len(scenes), dim]` codes of scenes given as lists of table rows."""
        device = self.table.weight.device
        flat = torch.tensor([row for scene in scenes for row in scene], device=device)
        offsets = torch.tensor([0] + [len(scene) for scene in scenes[:-1]], device=device).cumsum(0)
        return self.table(flat, offsets)


Encoded = tuple[list[int], list[int], list[list[int]]]  # (input ids, labels, scene-code rows per placeholder)


def _encode_pretraining_item(item: dict, processor, codes: SceneCodes, prompt_loss_weight: float = 1.0) -> Encoded:
    """Token ids, labels and the scene-code rows of each media placeholder (in order) of one pre-training item.

    Chats are encoded by `MMLlamaProcessor` exactly as at chat time (the LLaMA-2 format, media markers and
    placeholders included), by default with a loss on every text token, as in pre-training (0: answers only);
    plain text is `<s> text </s>`."""
    tokenizer = processor.tokenizer
    if "messages" in item:
        encoded = processor.encode_conversation(item, prompt_loss_weight=prompt_loss_weight)
        return encoded.input_ids, encoded.labels, [codes.indices(media["scene"]) for media in encoded.media]
    ids = [tokenizer.bos_token_id] + tokenizer.encode_text(item["text"]) + [tokenizer.eos_token_id]
    return ids, [-100] + ids[1:], []


def _batch(examples: list[Encoded], pad_id: int,
           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """(input_ids, attention_mask, labels `[batch, seq]`, scenes in placeholder order) of encoded examples,
    right-padded."""
    length = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in examples], device=device)
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab, _ in examples], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in examples],
                                  device=device)
    return input_ids, attention_mask, labels, [scene for _, _, scenes in examples for scene in scenes]


def _length_grouped_batches(examples: list[Encoded], batch_size: int,
                            rng: random.Random) -> Iterator[list[Encoded]]:
    """Endless batches of examples of similar length, in random order, every example once per pass.

    Why: chats run from 10 to 100+ tokens; random batches padded to their longest member spent half of each step
    on padding (measured: mean 46 tokens, batches padded to ~100)."""
    while True:
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield [examples[i] for i in chunk]


@torch.no_grad()
def code_reading_accuracy(model, codes: SceneCodes, examples: list[Encoded], media_token_id: int, pad_id: int,
                          batch_size: int = 64) -> dict[str, float]:
    """Answer-token accuracy of scene-code chats (`examples` encoded with answer-only labels) with each chat's own
    codes, and with the codes of other chats (rotated by one within each batch): the gap is what the model reads
    from the code rather than guesses from the question."""
    model.eval()
    result = {}
    for mode in ("own", "other"):
        correct = total = 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            input_ids, attention_mask, labels, scenes = _batch(chunk, pad_id, model.device)
            if mode == "other":
                scenes = scenes[1:] + scenes[:1]
            embeds = _embed_with_scene_codes(model, codes, input_ids, scenes, media_token_id)
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1]
            targets = labels[:, 1:]
            trained = targets != -100
            correct += int((logits.argmax(-1)[trained] == targets[trained]).sum())
            total += int(trained.sum())
        result[f"answer_token_accuracy_{mode}_codes"] = correct / max(total, 1)
    model.train()
    return result


def _embed_with_scene_codes(model, codes: SceneCodes, input_ids: torch.Tensor, scenes: list[list[int]],
                            media_token_id: int, noise: float = 0.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Input embeddings [batch, seq, hidden] with the scene codes at the media placeholders (row-major order, as
    the MM-LLaMA model fills them). With `noise` > 0 each code gets Gaussian noise of std u * noise * rms(code),
    u ~ U(0, 1) per code, so that the model reads codes robustly (stage 1's projector only approximates them)."""
    inputs_embeds = model.get_input_embeddings()(input_ids)
    mask = input_ids == media_token_id
    if int(mask.sum()) != len(scenes):
        raise ValueError(f"{int(mask.sum())} media placeholders but {len(scenes)} scene codes.")
    if not scenes:
        return inputs_embeds
    vectors = codes(scenes)
    if noise > 0:
        rms = vectors.detach().pow(2).mean(-1, keepdim=True).sqrt()
        level = torch.rand(len(scenes), 1, generator=generator) * noise
        vectors = vectors + torch.randn(vectors.shape, generator=generator).to(vectors.device) * rms * level.to(vectors.device)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), vectors.to(inputs_embeds.dtype))


def pretrain_tiny_llama(
    pretrain_jsonl: str | Path,
    tokenizer_model: str | Path,
    output_dir: str | Path,
    *,
    spec: TinyLlamaSpec | None = None,
    steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    code_learning_rate_factor: float = 10.0,
    code_noise: float = 0.5,
    held_out: int = 200,
    codes_file: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    on_step: ProgressFn | None = None,
) -> dict:
    """Pre-trains a tiny LLaMA on the corpus text (scene-code chats included, see `SceneCodes`) and writes it in
    Meta's format to `output_dir` (`consolidated.00.pth`, `params.json`, `tokenizer.model`). Returns a summary
    (final loss, parameters, time, and the answer-token accuracy of held-out scene-code chats with their own codes
    and with other chats' codes: the gap is what the model reads from the code).

    What made the model read codes within the demo's budget (measured on held-out chats, answer words only): with
    LLaMA's 0.02 init, a 128-wide 4-layer model and 32-chat batches it read background and size after ~500 steps
    but colour stayed at chance after 800; the code table collapsed (cosine 0.6-0.8 between colours). Now: init
    std 1/sqrt(width) (the largest effect: colour, background, size and motion all read within ~800 steps, every
    seed tried), a 64-wide 2-layer model with 2 heads (4x cheaper steps, 16-chat batches), a code table that learns
    10x faster than the model, and batches of chats of similar length (half of each step was padding before). The
    model's reading of codes decides whether stage 1 works: with 1000 steps some seeds read only 96-97% of held-out
    answer tokens and their stage 1 reached 23-57% on image colour; with 1600 steps the six seeds tried read >= 98%
    and stage 1 reached 60-100% (smoke data) and 95-100% (full data). `code_noise` makes it read codes approximately, as stage 1's projector produces them.

    The model is built from the params.json fields with the converter's own `llama_config_from_params`, so that the
    Meta checkpoint written here converts back to exactly the trained model.
    """
    from transformers import LlamaForCausalLM

    from mm_llama import MMLlamaProcessor, MMLlamaTokenizer
    from mm_llama.conversion.meta_llama import MetaLlamaParams, llama_config_from_params

    started = time.monotonic()
    spec = spec or TinyLlamaSpec()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = MMLlamaTokenizer(vocab_file=str(tokenizer_model))
    processor = MMLlamaProcessor(tokenizer=tokenizer)
    params = MetaLlamaParams.from_dict(spec.params_json())
    config = llama_config_from_params(params, tokenizer.vocab_size, max_position_embeddings=512, dtype="float32")
    # Initial weights of std 1/sqrt(width) instead of LLaMA's 0.02 (tuned for width 4096): at 0.02 a 64-wide model
    # learned to read each attribute of the code only after a long plateau, one attribute at a time, and which ones
    # it had learned by the end varied with the seed (measured: colour or background still at chance after 2000
    # steps); at 1/sqrt(width) it reads all of them within ~800 steps. Only pre-training uses this value.
    config.initializer_range = config.hidden_size ** -0.5
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    codes = SceneCodes(config.hidden_size, init_std=config.initializer_range).to(device)
    with open(pretrain_jsonl, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    if not items:
        raise ValueError(f"{pretrain_jsonl} holds no pre-training items.")
    # The last scene-code chats are held out to measure how well the model reads codes (answer tokens only).
    with_media = [i for i, item in enumerate(items) if item.get("media")]
    held_out_ids = set(with_media[-held_out:]) if held_out and len(with_media) > 2 * held_out else set()
    examples = [_encode_pretraining_item(item, processor, codes) for i, item in enumerate(items)
                if i not in held_out_ids]
    held_out_examples = [_encode_pretraining_item(items[i], processor, codes, prompt_loss_weight=0.0)
                         for i in sorted(held_out_ids)]

    parameters = list(model.parameters()) + list(codes.parameters())
    # The code table learns 10x faster than the model (measured: reading emerged earlier and more reliably).
    optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                   {"params": list(codes.parameters()), "lr": learning_rate * code_learning_rate_factor}],
                                  lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.eos_token_id
    batches = _length_grouped_batches(examples, batch_size, rng)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        input_ids, attention_mask, labels, scenes = _batch(next(batches), pad_id, device)
        inputs_embeds = _embed_with_scene_codes(model, codes, input_ids, scenes, processor.media_token_id,
                                                noise=code_noise, generator=generator)
        loss = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if on_step is not None:
            on_step(step + 1, steps, {"loss": loss_value})
    reading = (code_reading_accuracy(model, codes, held_out_examples, processor.media_token_id, pad_id)
               if held_out_examples else {})

    model = model.cpu().eval()
    if codes_file is not None:  # for diagnostics only (e.g. how close stage 1's projector gets to the codes)
        torch.save({"table": codes.table.weight.detach().cpu(), "attributes": SCENE_ATTRIBUTES}, codes_file)
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
        "held_out_code_chats": len(held_out_examples),
        **reading,
    }


# ================================================================================================ tiny ImageBind
IMAGEBIND_IMAGE_SIZE = 84  # 6 x 6 patches of 14 px: enough for colours, sizes and a change between frames


def imagebind_to_meta_state_dict(model) -> dict[str, torch.Tensor]:
    """An `ImageBindVisionModel` state dict in the flat key layout of Meta's `imagebind_huge.pth` (vision keys):
    the inverse of the converter, read off its own key list (`official_vision_shapes`) and key mapping, where a
    stacked `attn.in_proj_*` key is the concatenation of the HF keys it maps to (q, k, v in that order)."""
    from mm_llama.imagebind.conversion_imagebind import vision_hf_keys as official_to_hf_keys
    from mm_llama.imagebind.conversion_imagebind import official_vision_shapes

    hf = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    meta = {}
    for official in official_vision_shapes(model.config):
        parts = [hf[key] for key in official_to_hf_keys(official)]
        meta[official] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return meta


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


def _labels(scene: ImageScene | VideoScene) -> list[int]:
    """Class index per attribute of `SCENE_ATTRIBUTES`, -1 where the attribute does not apply."""
    given = scene_attributes(scene)
    return [(values.index(given[name]) if name in given else -1) for name, values in SCENE_ATTRIBUTES.items()]


def _jpeg_round_trip(frames: np.ndarray, quality: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8 frames after JPEG compression at `quality` (4:2:0 chroma, as PIL's default)."""
    from PIL import Image

    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def h264_round_trip(frames: np.ndarray, crf: int, fps: int = VIDEO_FPS) -> np.ndarray:
    """`[T, H, W, 3]` uint8 frames after H.264 (libx264, yuv420p, `crf`) encoding and decoding with PyAV."""
    import av

    buffer = io.BytesIO()
    write_mp4(frames, buffer, fps=fps, crf=crf)
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def codec_noise(frames: np.ndarray, rng: random.Random, video: bool) -> np.ndarray:
    """A random lossy round trip of `[T, H, W, 3]` uint8 frames, so that the stand-in encoder does not depend on one
    codec build: JPEG at quality 30-95 (images, and half of the clips' frames), H.264 at CRF 10-35 (the other half
    of the clips), then a small per-channel gain (+-6%) and offset (+-6 levels), which covers the colour shifts of
    different RGB <-> YUV conversions."""
    if video and rng.random() < 0.25:
        frames = h264_round_trip(frames, crf=rng.randint(10, 35))
    else:
        frames = _jpeg_round_trip(frames, quality=rng.randint(30, 95))
    gain = np.array([rng.uniform(0.94, 1.06) for _ in range(3)], dtype=np.float32)
    offset = np.array([rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    return np.clip(frames.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def _stand_in_examples(count: int, seed: int, image_size: int,
                       noise: bool = True) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(pixels [3, 2, S, S], labels) of freshly drawn scenes after a random codec round trip (`codec_noise`),
    preprocessed by the real ImageBind transforms: images with `load_image` (then repeated to 2 frames, as the model
    does), clips with `load_video` on their first and last frame (what ImageBind samples from a 2 s clip)."""
    from mm_llama.imagebind import load_image, load_video

    rng = random.Random(f"imagebind-stand-in-{seed}")
    for i in range(count):
        if i % 2 == 0:
            scene = sample_image_scene(rng)
            pixels = np.asarray(render_image(scene, seed=rng.getrandbits(32)))[None]
            pixels = codec_noise(pixels, rng, video=False)[0] if noise else pixels[0]
            yield load_image(pixels, image_size=image_size).unsqueeze(1).expand(-1, 2, -1, -1), _labels(scene)
        else:
            scene = sample_video_scene(rng, kind=("move", "turn")[(i // 2) % 2])
            frames = render_video_frames(scene, seed=rng.getrandbits(32), indices=[0, VIDEO_FRAMES - 1])
            frames = codec_noise(frames, rng, video=True) if noise else frames
            # Two frames at 1 fps = a 2 s clip whose frames ImageBind keeps: both.
            yield load_video(frames, image_size=image_size, num_clips=1, num_crops=1, fps=1.0)[0], _labels(scene)


def pretrain_tiny_imagebind(
    output_file: str | Path,
    *,
    image_size: int = IMAGEBIND_IMAGE_SIZE,
    held_out_examples: int = 400,
    training_examples: int = 4000,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config_overrides: dict | None = None,
    on_step: ProgressFn | None = None,
) -> dict:
    """Pre-trains the "tiny" ImageBind preset on its own synthetic scenes (after random codec round trips) to
    predict every attribute of `SCENE_ATTRIBUTES` from its embedding, and saves it to `output_file` as a flat `.pth`
    state dict in Meta's key layout. Returns a summary (held-out attribute accuracies of the pre-training heads,
    which are not saved, time)."""
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
                           for name, classes in SCENE_ATTRIBUTES.items()}).to(device)
    def batch_of(examples: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([p for p, _ in examples]), torch.tensor([lab for _, lab in examples])

    # A pool of `training_examples` scenes drawn once, batches sampled from it: drawing a scene with its codec round
    # trip costs ~2.5 ms, more than the model's step per example (measured at 84 px: 2.4 ms vs 0.55 ms), so fresh
    # scenes for every batch would make drawing most of the time. The held-out scenes come from another stream.
    pool = list(_stand_in_examples(training_examples, seed, image_size))
    held_out_pixels, held_out_labels = batch_of(list(_stand_in_examples(held_out_examples, seed + 10_000, image_size)))
    rng = random.Random(seed)
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
        pixels, target = batch_of([pool[rng.randrange(len(pool))] for _ in range(batch_size)])
        out, target = logits_of(pixels), target.to(device)
        loss = sum(nn.functional.cross_entropy(out[name], target[:, k], ignore_index=-1)
                   for k, name in enumerate(SCENE_ATTRIBUTES) if (target[:, k] >= 0).any())
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, steps, {"loss": loss.item()})

    model.eval()
    accuracy = {}
    with torch.no_grad():
        out, target = logits_of(held_out_pixels), held_out_labels.to(device)
        for k, name in enumerate(SCENE_ATTRIBUTES):
            mask = target[:, k] >= 0
            if mask.any():
                accuracy[name] = (out[name][mask].argmax(-1) == target[mask, k]).float().mean().item()
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(imagebind_to_meta_state_dict(model.cpu()), output_file)
    return {"held_out_attribute_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": image_size, "training_examples": training_examples, "held_out_examples": held_out_examples,
            "steps": steps,
            "seconds": time.monotonic() - started, "path": str(output_file)}


__all__ = [
    "IMAGEBIND_IMAGE_SIZE", "SceneCodes", "TinyLlamaSpec", "code_reading_accuracy", "codec_noise",
    "h264_round_trip", "hf_llama_to_meta_state_dict", "imagebind_to_meta_state_dict", "pretrain_tiny_imagebind",
    "pretrain_tiny_llama", "train_tokenizer",
]
