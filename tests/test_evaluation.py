"""Evaluation: pooled loss / token accuracy over a built dataset's split equal a per-example computation by hand;
the generation eval's predictions equal direct greedy generation and are scored exact / contains."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

from mm_llama import MMLlamaProcessor
from mm_llama.evaluation import evaluate_loss, normalize_answer, score_answer
from mm_llama.cli import main as cli
from test_merge import MEDIA_DIM, save_stage1


def built_rows(seed: int = 0) -> list[dict]:
    """Rows in the built-dataset layout: id, messages {role, content, media_index}, media_types, media_embeds."""
    generator = torch.Generator().manual_seed(seed)

    def embeds(n):
        return torch.randn(n, 1, MEDIA_DIM, generator=generator).tolist()

    def msg(role, content, media_index=None):
        return {"role": role, "content": content, "media_index": media_index}

    return [
        {"id": "img", "messages": [msg("user", "What is shown?", 0), msg("assistant", "A red circle.")],
         "media_types": ["image"], "media_embeds": embeds(1)},
        {"id": "text", "messages": [msg("system", "Be brief."), msg("user", "Hello there"),
                                    msg("assistant", "Hi! How can I help?")],
         "media_types": [], "media_embeds": []},
        {"id": "two-turn-video", "messages": [msg("user", "Describe the video.", 0),
                                              msg("assistant", "A green square moves."),
                                              msg("user", "Which way?"), msg("assistant", "From left to right.")],
         "media_types": ["video"], "media_embeds": embeds(1)},
        {"id": "two-media", "messages": [msg("user", "First?", 0), msg("assistant", "A circle."),
                                         msg("user", "And this one?", 1), msg("assistant", "A square, I think.")],
         "media_types": ["image", "image"], "media_embeds": embeds(2)},
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model_path):
    root = tmp_path_factory.mktemp("evaluation")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    DatasetDict({"train": Dataset.from_list(built_rows(1)[:2]),
                 "validation": Dataset.from_list(built_rows(0))}).save_to_disk(str(root / "built"))
    return root, stage1, AutoModelForCausalLM.from_pretrained(stage1).eval(), MMLlamaProcessor.from_pretrained(stage1)


def test_loss_and_accuracy_pool_over_all_answer_tokens(setup):
    root, _, model, processor = setup
    total, correct, count = 0.0, 0, 0
    for row in built_rows(0):  # one example at a time, no padding, loss by hand
        record = {"id": row["id"], "messages": row["messages"], "media": [{"type": t} for t in row["media_types"]]}
        media = torch.tensor(row["media_embeds"]) if row["media_types"] else None
        inputs = processor(record, media_embeds=media)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], media_embeds=media).logits[0, :-1]
        targets = inputs["labels"][0, 1:]
        trained = targets != -100
        total += torch.nn.functional.cross_entropy(logits[trained], targets[trained], reduction="sum").item()
        correct += int((logits[trained].argmax(-1) == targets[trained]).sum())
        count += int(trained.sum())
    result = evaluate_loss(model, processor, root / "built", batch_size=3)  # batches of 3 + 1, right-padded
    assert result["num_examples"] == 4 and result["num_answer_tokens"] == count and result["split"] == "validation"
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["answer_loss"] == pytest.approx(total / count, rel=1e-5)  # no prompt weight: the same tokens
    assert result["token_accuracy"] == pytest.approx(correct / count)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    assert evaluate_loss(model, processor, root / "built", batch_size=1) == pytest.approx(result)
    with pytest.raises(ValueError, match="no 'test' split"):
        evaluate_loss(model, processor, root / "built", split="test")


def test_answer_scoring():
    assert normalize_answer("The  Red circle!") == "red circle"
    assert score_answer("A red circle.", ["red circle"]) == {"exact_match": True, "contains_match": True}
    assert score_answer("It is a red circle on blue.", ["Red circle", "square"]) == \
        {"exact_match": False, "contains_match": True}
    # whole words only: "red" is not in "reddish"
    assert score_answer("reddish", ["red"]) == {"exact_match": False, "contains_match": False}
    assert score_answer("", [""]) == {"exact_match": True, "contains_match": False}


def test_evaluate_script_writes_loss_and_generation_results(setup, tmp_path, capsys):
    root, stage1, model, processor = setup
    paths = []
    for index in range(3):
        path = tmp_path / f"media{index}.pt"
        torch.save(torch.randn(1, MEDIA_DIM, generator=torch.Generator().manual_seed(index)), path)
        paths.append(path)

    def direct(question, path, media_type="image"):
        messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                 {"type": media_type, "path": str(path)}]}]
        inputs = processor(messages, media_embeds=torch.load(path).view(1, 1, -1), add_generation_prompt=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_token_id)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    predictions = [direct("What is shown?", paths[0]), direct("Describe it.", paths[1], "video"),
                   direct("Colour?", paths[2])]
    qa_rows = [
        {"id": "exact", "media": paths[0].name, "question": "What is shown?", "answers": ["nope", predictions[0]]},
        {"id": "video", "media": str(paths[1]), "media_type": "video", "question": "Describe it.",
         "answers": ["zz-not-an-answer"]},
        {"id": "miss", "media": str(paths[2]), "question": "Colour?", "answers": ["zz-not-an-answer"]},
    ]
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text("\n".join(json.dumps(row) for row in qa_rows) + "\n")
    output = tmp_path / "out" / "eval.json"
    assert cli(["evaluate", str(stage1), "--device", "cpu", "--dataset", str(root / "built"), "--qa_file", str(qa_file),
                        "--max_new_tokens", "6", "--batch_size", "2", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["loss_eval"] == pytest.approx(evaluate_loss(model, processor, root / "built"))
    generation = results["generation_eval"]
    assert [e["prediction"] for e in generation["examples"]] == predictions
    assert [e["exact_match"] for e in generation["examples"]] == [True, False, False]
    assert generation["exact_match"] == pytest.approx(1 / 3)
    expected_contains = [score_answer(p, row["answers"])["contains_match"] for p, row in zip(predictions, qa_rows)]
    assert generation["contains_match"] == pytest.approx(sum(expected_contains) / 3)
    assert "token_accuracy" in capsys.readouterr().out

    assert generation["num_media_errors"] == 0 and generation["media_errors"] == []

    # One unreadable media file costs its own question only (answered "", scored wrong, reported); the others are
    # answered as before.
    bad_rows = [qa_rows[0], {"id": "gone", "media": "gone.pt", "question": "?", "answers": ["x"]}, qa_rows[2]]
    qa_file.write_text("\n".join(json.dumps(row) for row in bad_rows) + "\n")
    assert cli(["evaluate", str(stage1), "--device", "cpu", "--qa_file", str(qa_file), "--max_new_tokens", "6",
                "--batch_size", "2", "--output", str(output)]) == 0
    generation = json.loads(output.read_text())["generation_eval"]
    assert [e["prediction"] for e in generation["examples"]] == [predictions[0], "", predictions[2]]
    assert generation["num_media_errors"] == 1 and generation["media_errors"][0]["id"] == "gone"
    assert "gone.pt" in generation["media_errors"][0]["error"]
    assert generation["exact_match"] == pytest.approx(1 / 3)
    assert "warning: question gone:" in capsys.readouterr().err
    # None readable: most likely a wrong folder, an error before any generation.
    qa_file.write_text(json.dumps({"media": "gone.pt", "question": "?", "answers": ["x"]}) + "\n")
    assert cli(["evaluate", str(stage1), "--device", "cpu", "--qa_file", str(qa_file), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "None of the 1 media files" in err and "gone.pt" in err
