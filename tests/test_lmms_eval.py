"""The lmms-eval model (`--model mm_llama`, the `eval` extra): tiny tasks in their own YAML over local data (yes/no
questions in POPE's format over images and videos, and a multiple-choice task), run through lmms-eval's own entry
points with a tiny MM-LLaMA and a tiny ImageBind; the on-disk embedding cache; bad media; loglikelihood and batched
generation checked against direct computations with the model."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import need

# Importing lmms-eval changes two process-wide settings: lmms_eval.utils ignores every warning
# (`warnings.filterwarnings("ignore")`) and lmms_eval.api.task sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES = True (for
# NoCaps' truncated images). Collecting this file must not change what the rest of the suite sees (tests there check
# that truncated files are reported), so the imports run inside catch_warnings, PIL's setting is put back, and
# `lmms_eval_process` sets lmms-eval's for the tests of this file only, as a real `python -m lmms_eval` process has it.
PIL_LOADS_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES
with warnings.catch_warnings():
    lmms_eval = need("lmms_eval", "the plugin needs the eval extra (pip install -e '.[eval]')", module_level=True)
    from lmms_eval.api.instance import Instance, unwrap_generation_output
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from mm_llama.frontends.lmms_eval import model as plugin
    from mm_llama.frontends.lmms_eval.model import MMLlamaLMM, cut_at_stop_sequences
ImageFile.LOAD_TRUNCATED_IMAGES = PIL_LOADS_TRUNCATED_IMAGES

from mm_llama.imagebind import ImageBindVisionConfig, ImageBindVisionModel, load_image, load_video
from mm_llama.frontends.lmms_eval.cache import media_content_hash
from test_data_build import IMAGE_SIZE, write_image, write_video
from test_merge import REPO_ROOT, save_stage1

TASK, MC_TASK = "mm_llama_tiny_pope", "mm_llama_tiny_mc"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
MAX_NEW_TOKENS = 5
# doc id -> (question, answer, media type, media file name). Docs 5-7 have bad media: a corrupt PNG (the task's
# PIL decode fails), a corrupt mp4 (ImageBind's decoder fails) and a missing video (the task calls sys.exit, as
# lmms-eval's ActivityNet-QA does).
DOCS = [
    ("Is there a red square in the image?", "yes", "image", "img0.png"),
    ("Is there a cat in the image?", "no", "image", "img1.png"),
    ("Is there a dog in the image?", "no", "image", "img2.png"),
    ("Is the background blue?", "yes", "image", "img3.png"),
    ("Does a white bar move in the video?", "yes", "video", "clip.mp4"),
    ("Is there a person in the image?", "no", "image", "corrupt.png"),
    ("Is the video dark?", "no", "video", "corrupt.mp4"),
    ("Is anyone talking in the video?", "no", "video", "missing.mp4"),
]
GOOD, BAD = [0, 1, 2, 3, 4], [5, 6, 7]

TASK_UTILS = '''
import os
import sys

from PIL import Image


def doc_to_visual(doc):
    path = os.path.join(os.path.dirname(__file__), "media", doc["file"])
    if doc["media_type"] == "image":
        return [Image.open(path).convert("RGB")]  # as lmms-eval's POPE: a PIL image
    if not os.path.exists(path):
        sys.exit(f"video path:{path} does not exist, please check")  # as lmms-eval's ActivityNet-QA
    return [path]  # as lmms-eval's video tasks: a file path
'''

POPE_YAML = f'''
task: {TASK}
dataset_path: @DATA@
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_task_utils.doc_to_visual
doc_to_text: !function lmms_eval.tasks.pope.utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.pope.utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(POST_PROMPT)}
metadata:
  - version: 0.0
'''

MC_YAML = f'''
task: {MC_TASK}
dataset_path: @DATA@
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function tiny_task_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  - version: 0.0
'''


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def lmms_eval_process(monkeypatch):
    """PIL as lmms-eval sets it in its own process (see the imports above), for this file's tests only."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, spm_model_path):
    """Two tiny checkpoints without a vision tower, a tiny ImageBind folder, media files, and the two tasks."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("lmms")
    checkpoints = [save_stage1(root / f"stage1_{seed}", spm_model_path, seed=seed) for seed in (0, 1)]
    torch.manual_seed(0)
    ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=IMAGE_SIZE)).save_pretrained(
        root / "imagebind")
    tasks = root / "tasks"
    media = tasks / "media"
    for index in range(4):
        write_image(media / f"img{index}.png", seed=index, fmt="PNG")
    write_video(media / "clip.mp4", seed=0)
    (media / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    rows = [{"question_id": f"q{i}", "question": q, "answer": a, "label": ["yes", "no"].index(a), "media_type": t,
             "file": f} for i, (q, a, t, f) in enumerate(DOCS)]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(root / "pope_data"))
    DatasetDict({"test": Dataset.from_list([rows[i] for i in (0, 1, 4)])}).save_to_disk(str(root / "mc_data"))
    (tasks / "tiny_task_utils.py").write_text(TASK_UTILS)
    (tasks / f"{TASK}.yaml").write_text(POPE_YAML.replace("@DATA@", str(root / "pope_data")))
    (tasks / f"{MC_TASK}.yaml").write_text(MC_YAML.replace("@DATA@", str(root / "mc_data")))
    return {"root": root, "checkpoints": checkpoints, "imagebind": root / "imagebind", "tasks": tasks,
            "media": media, "rows": rows}


@pytest.fixture
def forward_calls(monkeypatch):
    """Counts ImageBind forward passes (any instance), independently of the plugin's own counters."""
    calls = []
    original = ImageBindVisionModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageBindVisionModel, "forward", counting)
    return calls


@pytest.fixture
def instances(monkeypatch):
    """The MMLlamaLMM objects that lmms-eval creates from `--model mm_llama` (to inspect them after the run)."""
    created = []
    original = MMLlamaLMM.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(MMLlamaLMM, "__init__", recording)
    return created


def model_args(bench, checkpoint: int = 0, cache: str = "cache", **extra) -> str:
    args = {"pretrained": bench["checkpoints"][checkpoint], "imagebind": bench["imagebind"], "device": "cpu",
            "embedding_cache": bench["root"] / cache, **extra}
    return ",".join(f"{key}={value}" for key, value in args.items())


def run_tasks(bench, args: str, tasks=(TASK, MC_TASK), include_path=None, batch_size: int = 3) -> dict:
    manager = TaskManager("WARNING", include_path=str(include_path or bench["tasks"]), include_defaults=False)
    return simple_evaluate(model="mm_llama", model_args=args, tasks=list(tasks), task_manager=manager,
                           batch_size=batch_size, bootstrap_iters=0, log_samples=True, verbosity="WARNING")


def direct_embedding(encoder, media_type: str, path: Path) -> torch.Tensor:
    with torch.no_grad():
        if media_type == "image":
            return encoder.embed_images(load_image(path, image_size=IMAGE_SIZE)[None])[0]
        return encoder.embed_videos(load_video(path, image_size=IMAGE_SIZE)[None])[0]


def direct_answer(model, processor, text: str, media_type: str | None, embedding: torch.Tensor | None) -> str:
    """Greedy answer from the processor's Meta-format prompt and a direct `model.generate` call."""
    content = [{"type": "text", "text": text}] + ([{"type": media_type}] if media_type else [])
    media = embedding.view(1, 1, -1) if embedding is not None else None
    inputs = processor([{"role": "user", "content": content}], media_embeds=media, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=processor.pad_token_id)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------- tests


def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    points = {point.name: point.value for point in entry_points(group="lmms_eval.models")}
    assert points.get("mm_llama") == "mm_llama.frontends.lmms_eval:manifest", (
        "the lmms_eval.models entry point is missing: reinstall the package (pip install -e '.[eval]')")
    assert get_model("mm_llama") is MMLlamaLMM


def test_lmms_eval_models_command_lists_the_model():
    listing = subprocess.run([sys.executable, "-m", "lmms_eval", "models"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in listing.splitlines() if line.strip()}
    assert rows.get("mm_llama") == ["simple"], listing[-2000:]


def test_tasks_run_through_lmms_eval_with_the_right_media_and_a_warm_cache(bench, forward_calls, instances, caplog,
                                                                          capsys):
    caplog.set_level(logging.WARNING, logger=plugin.__name__)
    results = run_tasks(bench, model_args(bench))
    first_run_forwards = len(forward_calls)  # (the checks below run the encoder themselves)
    lm = instances[-1]
    assert lm.batch_size == results["config"]["batch_size"] == 3  # lmms-eval's batch_size, the one it reports

    # Metrics come back for both tasks.
    metrics = results["results"]
    assert 0.0 <= metrics[TASK]["pope_accuracy,none"] <= 1.0
    assert 0.0 <= metrics[TASK]["pope_f1_score,none"] <= 1.0
    assert 0.0 <= metrics[MC_TASK]["acc,none"] <= 1.0

    # Each document's media reached the model: the content hash of its image / video, and the cached embedding of
    # that hash is what ImageBind gives for the document's own file.
    encoder = ImageBindVisionModel.from_pretrained(bench["imagebind"]).eval()
    expected_embeddings = {}
    for doc_id in GOOD:
        media_type, path = DOCS[doc_id][2], bench["media"] / DOCS[doc_id][3]
        source = Image.open(path).convert("RGB") if media_type == "image" else path
        content_hash = media_content_hash(source)
        assert lm.media_by_doc[(TASK, "test", doc_id)] == [(media_type, content_hash)]
        cached = torch.from_numpy(np.load(lm.embedder.cache.path(media_type, content_hash)))
        expected_embeddings[doc_id] = direct_embedding(encoder, media_type, path)
        torch.testing.assert_close(cached.view(-1), expected_embeddings[doc_id], rtol=0, atol=1e-6)
    assert {key[2]: value for key, value in lm.media_by_doc.items() if key[0] == MC_TASK} == {
        0: lm.media_by_doc[(TASK, "test", 0)], 1: lm.media_by_doc[(TASK, "test", 1)],
        2: lm.media_by_doc[(TASK, "test", 4)]}

    # Answers are MM-LLaMA's greedy answers to the task's prompt in the Meta template, document by document.
    from transformers import AutoModelForCausalLM

    from mm_llama import MMLlamaProcessor

    model = AutoModelForCausalLM.from_pretrained(bench["checkpoints"][0]).eval()
    processor = MMLlamaProcessor.from_pretrained(bench["checkpoints"][0])
    answers = {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"][TASK]}
    for doc_id in GOOD:
        expected = direct_answer(model, processor, DOCS[doc_id][0] + POST_PROMPT, DOCS[doc_id][2],
                                 expected_embeddings[doc_id])
        assert answers[doc_id] == expected
        assert expected  # a random tiny model still says something, so the comparison is not "" == ""

    # Bad media: an empty answer, one warning naming each document, counted in the summary; the run completed.
    assert [answers[doc_id] for doc_id in BAD] == ["", "", ""]
    assert sorted(key[2] for key in lm.bad_media) == BAD
    assert lm.bad_media[(TASK, "test", 5)].startswith("the task could not load it: OSError")  # PIL's decode
    assert "corrupt.mp4" in lm.bad_media[(TASK, "test", 6)]
    assert "missing.mp4" in lm.bad_media[(TASK, "test", 7)] and "does not exist" in lm.bad_media[(TASK, "test", 7)]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for doc_id in BAD:
        assert sum(f"{TASK} (test) doc {doc_id}:" in message for message in warnings) == 1
    out = capsys.readouterr().out
    assert "mm_llama: 3 documents had unusable media and were left unanswered" in out

    # First run: every distinct good medium embedded once (the multiple-choice task reuses them), none from disk.
    assert lm.summary()["cache_hits"] == 0 and lm.summary()["embedded"] == len(GOOD)
    assert first_run_forwards == len(GOOD)
    assert f"{len(GOOD)} distinct media, 0 found in the cache (0.0% hits), {len(GOOD)} embedded" in out

    # Second run, with another checkpoint on the same benchmark: everything from the cache, no ImageBind forward.
    forward_calls.clear()
    caplog.clear()
    rerun = run_tasks(bench, model_args(bench, checkpoint=1))
    lm2 = instances[-1]
    assert lm2 is not lm
    assert len(forward_calls) == 0
    summary = lm2.summary()
    assert (summary["cache_hits"], summary["embedded"], summary["cache_hit_rate"]) == (len(GOOD), 0, 1.0)
    assert lm2.media_by_doc == lm.media_by_doc
    assert f"{len(GOOD)} found in the cache (100.0% hits), 0 embedded with ImageBind" in capsys.readouterr().out
    assert "pope_accuracy,none" in rerun["results"][TASK]


SCORED_TASK = "mm_llama_tiny_mc_scored"
SCORED_CHOICES = ["yes", "no", "red", "blue"]
SCORED_YAML = f'''
task: {SCORED_TASK}
dataset_path: @DATA@
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function tiny_task_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_choice: {json.dumps(SCORED_CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  - version: 0.0
'''


def test_lmms_evals_multiple_choice_scoring_takes_the_most_likely_choice_and_fails_unusable_media(bench, tmp_path):
    """A 4-choice task scored by lmms-eval itself (its requests, its process_results): each good document's answer is
    the choice that MM-LLaMA finds most likely (computed here directly), so acc is 1 on each of them; the documents
    with unusable media score 0 on every metric, whichever choice is right (choice 0 included, which a tie picks)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    from mm_llama import MMLlamaProcessor

    model = AutoModelForCausalLM.from_pretrained(bench["checkpoints"][0]).eval()
    processor = MMLlamaProcessor.from_pretrained(bench["checkpoints"][0])
    encoder = ImageBindVisionModel.from_pretrained(bench["imagebind"]).eval()
    rows, most_likely = [], {}
    for doc_id, row in enumerate(bench["rows"]):
        if doc_id in GOOD:
            media_type = row["media_type"]
            embedding = direct_embedding(encoder, media_type, bench["media"] / row["file"])
            logprobs = [direct_loglikelihood(model, processor, row["question"], " " + choice, media_type, embedding)[0]
                        for choice in SCORED_CHOICES]
            most_likely[doc_id] = int(np.argmax(logprobs))
            assert sorted(logprobs)[-1] > sorted(logprobs)[-2]  # no tie
        rows.append({**row, "label": most_likely.get(doc_id, {5: 0, 6: 3, 7: 0}.get(doc_id))})
    tasks = tmp_path / "tasks"
    shutil.copytree(bench["tasks"] / "media", tasks / "media")
    (tasks / "tiny_task_utils.py").write_text(TASK_UTILS)
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "data"))
    (tasks / f"{SCORED_TASK}.yaml").write_text(SCORED_YAML.replace("@DATA@", str(tmp_path / "data")))

    results = run_tasks(bench, model_args(bench, cache="scored_cache"), tasks=[SCORED_TASK], include_path=tasks)
    scores = {sample["doc_id"]: sample for sample in results["samples"][SCORED_TASK]}
    for doc_id in GOOD:
        assert scores[doc_id]["acc"] == 1.0, (doc_id, scores[doc_id]["filtered_resps"])
    for doc_id in BAD:
        assert (scores[doc_id]["acc"], scores[doc_id]["acc_norm"]) == (0, 0)
    assert results["results"][SCORED_TASK]["acc,none"] == pytest.approx(len(GOOD) / len(DOCS))


@pytest.fixture(scope="module")
def lm(bench, tmp_path_factory):
    """A plugin instance made directly, with a task_dict as lmms-eval sets it."""
    instance = MMLlamaLMM(pretrained=str(bench["checkpoints"][0]), imagebind=str(bench["imagebind"]), device="cpu",
                          embedding_cache=str(tmp_path_factory.mktemp("direct_cache")), batch_size=3)
    instance.task_dict = {"t": {"test": bench["rows"]}}
    return instance


def visual_fn(bench):
    def doc_to_visual(doc):
        path = bench["media"] / doc["file"]
        return [Image.open(path).convert("RGB")] if doc["media_type"] == "image" else [str(path)]

    return doc_to_visual


def request(kind: str, arguments: tuple, doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": doc_id,
                                                                             "repeats": 1})


def direct_loglikelihood(model, processor, context: str, continuation: str, media_type: str | None,
                         embedding: torch.Tensor | None) -> tuple[float, bool]:
    """log P(continuation | prompt) from full logits: the generation prompt's ids followed by the continuation's
    sentencepiece ids (as generation would produce them after "[/INST]")."""
    content = [{"type": "text", "text": context}] + ([{"type": media_type}] if media_type else [])
    media = embedding.view(1, 1, -1) if embedding is not None else None
    prompt = processor([{"role": "user", "content": content}], media_embeds=media, add_generation_prompt=True)
    answer = torch.tensor([processor.tokenizer.encode_text(continuation.strip())])
    ids = torch.cat([prompt["input_ids"], answer], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, media_embeds=media).logits[0]
    predicting = logits[prompt["input_ids"].shape[1] - 1: -1].log_softmax(-1)
    logprob = predicting.gather(-1, answer[0][:, None]).sum().item()
    return logprob, bool((predicting.argmax(-1) == answer[0]).all())


@contextlib.contextmanager
def greedy_answer(model, processor, contexts, doc_media):
    """Finds (context, doc id, " x") whose two continuation tokens ("▁", "x") are the model's greedy answer. A random
    tiny model rarely starts an answer with "▁" (and the tiny vocabulary has no whole words), so the "▁" row of the
    LM head becomes twice the row of the current argmax (whose logit is positive there); the next greedy token must
    then be a piece that the text encodes back to. Restores the row afterwards."""
    space = processor.tokenizer.encode_text("x")[0]
    head = model.language_model.lm_head.weight
    saved = head[space].clone()
    try:
        for context in contexts:
            for doc_id, (media_type, embedding) in doc_media.items():
                content = [{"type": "text", "text": context}, {"type": media_type}]
                inputs = processor([{"role": "user", "content": content}], media_embeds=embedding.view(1, 1, -1),
                                   add_generation_prompt=True)
                with torch.no_grad():
                    head[space] = saved
                    logits = model(**inputs).logits[0, -1]
                    if logits.max() <= 0:
                        continue
                    head[space] = 2 * head[int(logits.argmax())]
                    out = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                                         pad_token_id=processor.pad_token_id)
                tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
                text = processor.decode(tokens).lstrip()
                if tokens[0] == space and text and processor.tokenizer.encode_text(text) == tokens:
                    yield context, doc_id, " " + text
                    return
        raise AssertionError("no prompt with a greedy answer that text encodes back to; add contexts")
    finally:
        with torch.no_grad():
            head[space] = saved


def test_loglikelihood_equals_the_continuations_log_probability(bench, lm):
    from mm_llama import MMLlamaProcessor

    model, processor = lm.model, MMLlamaProcessor.from_pretrained(bench["checkpoints"][0])
    encoder = lm.embedder.encoder
    doc_media = {doc_id: (DOCS[doc_id][2], direct_embedding(encoder, DOCS[doc_id][2], bench["media"] / DOCS[doc_id][3]))
                 for doc_id in GOOD}
    cases = [  # (doc id, context, continuation)
        (0, "Is there a red square?", " yes"),
        (0, "Is there a red square?", " no"),
        (1, "What colour is the triangle?", " It is yellow."),
        (4, "Does a white bar move in the video?", " yes"),
    ]
    doc_to_visual = visual_fn(bench)
    contexts = ["Describe it.", "What is this?", "Which colour is it?", "Hello there", "How many shapes are there?"]
    with greedy_answer(model, processor, contexts, doc_media) as (greedy_context, greedy_doc, greedy_continuation):
        cases.append((greedy_doc, greedy_context, greedy_continuation))
        requests = [request("loglikelihood", (context, continuation, doc_to_visual, doc_id, "t", "test"), doc_id)
                    for doc_id, context, continuation in cases]
        requests.append(request("loglikelihood", ("", " no")))  # acc_mutual_info's unconditional form
        requests.append(request("loglikelihood", ("Is it?", " yes", doc_to_visual, 5, "t", "test"), 5))  # corrupt
        got = [unwrap_generation_output(output)[0] for output in lm.loglikelihood(requests)]
        expected = [direct_loglikelihood(model, processor, context, continuation, *doc_media[doc_id])
                    for doc_id, context, continuation in cases]
        expected.append(direct_loglikelihood(model, processor, "", " no", None, None))
        other_image = direct_loglikelihood(model, processor, "Is there a red square?", " yes", *doc_media[1])

    for (loss, greedy), (expected_logprob, expected_greedy) in zip(got, expected):
        assert loss == pytest.approx(-expected_logprob, abs=1e-4)  # lmms-eval's scores are losses
        assert greedy == expected_greedy
    assert got[1][0] != pytest.approx(got[0][0])  # the continuation matters
    assert got[0][0] != pytest.approx(-other_image[0])  # and so does the image
    assert got[4][1] is True and got[2][1] is False
    assert got[6] == (math.inf, False)  # a plain doc_to_visual names no task: the largest loss
    assert ("t", "test", 5) in lm.bad_media


def test_batched_generation_equals_unbatched_greedy(bench, lm):
    doc_to_visual = visual_fn(bench)
    kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    prompts = [(0, "Is there a red square in the image?"), (1, "What is this?"),
               (4, "Describe what happens in this video in a few words."), (2, "Colour?"),
               (3, "Is the background blue?")]
    requests = [request("generate_until", (text, dict(kwargs), doc_to_visual, doc_id, "t", "test"), doc_id)
                for doc_id, text in prompts]
    lm.batch_size = 3
    batched = lm.generate_until(requests)
    lm.batch_size = 1
    unbatched = lm.generate_until(requests)
    assert batched == unbatched
    assert all(batched) and len(set(batched)) > 1


def test_generation_settings_follow_the_task(lm):
    settings, until = lm._generation_settings({"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9,
                                               "do_sample": True, "until": "\n"})
    assert (settings.max_new_tokens, settings.temperature, settings.top_p, until) == (32, 0.7, 0.9, ("\n",))
    settings, _ = lm._generation_settings({"temperature": 0.7, "do_sample": False})
    assert settings.temperature == 0.0 and settings.max_new_tokens == plugin.DEFAULT_MAX_NEW_TOKENS
    lm.max_new_tokens = 16  # model_args max_new_tokens caps the task's value
    try:
        assert lm._generation_settings({"max_new_tokens": 128})[0].max_new_tokens == 16
        assert lm._generation_settings({"max_new_tokens": 8})[0].max_new_tokens == 8
    finally:
        lm.max_new_tokens = None
    assert cut_at_stop_sequences("yes\n\nbecause", ("\n\n", "USER:")) == "yes"


def test_every_document_failing_is_an_error_not_empty_answers(bench, lm):
    doc_to_visual = visual_fn(bench)
    requests = [request("generate_until", ("Q?", {}, doc_to_visual, doc_id, "t", "test"), doc_id) for doc_id in BAD[:2]]
    with pytest.raises(RuntimeError, match="none of the 2 documents' media could be used"):
        lm.generate_until(requests)


def test_batch_size_is_lmms_evals_so_that_its_report_is_right(bench):
    """lmms-eval prints its --batch_size in the results header (and records it in results["config"]): a different
    batch_size in --model_args is refused before the model loads, an equal one is accepted."""
    args = f"pretrained={bench['checkpoints'][0]},imagebind={bench['imagebind']},device=cpu,embedding_cache=none"
    with pytest.raises(ValueError, match=r"batch_size=8 in --model_args differs from lmms-eval's --batch_size "
                                         r"\(1; 1 when not given\).*--batch_size 8"):
        MMLlamaLMM.create_from_arg_string(args + ",batch_size=8", {"batch_size": "1", "device": None})
    lm = MMLlamaLMM.create_from_arg_string(args + ",batch_size=4", {"batch_size": "4", "max_batch_size": None})
    assert lm.batch_size == 4


def test_decoding_options_reach_the_one_decoding_route(bench):
    """`compile=` / `prompt_lookup_num_tokens=` become the model's DecodingOptions, which generation.generate uses."""
    from mm_llama.generation import decoding_options

    args = f"pretrained={bench['checkpoints'][0]},imagebind={bench['imagebind']},device=cpu,embedding_cache=none"
    lm = MMLlamaLMM.create_from_arg_string(args + ",compile=True,prompt_lookup_num_tokens=4", {"batch_size": "1"})
    options = decoding_options(lm.model)
    assert (options.compile, options.prompt_lookup_num_tokens) == (True, 4)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be a positive integer"):
        MMLlamaLMM.create_from_arg_string(args + ",prompt_lookup_num_tokens=0", {"batch_size": "1"})


def test_clear_errors_for_wrong_model_args(bench):
    with pytest.raises(TypeError, match="unknown model_args \\['temprature'\\]"):
        MMLlamaLMM(pretrained=str(bench["checkpoints"][0]), temprature=0.2)
    with pytest.raises(ValueError, match="imagebind=FOLDER"):
        MMLlamaLMM(pretrained=str(bench["checkpoints"][0]), device="cpu", embedding_cache="none")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        MMLlamaLMM(pretrained=str(bench["checkpoints"][0]), batch_size="auto")


@pytest.mark.slow
def test_command_line_run_writes_results_and_the_summary(bench, tmp_path):
    """`python -m lmms_eval --model mm_llama ...` as the README gives it: metrics written, summary printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mm_llama", "--model_args", model_args(bench, cache="cli_cache"),
         "--tasks", TASK, "--include_path", str(bench["tasks"]), "--batch_size", "2", "--output_path",
         str(tmp_path / "results"), "--verbosity", "WARNING"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "batch_size: 2" in result.stdout  # lmms-eval's results header: the batch size the model used
    assert f"{len(GOOD)} distinct media, 0 found in the cache (0.0% hits), {len(GOOD)} embedded" in result.stdout
    assert "3 documents had unusable media" in result.stdout
    for doc_id in BAD:  # each warning reaches the terminal too
        assert f"{TASK} (test) doc {doc_id}: unusable media, left unanswered" in result.stderr
    written = list((tmp_path / "results").rglob("*results*.json"))
    assert written and TASK in json.loads(written[0].read_text())["results"]


def test_cache_keys_follow_the_encoder_and_the_content(bench, tmp_path):
    """The fingerprint changes with the weights, the dtype and the preprocessing, not with the folder the weights
    were loaded from; a damaged entry is embedded again and rewritten; equal pixels share an entry."""
    from mm_llama.imagebind import ImageBindProcessor
    from mm_llama.frontends.lmms_eval.cache import CachedMediaEmbedder, encoder_fingerprint

    encoder = ImageBindVisionModel.from_pretrained(bench["imagebind"]).eval()
    processor = ImageBindProcessor(image_size=IMAGE_SIZE)
    fingerprint = encoder_fingerprint(encoder, processor)[0]
    encoder.save_pretrained(tmp_path / "elsewhere")
    moved = ImageBindVisionModel.from_pretrained(tmp_path / "elsewhere").eval()
    assert encoder_fingerprint(moved, processor)[0] == fingerprint
    assert encoder_fingerprint(encoder, ImageBindProcessor(image_size=IMAGE_SIZE, num_crops=1))[0] != fingerprint
    assert encoder_fingerprint(moved.to(torch.bfloat16), processor)[0] != fingerprint
    torch.manual_seed(1)
    other = ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=IMAGE_SIZE))
    assert encoder_fingerprint(other, processor)[0] != fingerprint

    embedder = CachedMediaEmbedder(1024, 1, encoder, processor)
    embedder.open_cache(tmp_path / "cache")
    image = Image.open(bench["media"] / "img0.png").convert("RGB")
    first = embedder.embed({"type": "image", "image": image})
    entry = embedder.cache.path("image", media_content_hash(image))
    entry.write_bytes(entry.read_bytes()[:20])  # a half-written or damaged file
    again = CachedMediaEmbedder(1024, 1, encoder, processor)
    again.open_cache(tmp_path / "cache")
    torch.testing.assert_close(again.embed({"type": "image", "image": image.copy()}), first, rtol=0, atol=0)
    assert (again.stats.hits, again.stats.misses) == (0, 1)
    assert np.load(entry).shape == (1024,)  # rewritten whole
    third = CachedMediaEmbedder(1024, 1, encoder, processor)
    third.open_cache(tmp_path / "cache")
    torch.testing.assert_close(third.embed({"type": "image", "image": image}), first, rtol=0, atol=0)
    assert (third.stats.hits, third.stats.misses) == (1, 0)
    assert media_content_hash(image) != media_content_hash(image.convert("L"))
    assert json.loads((embedder.cache.root / "encoder.json").read_text())["fingerprint"] == fingerprint
