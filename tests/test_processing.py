"""MMLlamaProcessor: LLaMA-2 chat ids (vs. a re-statement of Meta's reference), labels, weights, errors, template."""

import pytest
import sentencepiece as spm
import torch

from mm_llama import MMLlamaProcessor, MMLlamaTokenizer
from mm_llama.model.processing_mm_llama import IGNORE_INDEX

# ---- An independent re-statement of Meta's llama/generation.py `chat_completion` prompt building. ----
META_B_INST, META_E_INST = "[INST]", "[/INST]"
META_B_SYS, META_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_dialog_tokens(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": dialog[1]["role"], "content": META_B_SYS + dialog[0]["content"] + META_E_SYS + dialog[1]["content"]}
        ] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{META_B_INST} {(prompt['content']).strip()} {META_E_INST} {(answer['content']).strip()} "
        tokens += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{META_B_INST} {(dialog[-1]['content']).strip()} {META_E_INST}")
    return tokens


META_MARKERS = {"image": ("<<IMG>>", "<</IMG>>"), "video": ("<<VID>>", "<</VID>>"), "audio": ("<<AUD>>", "<</AUD>>")}


def meta_style_media_tokens(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's `chat_completion` ids for a dialog whose user turns may carry one media item (`"media": "image" |
    "video" | "audio"`), re-stated: the turn's text is `[INST] {prompt} {open marker}` + placeholder + `{close marker}
    [/INST] {answer} `; the placeholder (`<unk>`, id 0) is inserted by id and the text after it continues the same
    string, so it is encoded without sentencepiece's dummy prefix (the leading "\u2581" of a new string)."""
    continuation = spm.SentencePieceProcessor()
    proto = __import__("sentencepiece.sentencepiece_model_pb2", fromlist=["x"]).ModelProto.FromString(
        sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    continuation.load_from_serialized_proto(proto.SerializeToString())
    tokens = []
    for index in range(0, len(dialog), 2):
        prompt, answer = dialog[index], dialog[index + 1] if index + 1 < len(dialog) else None
        tail = f" {META_E_INST}" + (f" {answer['content'].strip()} " if answer else "")
        tokens.append(sp.bos_id())
        if prompt.get("media"):
            open_marker, close_marker = META_MARKERS[prompt["media"]]
            tokens += sp.encode(f"{META_B_INST} {prompt['content'].strip()} {open_marker}") + [sp.unk_id()]
            tokens += continuation.encode(close_marker + tail)
        else:
            tokens += sp.encode(f"{META_B_INST} {prompt['content'].strip()}{tail}")
        if answer:
            tokens.append(sp.eos_id())
    return tokens


DIALOGS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What  colour is  the square?"},
        {"role": "assistant", "content": "It is green."},
    ],
    [
        {"role": "system", "content": "Be brief.\nAnswer in one line."},
        {"role": "user", "content": "  caf\u00e9\tna\u00efve \u4f60\u597d  "},
        {"role": "assistant", "content": "\u3053\u3093\u306b\u3061\u306f"},
        {"role": "user", "content": "And\n\nnow?"},
        {"role": "assistant", "content": "There are three  shapes."},
        {"role": "user", "content": "literal <unk> and <s> tokens"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def sp(spm_model_path):
    return spm.SentencePieceProcessor(model_file=str(spm_model_path))


@pytest.fixture(scope="module")
def processor(spm_model_path):
    return MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)))


@pytest.mark.parametrize("dialog", DIALOGS)
def test_text_only_ids_match_meta_reference(processor, sp, dialog):
    assert processor.encode_conversation(dialog).input_ids == meta_dialog_tokens(sp, dialog)
    prompt = dialog[:-1]
    got = processor.encode_conversation(prompt, add_generation_prompt=True).input_ids
    assert got == meta_dialog_tokens(sp, prompt)
    assert processor.tokenizer.decode(got).endswith(META_E_INST)


def test_record_format_equals_chat_messages(processor):
    record = {"id": "r1", "messages": DIALOGS[1], "media": []}
    assert processor.encode_conversation(record).input_ids == processor.encode_conversation(DIALOGS[1]).input_ids


def test_empty_system_prompt_is_left_out(processor, sp):
    dialog = [{"role": "system", "content": "  "}] + DIALOGS[0]
    assert processor.encode_conversation(dialog).input_ids == meta_dialog_tokens(sp, DIALOGS[0])


def _trained_text(processor, encoded):
    return [processor.tokenizer.decode([i]) for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]


def test_labels_cover_exactly_the_answers_and_their_eos(processor, sp):
    dialog = DIALOGS[2]
    encoded = processor.encode_conversation(dialog)
    assert len(encoded.labels) == len(encoded.input_ids)
    trained = [(i, label) for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(i == label for i, label in trained)
    # Trained ids are, per pair, the tokens of " {answer} " inside the pair's encoding, then EOS.
    ids = [i for i, _ in trained]
    assert ids.count(sp.eos_id()) == 3
    decoded_answers = processor.tokenizer.decode(ids, skip_special_tokens=True)
    for answer in dialog[2::2]:
        assert answer["content"].strip() in decoded_answers
    assert "[INST]" not in decoded_answers and "<<SYS>>" not in decoded_answers and "And" not in decoded_answers


def test_train_on_last_turn_only(processor, sp):
    dialog = DIALOGS[2]
    encoded = processor.encode_conversation(dialog, train_on="last")
    ids = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == "ok"
    assert ids[-1] == sp.eos_id() and ids.count(sp.eos_id()) == 1


def test_prompt_loss_weight_marks_prompt_tokens(processor):
    dialog = DIALOGS[1]
    plain = processor.encode_conversation(dialog)
    weighted = processor.encode_conversation(dialog, prompt_loss_weight=0.05)
    assert weighted.input_ids == plain.input_ids
    for token, label, weight, plain_label in zip(weighted.input_ids, weighted.labels, weighted.loss_weights, plain.labels):
        if plain_label != IGNORE_INDEX:
            assert weight == 1.0 and label == token
        elif token == processor.tokenizer.bos_token_id:
            assert weight == 0.0 and label == IGNORE_INDEX
        else:
            assert weight == pytest.approx(0.05) and label == token


def test_media_markers_and_placeholder_by_id(processor, sp):
    record = {
        "id": "m1",
        "messages": [
            {"role": "user", "content": "What is shown?", "media_index": 0},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "And here?", "media_index": 1},
            {"role": "assistant", "content": "A square moves."},
        ],
        "media": [{"type": "image", "path": "a.jpg"}, {"type": "video", "path": "b.mp4"}],
    }
    encoded = processor.encode_conversation(record)
    assert encoded.text == (
        "<s>[INST] What is shown? <<IMG>><unk><</IMG>> [/INST] A red circle. </s>"
        "<s>[INST] And here? <<VID>><unk><</VID>> [/INST] A square moves. </s>"
    )
    assert encoded.input_ids.count(processor.media_token_id) == 2
    assert [m["type"] for m in encoded.media] == ["image", "video"]
    first = encoded.input_ids.index(0)
    assert encoded.input_ids[:first] == [1] + sp.encode("[INST] What is shown? <<IMG>>")
    assert sp.decode(encoded.input_ids[first + 1 : first + 20]).startswith("<</IMG>> [/INST]")
    # placeholders are never trained
    assert all(encoded.labels[i] == IGNORE_INDEX for i, t in enumerate(encoded.input_ids) if t == 0)


def test_image_then_video_then_audio_ids_match_the_meta_style_reference(processor, sp):
    """Several media in one conversation (as a chat session builds it: a new item in a later user turn), each marker
    in the turn that brought it; the open generation prompt ends at [/INST]."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And this clip?"}, {"type": "video"}]},
        {"role": "assistant", "content": "It moves left."},
        {"role": "user", "content": [{"type": "text", "text": "What do you hear?"}, {"type": "audio"}]},
    ]
    reference = [{"role": "user", "content": "What is it?", "media": "image"},
                 {"role": "assistant", "content": "A red circle."},
                 {"role": "user", "content": "And this clip?", "media": "video"},
                 {"role": "assistant", "content": "It moves left."},
                 {"role": "user", "content": "What do you hear?", "media": "audio"}]
    encoded = processor.encode_conversation(messages, add_generation_prompt=True)
    assert encoded.input_ids == meta_style_media_tokens(sp, reference)
    assert encoded.text == (
        "<s>[INST] What is it? <<IMG>><unk><</IMG>> [/INST] A red circle. </s>"
        "<s>[INST] And this clip? <<VID>><unk><</VID>> [/INST] It moves left. </s>"
        "<s>[INST] What do you hear? <<AUD>><unk><</AUD>> [/INST]"
    )
    assert [item["type"] for item in encoded.media] == ["image", "video", "audio"]
    batch = processor(messages, media_embeds=torch.randn(3, 1024), add_generation_prompt=True)
    assert batch["media_type_ids"].tolist() == [0, 1, 2]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == encoded.text


def test_tokens_per_media(spm_model_path):
    processor = MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)), tokens_per_media=3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    out = processor(messages, add_generation_prompt=True, media_embeds=torch.zeros(1, 3, 8))
    assert int((out["input_ids"] == 0).sum()) == 3
    assert out["media_embeds"].shape == (1, 3, 8)
    with pytest.raises(ValueError, match="tokens_per_media=3"):
        processor(messages, add_generation_prompt=True, media_embeds=torch.zeros(1, 1, 8))


def test_batch_padding_never_uses_the_placeholder(processor):
    batch = [DIALOGS[0], DIALOGS[2]]
    right = processor(batch)
    left = processor([d[:-1] for d in batch], add_generation_prompt=True, padding_side="left")
    assert right["input_ids"].shape == right["labels"].shape == right["attention_mask"].shape
    assert int((right["input_ids"] == processor.media_token_id).sum()) == 0
    assert right["attention_mask"][0, -1] == 0 and right["labels"][0, -1] == IGNORE_INDEX
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert "labels" not in left
    lengths = right["attention_mask"].sum(1).tolist()
    assert lengths == [len(processor.encode_conversation(d).input_ids) for d in batch]


def test_media_embeds_in_placeholder_order(processor):
    convs = [
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "a"}]}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "c"}]}, {"role": "assistant", "content": "d"}],
    ]
    embeds = torch.randn(2, 1024)
    out = processor(convs, media_embeds=embeds)
    assert torch.equal(out["media_embeds"][:, 0], embeds)
    assert out["media_type_ids"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 media items .* but 3"):
        processor(convs, media_embeds=torch.randn(3, 1024))


@pytest.mark.parametrize(
    "conversation, match",
    [
        ([{"role": "assistant", "content": "x"}], "message 0: roles out of order: expected 'user', got 'assistant'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1: roles out of order: expected 'assistant', got 'user'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "message 1: roles out of order",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image"}]}],
            "message 1: media on a 'assistant' turn",
        ),
        ([{"role": "user", "content": [{"type": "pdf"}]}], "message 0: unknown content part type 'pdf'"),
        (
            {"id": "r9", "messages": [{"role": "user", "content": "a", "media_index": 0}], "media": [{"type": "pdf"}]},
            "'r9', message 0: unknown media type 'pdf'",
        ),
        (
            {"id": "r8", "messages": [{"role": "user", "content": "a", "media_index": 3}], "media": [{"type": "image"}]},
            "'r8', message 0: media_index 3",
        ),
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "video"}]}],
            "message 0: 2 media items on one user turn",
        ),
    ],
)
def test_invalid_conversations_raise_clear_errors(processor, conversation, match):
    with pytest.raises(ValueError, match=match):
        processor.encode_conversation(conversation, add_generation_prompt=True)


def test_unattached_media_is_an_error(processor):
    record = {
        "id": "r7",
        "messages": [{"role": "user", "content": "a", "media_index": 0}, {"role": "assistant", "content": "b"}],
        "media": [{"type": "image"}, {"type": "image"}],
    }
    with pytest.raises(ValueError, match=r"'r7': media items \[1\] are not attached"):
        processor.encode_conversation(record)


def test_generation_prompt_mode_mismatch_errors(processor):
    with pytest.raises(ValueError, match="ends with a user turn"):
        processor.encode_conversation(DIALOGS[0][:1])
    with pytest.raises(ValueError, match="add_generation_prompt=True needs"):
        processor.encode_conversation(DIALOGS[0], add_generation_prompt=True)


def test_media_count_mismatch_without_media_is_an_error(processor):
    with pytest.raises(ValueError, match="no media"):
        processor(DIALOGS[0], media_embeds=torch.randn(1, 1024))


@pytest.mark.parametrize("dialog", DIALOGS)
def test_jinja_template_renders_the_same_text(processor, dialog):
    assert processor.apply_chat_template(dialog) == processor.encode_conversation(dialog).text
    prompt = dialog[:-1]
    assert processor.apply_chat_template(prompt, add_generation_prompt=True) == processor.encode_conversation(
        prompt, add_generation_prompt=True
    ).text


def conversation_grid():
    """Every combination of the format's choices: system message (none, text, blank), user content (string,
    several text parts, media alone, text + each media type), padding whitespace, empty answers, one or two turns,
    open generation prompt or not."""
    systems = [None, " Be brief. ", "  "]
    users = ["  hi  ", [{"type": "text", "text": "a"}, {"type": "text", "text": " b "}], [{"type": "image"}],
             *([{"type": kind}, {"type": "text", "text": f"what {kind}?"}] for kind in ("image", "video", "audio"))]
    answers = [" Sure. ", ""]
    for system in systems:
        for first in users:
            for second in [None, users[-1]]:
                for answer in answers:
                    for open_prompt in (False, True):
                        messages = [] if system is None else [{"role": "system", "content": system}]
                        messages += [{"role": "user", "content": first}, {"role": "assistant", "content": answer}]
                        if second is not None:
                            messages += [{"role": "user", "content": second}, {"role": "assistant", "content": answer}]
                        yield (messages[:-1], True) if open_prompt else (messages, False)


@pytest.mark.parametrize("tokens_per_media", [1, 3])
def test_jinja_template_and_python_renderer_agree_on_every_combination(spm_model_path, tokens_per_media):
    """The Jinja template (saved with the processor, read by other tools) and the by-id encoder render the same text."""
    processor = MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)), tokens_per_media=tokens_per_media)
    grid = list(conversation_grid())
    assert len(grid) == 3 * 6 * 2 * 2 * 2
    for messages, open_prompt in grid:
        rendered = processor.apply_chat_template(messages, add_generation_prompt=open_prompt)
        assert rendered == processor.encode_conversation(messages, add_generation_prompt=open_prompt).text, messages


def test_decode_is_the_tokenizers(processor):
    ids = processor.encode_conversation(DIALOGS[1]).input_ids
    assert processor.decode(ids, skip_special_tokens=True) == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert processor.batch_decode([ids, ids[:5]]) == [processor.tokenizer.decode(ids), processor.tokenizer.decode(ids[:5])]


def test_jinja_template_with_media_and_tokenize(processor):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image", "path": "a.jpg"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "video", "path": "b.mp4"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nWhat is it? <<IMG>><unk><</IMG>> [/INST] A circle. </s>"
        "<s>[INST] <<VID>><unk><</VID>> [/INST]"
    )
    assert text == processor.encode_conversation(messages, add_generation_prompt=True).text
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, media_embeds=torch.randn(2, 1024))
    assert ids[0].tolist() == processor.encode_conversation(messages, add_generation_prompt=True).input_ids


def test_save_and_reload_processor(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, MMLlamaProcessor)
    assert reloaded.tokens_per_media == processor.tokens_per_media
    assert reloaded.encode_conversation(DIALOGS[2]).input_ids == processor.encode_conversation(DIALOGS[2]).input_ids


def test_raw_image_files_become_pixel_values(spm_model_path, tmp_path):
    from PIL import Image

    from mm_llama.imagebind import load_image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    processor = MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path)), image_size=28)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "red.png")},
                                             {"type": "text", "text": "Colour?"}]}]
    out = processor(messages, add_generation_prompt=True)
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    torch.testing.assert_close(out["pixel_values"][0], load_image(tmp_path / "red.png", image_size=28))
    assert out["media_type_ids"].tolist() == [0]
    missing = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "nope.png")}]}]
    with pytest.raises(ValueError, match="nope.png"):
        processor(missing, add_generation_prompt=True)
