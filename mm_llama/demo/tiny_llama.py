"""The tiny stand-in for LLaMA-2-chat, written in Meta's checkpoint format so that the real converter runs on it.

`pretrain_tiny_llama`: a 0.17M-parameter LLaMA pre-trained with the HF Trainer on the corpus text (it stands in for
LLaMA-2-chat, which already knows language and how to answer questions), saved as Meta's `consolidated.00.pth` +
`params.json` + `tokenizer.model` (the tokenizer: `mm_llama.testing_utils.train_tokenizer`). Its pre-training
includes chats whose media placeholders hold a "scene code" (`SceneCodes`), so that it can read content from a vector
at the placeholder, as a 7B model can and a tiny one cannot unaided: that is what lets stage 1 (LLM frozen) work.

The stand-in LLaMA never sees pixels or ImageBind embeddings (`tiny_imagebind` never sees its codes): mapping one onto
the other is what stages 1 and 2 learn.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Sampler

from ..testing_utils import train_tokenizer  # noqa: F401  (the demo's tokenizer trainer, re-exported)
from .scenes import SCENE_ATTRIBUTES
from .trainer import ProgressFn, train_steps


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
    scene's code is the sum of its attributes' vectors (`scenes.scene_attributes`: a still image has kind, colour,
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
        """Table rows of a scene (`scenes.scene_attributes`); a value outside the vocabulary is an error."""
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
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """(input_ids, attention_mask, labels `[batch, seq]`, scenes in placeholder order) of encoded examples,
    right-padded."""
    length = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in examples], device=device)
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab, _ in examples], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in examples],
                                  device=device)
    return input_ids, attention_mask, labels, [scene for _, _, scenes in examples for scene in scenes]


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of example indices of similar length, in random order: every example once per pass, a new order
    (drawn from `rng`) each pass.

    Why: chats run from 10 to 100+ tokens; random batches padded to their longest member spent half of each step
    on padding (measured: mean 46 tokens, batches padded to ~100). Why not transformers' `LengthGroupedSampler`: its
    mega-batches give another batch order, hence another stand-in LLaMA than the one the demo's results were
    measured with."""

    def __init__(self, lengths: list[int], batch_size: int, rng: random.Random):
        self.lengths, self.batch_size, self.rng = lengths, batch_size, rng

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], self.rng.random()))
        chunks = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        self.rng.shuffle(chunks)
        yield from chunks


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


# ================================================================================================ pre-training
class SceneCodeReader(nn.Module):
    """What pre-training trains: the LLaMA and the code table, with the (noisy) codes at the media placeholders.
    `forward` takes `_batch`'s fields by name and returns the causal-LM loss, the shape the HF Trainer steps on."""

    def __init__(self, llama, codes: SceneCodes, media_token_id: int, code_noise: float, seed: int):
        super().__init__()
        self.llama, self.codes = llama, codes  # parameter order: the LLaMA's, then the table's
        self.media_token_id, self.code_noise = media_token_id, code_noise
        self.generator = torch.Generator().manual_seed(seed)  # the noise's own stream, independent of the Trainer's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                scenes: list[list[int]]) -> dict[str, torch.Tensor]:
        inputs_embeds = _embed_with_scene_codes(self.llama, self.codes, input_ids, scenes, self.media_token_id,
                                                noise=self.code_noise, generator=self.generator)
        return {"loss": self.llama(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss}


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor at step s: a linear warmup over the first 5% of `steps` (from 1/warmup, not 0) times a
    cosine decay over all `steps`. Why not transformers' "cosine" schedule: it starts at 0 and decays only after
    the warmup, another schedule than the one the stand-in's reading of codes was measured with."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def _train(reader: SceneCodeReader, examples: list[Encoded], pad_id: int, steps: int, batch_size: int,
           learning_rate: float, code_learning_rate_factor: float, seed: int, device: str,
           on_step: ProgressFn | None) -> float:
    """Trains `reader` for `steps` steps with the HF Trainer (AdamW, `warmup_cosine`, gradients clipped at 1,
    `LengthGroupedBatches`); returns the last step's loss."""
    # The code table learns 10x faster than the model (measured: reading emerged earlier and more reliably).
    optimizer = torch.optim.AdamW([{"params": list(reader.llama.parameters())},
                                   {"params": list(reader.codes.parameters()),
                                    "lr": learning_rate * code_learning_rate_factor}],
                                  lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    batches = LengthGroupedBatches([len(ids) for ids, _, _ in examples], batch_size, random.Random(seed))
    fields = ("input_ids", "attention_mask", "labels", "scenes")
    return train_steps(reader, examples, batches, lambda chunk: dict(zip(fields, _batch(chunk, pad_id))), optimizer,
                       scheduler, steps, max_grad_norm=1.0, seed=seed, device=device, on_step=on_step)


def _read_examples(pretrain_jsonl: str | Path, processor, codes: SceneCodes,
                   held_out: int) -> tuple[list[Encoded], list[Encoded]]:
    """(training examples, held-out scene-code chats encoded with answer-only labels) of a pre-training JSONL: the
    last `held_out` scene-code chats are held out to measure how well the model reads codes."""
    with open(pretrain_jsonl, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    if not items:
        raise ValueError(f"{pretrain_jsonl} holds no pre-training items.")
    with_media = [i for i, item in enumerate(items) if item.get("media")]
    held_out_ids = set(with_media[-held_out:]) if held_out and len(with_media) > 2 * held_out else set()
    examples = [_encode_pretraining_item(item, processor, codes) for i, item in enumerate(items)
                if i not in held_out_ids]
    held_out_examples = [_encode_pretraining_item(items[i], processor, codes, prompt_loss_weight=0.0)
                         for i in sorted(held_out_ids)]
    return examples, held_out_examples


def _save_meta_checkpoint(model, spec: TinyLlamaSpec, params, tokenizer_model: str | Path, output_dir: Path) -> None:
    """`consolidated.00.pth`, `params.json` and `tokenizer.model` of `model` (`params`: the converter's
    `MetaLlamaParams` of `spec`), as Meta ships LLaMA-2."""
    torch.save(hf_llama_to_meta_state_dict(model, params.n_heads, params.n_kv_heads), output_dir / "consolidated.00.pth")
    (output_dir / "params.json").write_text(json.dumps(spec.params_json(), indent=2) + "\n")
    (output_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())


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
    """Pre-trains a tiny LLaMA on the corpus text (scene-code chats included, see `SceneCodes`) with the HF Trainer
    and writes it in Meta's format to `output_dir` (`consolidated.00.pth`, `params.json`, `tokenizer.model`).
    Returns a summary (final loss, parameters, time, and the answer-token accuracy of held-out scene-code chats
    with their own codes and with other chats' codes: the gap is what the model reads from the code).

    What made the model read codes within the demo's budget (measured on held-out chats, answer words only): with
    LLaMA's 0.02 init, a 128-wide 4-layer model and 32-chat batches it read background and size after ~500 steps
    but colour stayed at chance after 800; the code table collapsed (cosine 0.6-0.8 between colours). Now: init
    std 1/sqrt(width) (the largest effect: colour, background, size and motion all read within ~800 steps, every
    seed tried), a 64-wide 2-layer model with 2 heads (4x cheaper steps, 16-chat batches), a code table that learns
    10x faster than the model, and batches of chats of similar length (half of each step was padding before). The
    model's reading of codes decides whether stage 1 works: with 1000 steps some seeds read only 96-97% of held-out
    answer tokens and their stage 1 reached 23-57% on image colour; with 1600 steps the six seeds tried read >= 98%
    and stage 1 reached 60-100% (smoke data) and 95-100% (full data). `code_noise` makes it read codes
    approximately, as stage 1's projector produces them.

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
    examples, held_out_examples = _read_examples(pretrain_jsonl, processor, codes, held_out)
    pad_id = tokenizer.eos_token_id
    reader = SceneCodeReader(model, codes, processor.media_token_id, code_noise, seed)
    final_loss = _train(reader, examples, pad_id, steps, batch_size, learning_rate, code_learning_rate_factor, seed,
                        device, on_step)
    reading = (code_reading_accuracy(model, codes, held_out_examples, processor.media_token_id, pad_id)
               if held_out_examples else {})

    model = model.cpu().eval()
    if codes_file is not None:  # for diagnostics only (e.g. how close stage 1's projector gets to the codes)
        torch.save({"table": codes.table.weight.detach().cpu(), "attributes": SCENE_ATTRIBUTES}, codes_file)
    _save_meta_checkpoint(model, spec, params, tokenizer_model, output_dir)
    return {"final_loss": final_loss, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": tokenizer.vocab_size, "examples": len(examples), "steps": steps,
            "seconds": time.monotonic() - started, "path": str(output_dir),
            "held_out_code_chats": len(held_out_examples), **reading}


__all__ = ["LengthGroupedBatches", "SceneCodeReader", "SceneCodes", "TinyLlamaSpec", "code_reading_accuracy",
           "hf_llama_to_meta_state_dict", "pretrain_tiny_llama", "train_tokenizer", "warmup_cosine"]
