"""LLaMA tokenizer that encodes exactly as Meta's sentencepiece `tokenizer.model` does.

transformers 5.x converts `tokenizer.model` to a `tokenizers` BPE whose ids differ from sentencepiece on runs of
spaces and which turns a literal "<unk>" in text into the special token. Meta's reference chat code calls
sentencepiece directly, so this tokenizer does too (`encode_text`), and `MMLlamaProcessor` builds prompts from
those ids, inserting BOS/EOS and the media placeholder by id.
"""

from __future__ import annotations

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class MMLlamaTokenizer(SentencePieceBackend):
    """A `PreTrainedTokenizer` over a LLaMA sentencepiece model (`tokenizer.model`).

    `encode_text(text)` is id-for-id `SentencePieceProcessor.encode(text)`; `encode_text(text, dummy_prefix=False)`
    encodes a continuation (text that directly follows other tokens, e.g. after a media placeholder) without the
    leading "▁" that sentencepiece adds at the start of a string.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("legacy", True)  # plain sentencepiece encoding, as Meta's reference
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # Text is never parsed for "<s>"/"<unk>": Meta's reference encodes such text as plain characters.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp_model.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode_text(self, text: str, dummy_prefix: bool = True) -> list[int]:
        """Token ids of `text`, exactly as sentencepiece gives them; no BOS/EOS, no special-token parsing."""
        return (self.sp_model if dummy_prefix else self._sp_continuation).encode(text)

    def encode_text_with_offsets(self, text: str, dummy_prefix: bool = True) -> tuple[list[int], list[int]]:
        """Like `encode_text`, plus the UTF-8 byte offset in `text` at which each token starts."""
        proto = (self.sp_model if dummy_prefix else self._sp_continuation).encode(text, return_type="proto")
        return [piece.id for piece in proto.pieces], [piece.begin for piece in proto.pieces]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece's own decoding: byte-fallback pieces become UTF-8 text and inner runs of spaces survive.
        return self.sp_model.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)


__all__ = ["MMLlamaTokenizer"]
