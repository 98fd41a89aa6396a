"""MMLlamaProcessor: renders conversations with media into LLaMA-2 chat token ids, labels and loss weights.

Prompt format (Meta's LLaMA-2 reference `chat_completion`, plus media markers after the user text):

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} <<IMG>><unk><</IMG>> [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]

Text is encoded with sentencepiece exactly as Meta's reference does (one `encode` per user/assistant pair, BOS/EOS
added by id); the media placeholder is inserted by id, never parsed from text.

Over 400 lines because it travels with checkpoints as remote code (only flat relative imports are copied).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
MEDIA_MARKERS = {"image": ("<<IMG>>", "<</IMG>>"), "video": ("<<VID>>", "<</VID>>"), "audio": ("<<AUD>>", "<</AUD>>")}
MEDIA_TYPE_IDS = {"image": 0, "video": 1, "audio": 2}
IGNORE_INDEX = -100
TrainOn = Literal["all", "last"]


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_marker_branches() -> str:
    """The template's media branch: one `if`/`elif` per MEDIA_MARKERS entry, then an error naming the known types."""
    branches = "".join(
        "{%- " + ("if" if index == 0 else "elif") + f" part['type'] == '{kind}' -%}}"
        f"{{{{ {_jinja_literal(open_marker)} + '<unk>' * tokens_per_media + {_jinja_literal(close_marker)} }}}}"
        for index, (kind, (open_marker, close_marker)) in enumerate(MEDIA_MARKERS.items())
    )
    *others, last = MEDIA_MARKERS
    known = f"{', '.join(others)} or {last}"
    unknown = f"raise_exception('Unknown media type ' + part['type'] + ': use {known}.')"
    return branches + f"{{%- else -%}}{{{{ {unknown} }}}}"


# The format of `MMLlamaProcessor._encode_pair` as a Jinja template, built from the same constants, so that
# `apply_chat_template(..., tokenize=False)` and tools that read a saved processor's chat template render it.
# Content may be a string or HF content parts ({"type": "text"|"image"|"video"|"audio"}); the placeholder appears as
# the text "<unk>". tests/test_processing.py renders a grid of conversations both ways and compares.
LLAMA2_MEDIA_CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}"
    "{{ (' ' if not loop.first else '') + part['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro marker_of(content) -%}"
    "{%- if content is not string -%}{%- for part in content if part['type'] != 'text' -%}"
    + _jinja_marker_branches()
    + "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set tokens_per_media = tokens_per_media | default(1) -%}"
    "{%- set ns = namespace(system='', start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = text_of(messages[0]['content']) -%}{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = text_of(message['content']) -%}"
    f"{{%- if loop.first and ns.system | trim -%}}{{%- set text = ({_jinja_literal(B_SYS)} + ns.system + "
    f"{_jinja_literal(E_SYS)} + text) -%}}"
    "{%- endif -%}"
    "{%- set text = text | trim -%}"
    f"{{{{ {_jinja_literal('<s>' + B_INST)} + (' ' + text if text else '') }}}}"
    "{%- set marker = marker_of(message['content']) -%}"
    f"{{{{ (' ' + marker if marker else '') + {_jinja_literal(' ' + E_INST)} }}}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + (text_of(message['content']) | trim) + ' </s>' }}"
    "{%- else -%}{{ raise_exception('Unexpected role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class Turn:
    """One normalised message: role, plain text and at most one media item (a dict with at least "type")."""

    role: str
    text: str
    media: dict | None = None


@dataclass
class EncodedConversation:
    """Token ids of one conversation, with per-token labels and loss weights, and its media in placeholder order."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    loss_weights: list[float] = field(default_factory=list)
    answer_mask: list[bool] = field(default_factory=list)
    media: list[dict] = field(default_factory=list)
    text: str = ""


def _text_of_parts(content: Any, where: str) -> tuple[str, list[dict]]:
    """Splits a message content (str or HF content parts) into its text and its media parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: content must be a string or a list of content parts, got {type(content).__name__}.")
    texts, media = [], []
    for part in content:
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "text":
            texts.append(part.get("text", ""))
        elif part_type in MEDIA_MARKERS:
            media.append(part)
        else:
            raise ValueError(f"{where}: unknown content part type {part_type!r}; use 'text', 'image', 'video' or "
                             "'audio'.")
    return " ".join(texts), media


def normalize_conversation(conversation: dict | Sequence[dict], where: str = "conversation") -> list[Turn]:
    """Turns a conversation record or a list of HF chat messages into validated `Turn`s.

    Accepted inputs:
      - a record (docs/data.md) `{"messages": [...], "media": [{"type", "path"|...}, ...]}` where a user message carries
        `"media_index": i` for the media item on that turn (records without any media_index attach media item i to
        the i-th user turn, the LLaVA convention);
      - a list of messages whose content is a string or HF content parts (`{"type": "image", ...}`).
    Already normalised turns (a list of `Turn`) are returned as they are, so callers normalise once.
    Raises ValueError on roles out of order, media on a non-user turn, more than one media item on a turn,
    unknown media types and media that no turn refers to, naming the message.
    """
    if isinstance(conversation, (list, tuple)) and conversation and all(isinstance(t, Turn) for t in conversation):
        return list(conversation)
    record_media: list[dict] = []
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError(f"{where}: a record needs a 'messages' list (the record format of docs/data.md).")
        messages = conversation["messages"]
        record_media = list(conversation.get("media") or [])
        where = f"{where} {conversation['id']!r}" if conversation.get("id") is not None else where
    else:
        messages = list(conversation)
    if not messages:
        raise ValueError(f"{where}: no messages.")

    has_media_index = any(isinstance(m, dict) and m.get("media_index") is not None for m in messages)
    used_media: set[int] = set()
    turns: list[Turn] = []
    user_turns_seen = 0
    for position, message in enumerate(messages):
        at = f"{where}, message {position}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{at}: a message must be a dict with 'role' and 'content'.")
        role = message["role"]
        expected = _expected_role(turns)
        if role == "system" and position == 0:
            pass
        elif role != expected:
            raise ValueError(
                f"{at}: roles out of order: expected {expected!r}, got {role!r}. A conversation is an optional "
                "system message, then user and assistant turns alternating, starting with user."
            )
        text, media_parts = _text_of_parts(message["content"], at)
        media_index = message.get("media_index")
        if media_index is not None:
            if not isinstance(media_index, int) or not 0 <= media_index < len(record_media):
                raise ValueError(f"{at}: media_index {media_index!r} is not an index into the record's media list.")
            media_parts.append(record_media[media_index])
            used_media.add(media_index)
        elif role == "user" and record_media and not has_media_index and user_turns_seen < len(record_media):
            media_parts.append(record_media[user_turns_seen])
            used_media.add(user_turns_seen)
        if media_parts and role != "user":
            raise ValueError(f"{at}: media on a {role!r} turn; only user turns can carry an image, video or audio.")
        if len(media_parts) > 1:
            raise ValueError(f"{at}: {len(media_parts)} media items on one user turn; at most one is supported.")
        media = dict(media_parts[0]) if media_parts else None
        if media is not None and media.get("type") not in MEDIA_MARKERS:
            raise ValueError(f"{at}: unknown media type {media.get('type')!r}; use 'image', 'video' or 'audio'.")
        user_turns_seen += role == "user"
        turns.append(Turn(role=role, text=text, media=media))
    if len(used_media) != len(record_media):
        unused = sorted(set(range(len(record_media))) - used_media)
        raise ValueError(f"{where}: media items {unused} are not attached to any user turn.")
    return turns


def _expected_role(previous: list[Turn]) -> str:
    dialog = [turn for turn in previous if turn.role != "system"]
    return "user" if not dialog or dialog[-1].role == "assistant" else "assistant"


class MMLlamaProcessor(ProcessorMixin):
    r"""
    Tokenizer + media processing + LLaMA-2 chat format for [`MMLlamaForCausalLM`].

    Args:
        tokenizer: an [`MMLlamaTokenizer`] over Meta's `tokenizer.model`.
        image_processor: ImageBind's image + video preprocessing (`mm_llama.imagebind.ImageBindProcessor`), saved and
            loaded with the processor; default: ImageBind-huge's at `image_size` (224 px).
        chat_template: Jinja template; defaults to the LLaMA-2 media template.
        tokens_per_media: placeholder tokens per image/video/audio item (must equal the model config's).

    `processor(conversations, media_embeds=...)` returns `input_ids`, `attention_mask`, `labels` (-100 where no loss
    is taken), `loss_weights` (when `prompt_loss_weight > 0`) and the media: `media_embeds`
    [total_media, tokens_per_media, dim] in placeholder order when given, or `pixel_values` / `video_pixel_values` /
    `media_type_ids` when the conversations name image/video files (needs the ImageBind processor).
    """

    tokenizer_class = "MMLlamaTokenizer"

    def __init__(self, tokenizer=None, image_processor=None, chat_template: str | None = None,
                 tokens_per_media: int = 1, image_size: int = 224, **kwargs):
        self.tokens_per_media = tokens_per_media
        if image_processor is None:  # (`image_size` is also what processors saved before 0.2 recorded)
            image_processor = _imagebind_module().ImageBindProcessor(image_size=image_size)
        super().__init__(tokenizer, image_processor, chat_template=chat_template or LLAMA2_MEDIA_CHAT_TEMPLATE,
                         **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "MMLlamaProcessor":
        """Loads a saved processor, or builds one over LLaMA's `tokenizer.model` when the folder holds only Meta's
        tokenizer (a converted LLaMA-2 folder: its tokenizer_config.json names no MM-LLaMA class, and transformers'
        own LLaMA tokenizer differs from sentencepiece, so it is never used)."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not (folder / "processor_config.json").is_file():
            if not (folder / "tokenizer.model").is_file():
                raise FileNotFoundError(
                    f"{folder} has neither a saved MMLlamaProcessor (processor_config.json) nor LLaMA's "
                    "tokenizer.model; pass the folder of a trained MM-LLaMA model or of a converted LLaMA model."
                )
            from .tokenization_mm_llama import MMLlamaTokenizer

            return cls(tokenizer=MMLlamaTokenizer(vocab_file=str(folder / "tokenizer.model")), **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def media_token_id(self) -> int:
        return self.tokenizer.unk_token_id

    @property
    def pad_token_id(self) -> int:
        """Padding id. Never the placeholder (`<unk>`), since the model counts placeholders; EOS by default."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None and pad != self.media_token_id else self.tokenizer.eos_token_id

    # ---------------------------------------------------------------- one conversation

    def encode_conversation(
        self,
        conversation: dict | Sequence[dict],
        *,
        add_generation_prompt: bool = False,
        train_on: TrainOn = "all",
        prompt_loss_weight: float = 0.0,
    ) -> EncodedConversation:
        """Renders and tokenizes one conversation.

        Labels carry the token id on trained tokens, -100 elsewhere; loss_weights is 1.0 on trained answer tokens
        (and their EOS), `prompt_loss_weight` on other text tokens when it is > 0 (those then get labels too), and
        0 on BOS and media placeholders, which are never trained. answer_mask is True on the trained answer tokens:
        the tokens that token accuracy counts. With `train_on="last"` the earlier answers are prompt, as in the
        original MM-LLaMA (only the last answer is a completion).
        """
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}.")
        turns = normalize_conversation(conversation)
        system = turns[0].text if turns[0].role == "system" else ""
        dialog = [turn for turn in turns if turn.role != "system"]
        if not dialog:
            raise ValueError("The conversation has only a system message; it needs a user turn.")
        if add_generation_prompt and dialog[-1].role != "user":
            raise ValueError("add_generation_prompt=True needs a conversation that ends with a user turn.")
        if not add_generation_prompt and dialog[-1].role != "assistant":
            raise ValueError(
                "The conversation ends with a user turn: pass add_generation_prompt=True to build a prompt for "
                "generation, or add the assistant's answer for training."
            )
        num_pairs = len(dialog) // 2
        out = EncodedConversation()
        for pair_index in range(0, len(dialog), 2):
            user = dialog[pair_index]
            answer = dialog[pair_index + 1] if pair_index + 1 < len(dialog) else None
            user_text = (B_SYS + system + E_SYS + user.text) if (pair_index == 0 and system.strip()) else user.text
            trained = answer is not None and (train_on == "all" or pair_index // 2 == num_pairs - 1)
            self._encode_pair(out, user_text.strip(), user.media, answer, trained, prompt_loss_weight)
        return out

    def _encode_pair(self, out: EncodedConversation, user_text: str, media: dict | None, answer: Turn | None,
                     trained: bool, prompt_loss_weight: float) -> None:
        """Appends `<s>[INST] {user} [/INST] {answer} </s>` (or the open generation prompt) to `out`."""
        head = B_INST + (f" {user_text}" if user_text else "")
        tail = f" {E_INST}" + (f" {answer.text.strip()} " if answer is not None else "")
        answer_start = len(f" {E_INST}".encode())  # byte offset of the answer in `tail`
        chunks: list[tuple[str, bool]]  # (text, is a continuation of previous tokens)
        placeholder: list[int] = []
        if media is None:
            chunks = [(head + tail, False)]
            answer_start += len(head.encode())
        else:
            open_marker, close_marker = MEDIA_MARKERS[media["type"]]
            chunks = [(f"{head} {open_marker}", False), (close_marker + tail, True)]
            answer_start += len(close_marker.encode())
            placeholder = [self.media_token_id] * self.tokens_per_media
            out.media.append(media)

        never_trained = (self.tokenizer.bos_token_id, self.media_token_id)

        def add(ids: list[int], is_answer: list[bool]) -> None:
            out.input_ids.extend(ids)
            for token_id, answer_token in zip(ids, is_answer):
                out.answer_mask.append(answer_token and trained)
                if answer_token and trained:
                    label, weight = token_id, 1.0
                elif prompt_loss_weight > 0 and token_id not in never_trained:
                    label, weight = token_id, float(prompt_loss_weight)
                else:
                    label, weight = IGNORE_INDEX, 0.0
                out.labels.append(label)
                out.loss_weights.append(weight)

        add([self.tokenizer.bos_token_id], [False])
        out.text += self.tokenizer.bos_token
        for chunk_index, (text, continuation) in enumerate(chunks):
            ids, starts = self.tokenizer.encode_text_with_offsets(text, dummy_prefix=not continuation)
            is_last_chunk = chunk_index == len(chunks) - 1
            add(ids, [is_last_chunk and answer is not None and start >= answer_start for start in starts])
            out.text += text
            if not is_last_chunk:
                add(placeholder, [False] * len(placeholder))
                out.text += self.tokenizer.unk_token * len(placeholder)
        if answer is not None:
            add([self.tokenizer.eos_token_id], [True])
            out.text += self.tokenizer.eos_token

    # ---------------------------------------------------------------- batches

    def __call__(
        self,
        conversations: dict | Sequence[dict] | Sequence[Sequence[dict]] | None = None,
        *,
        media_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        add_generation_prompt: bool = False,
        train_on: TrainOn = "all",
        prompt_loss_weight: float = 0.0,
        padding_side: Literal["left", "right"] = "right",
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Encodes one conversation or a batch of them, padded to the longest.

        Args:
            conversations: a record / list of messages, or a list of those.
            media_embeds: the media's ImageBind embeddings in placeholder order over the whole batch:
                [total_media, tokens_per_media, dim] or [total_media, dim], or a list of per-item tensors.
                Without it, media items that name a file (`path`/`url`/`image`/`video`) are loaded and
                preprocessed for the vision tower.
            padding_side: "left" for batched generation, "right" for training.
        Returns:
            BatchFeature with input_ids / attention_mask / labels [batch, seq_len], loss_weights (when
            prompt_loss_weight > 0; [batch, seq_len]) and media tensors.
        """
        if conversations is None:
            raise ValueError("MMLlamaProcessor needs `conversations` (a record, a message list, or a list of them).")
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}.")
        batch = [conversations] if _is_single_conversation(conversations) else list(conversations)
        encoded = [
            self.encode_conversation(
                conversation, add_generation_prompt=add_generation_prompt, train_on=train_on,
                prompt_loss_weight=prompt_loss_weight,
            )
            for conversation in batch
        ]
        features = self.pad(encoded, padding_side=padding_side, with_labels=not add_generation_prompt,
                            with_loss_weights=prompt_loss_weight > 0)
        media = [item for enc in encoded for item in enc.media]
        features.update(self.prepare_media(media, media_embeds))
        return BatchFeature(features, tensor_type=return_tensors if return_tensors else None)

    def pad(self, encoded: Sequence[EncodedConversation], padding_side: str = "right", with_labels: bool = True,
            with_loss_weights: bool = False) -> dict[str, list]:
        """Pads encoded conversations to the longest; returns python lists (input_ids, attention_mask, ...)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        length = max(len(enc.input_ids) for enc in encoded)

        def padded(values: list, pad_value) -> list:
            padding = [pad_value] * (length - len(values))
            return padding + values if padding_side == "left" else values + padding

        features = {
            "input_ids": [padded(enc.input_ids, self.pad_token_id) for enc in encoded],
            "attention_mask": [padded([1] * len(enc.input_ids), 0) for enc in encoded],
        }
        if with_labels:
            features["labels"] = [padded(enc.labels, IGNORE_INDEX) for enc in encoded]
        if with_loss_weights:
            # Prompt tokens carry labels too, so the answer tokens (what token accuracy counts) need their own mask.
            features["loss_weights"] = [padded(enc.loss_weights, 0.0) for enc in encoded]
            features["answer_mask"] = [padded(enc.answer_mask, False) for enc in encoded]
        return features

    def prepare_media(self, media: list[dict], media_embeds=None) -> dict[str, Any]:
        """Media tensors for the model, given the batch's media items in placeholder order."""
        if not media:
            if media_embeds is not None and len(media_embeds) > 0:
                raise ValueError(f"{len(media_embeds)} media embeddings were given but the conversations have no media.")
            return {}
        type_ids = torch.tensor([MEDIA_TYPE_IDS[item["type"]] for item in media])
        if media_embeds is None and all("embeds" in item for item in media):
            media_embeds = [torch.as_tensor(item["embeds"]) for item in media]
        if media_embeds is not None:
            if not isinstance(media_embeds, torch.Tensor):
                media_embeds = torch.stack([torch.as_tensor(e).reshape(-1, torch.as_tensor(e).shape[-1])
                                            for e in media_embeds])
            if media_embeds.dim() == 2:
                media_embeds = media_embeds.unsqueeze(1)
            if media_embeds.shape[0] != len(media):
                raise ValueError(
                    f"The conversations have {len(media)} media items (placeholders) but {media_embeds.shape[0]} "
                    "media embeddings were given; pass one embedding per image/video, in order."
                )
            if media_embeds.shape[1] != self.tokens_per_media:
                raise ValueError(
                    f"media_embeds has {media_embeds.shape[1]} vectors per media item; the processor inserts "
                    f"tokens_per_media={self.tokens_per_media} placeholders."
                )
            return {"media_embeds": media_embeds, "media_type_ids": type_ids}
        return {**self._load_raw_media(media), "media_type_ids": type_ids}

    def _load_raw_media(self, media: list[dict]) -> dict[str, torch.Tensor]:
        sources = {"image": [], "video": []}
        for item in media:
            if item["type"] == "audio":
                raise ValueError(
                    "Raw audio needs precomputed media_embeds: the model's tower is ImageBind's vision tower. Embed "
                    "it with mm_llama.generation.MediaEmbedder and an ImageBind audio model (--imagebind FOLDER)."
                )
            source = next((item[key] for key in (item["type"], "path", "url") if item.get(key) is not None), None)
            if source is None:
                raise ValueError(
                    f"A {item['type']} item has neither embeddings nor a file ({item}); give 'path' (or "
                    f"'{item['type']}') or pass media_embeds."
                )
            sources[item["type"]].append(source)
        processed = self.image_processor(images=sources["image"] or None, videos=sources["video"] or None)
        return {key: processed[key] for key in ("pixel_values", "video_pixel_values") if key in processed}

    # ---------------------------------------------------------------- chat template (decode: ProcessorMixin's)

    def apply_chat_template(self, conversation, chat_template: str | None = None, *, add_generation_prompt=False,
                            tokenize: bool = False, return_dict: bool = False, **kwargs):
        """Renders the conversation with the Jinja template (`tokenize=False`), or encodes it by id
        (`tokenize=True`, the same ids as `processor(conversation)`): tokenizing the rendered text would parse
        "<s>"/"<unk>" as plain characters, as Meta's reference does for user text."""
        if tokenize:
            encoded = self(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
            return encoded if return_dict else encoded["input_ids"]
        kwargs.setdefault("tokens_per_media", self.tokens_per_media)
        return super().apply_chat_template(conversation, chat_template, add_generation_prompt=False,
                                           tokenize=False, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "media_embeds", "pixel_values", "video_pixel_values", "media_type_ids"]


def _imagebind_module():
    """`mm_llama.imagebind`, imported by name: the processor's code also travels with saved checkpoints (remote
    code), where only flat relative imports are copied; the ImageBind image processor needs the package."""
    return importlib.import_module("mm_llama.imagebind")


def _is_single_conversation(conversations) -> bool:
    if isinstance(conversations, dict):
        return True
    first = conversations[0] if len(conversations) else None
    return isinstance(first, Turn) or (isinstance(first, dict) and "role" in first)


__all__ = ["MMLlamaProcessor", "normalize_conversation", "LLAMA2_MEDIA_CHAT_TEMPLATE", "IGNORE_INDEX"]
