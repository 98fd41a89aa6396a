"""MMLlamaTokenizer encodes id-for-id like sentencepiece (Meta's reference), unlike transformers' converted one."""

import pytest
import sentencepiece as spm

from mm_llama import MMLlamaTokenizer

TRICKY_TEXTS = [
    "is  this",
    "  leading and trailing  ",
    "line one\nline two\n\nthree",
    "tab\tseparated\t\tvalues",
    "caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \u3053\u3093\u306b\u3061\u306f \U0001f600",
    "literal <unk> and <s> and </s> in text",
    "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]",
    "digits 12345 and 3.14",
    "",
]


@pytest.fixture(scope="module")
def sp(spm_model_path):
    return spm.SentencePieceProcessor(model_file=str(spm_model_path))


@pytest.fixture(scope="module")
def tokenizer(spm_model_path):
    return MMLlamaTokenizer(vocab_file=str(spm_model_path))


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encode_matches_sentencepiece(tokenizer, sp, text):
    assert tokenizer.encode_text(text) == sp.encode(text)
    assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_round_trips_like_sentencepiece(tokenizer, sp, text):
    ids = sp.encode(text)
    assert tokenizer.decode(ids) == sp.decode(ids)


def test_continuation_encoding_has_no_dummy_prefix(tokenizer, sp):
    # "<</IMG>> [/INST]" follows a placeholder token: no "▁" is inserted before it.
    ids = tokenizer.encode_text("<</IMG>> [/INST]", dummy_prefix=False)
    assert sp.decode(ids) == "<</IMG>> [/INST]"
    assert sp.id_to_piece(ids[0]) != "\u2581"
    assert ids != tokenizer.encode_text("<</IMG>> [/INST]")


def test_offsets_are_utf8_byte_starts(tokenizer):
    text = "h\u00e9llo [/INST] ans"
    ids, starts = tokenizer.encode_text_with_offsets(text)
    assert ids == tokenizer.encode_text(text)
    assert starts == sorted(starts)
    assert starts[-1] < len(text.encode())


def test_special_ids_are_llamas(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_save_and_reload(tokenizer, tmp_path, sp):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, MMLlamaTokenizer)
    for text in TRICKY_TEXTS:
        assert reloaded.encode_text(text) == sp.encode(text)
