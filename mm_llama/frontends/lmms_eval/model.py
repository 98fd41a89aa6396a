"""`MMLlamaLMM`: MM-LLaMA behind lmms-eval's model interface (`--model mm_llama`). Over 400 lines because it is one
lmms-eval model class with its request handling, error accounting and summary.

Each request names a document; the task's `doc_to_visual(doc)` gives its media (PIL images, or image / video file
paths). Media are embedded with ImageBind (the model's vision tower, or `imagebind=FOLDER`) through an on-disk cache
(`cache.py`), the task's prompt becomes one user turn with the media after its text in MM-LLaMA's Meta-exact LLaMA-2
template, and answers are generated in left-padded batches (`mm_llama.generation`).

`loglikelihood` returns lmms-eval's (loss, is_greedy) pairs: a continuation's negative log-likelihood, lower is better
(`scoring.py` gives lmms-eval's convention).

Bad media (an unreadable image or video, or a task that cannot load a document's media) never stop a run: the
document gets an empty answer (`generate_until`) or, for `loglikelihood`, scores that lmms-eval counts as wrong
(`scoring.unusable_media_score`), a warning names its task and doc id, and `clean()` (which lmms-eval calls once all
requests are answered) prints how many documents were affected, next to the embedding cache's hit rate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import astuple
from pathlib import Path
from typing import Any, Callable, Sequence

import PIL.Image
import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from tqdm.auto import tqdm

from ...generation import (DecodingOptions, GenerationSettings, generate_batched, infer_media_type, prompt_conversation,
                          set_decoding_options)
from ...imagebind.processing_imagebind import MediaLoadError
from ...loading import load_model
from ...model.loss_mm_llama import LossBackend
from ...model.processing_mm_llama import IGNORE_INDEX
from .cache import CachedMediaEmbedder, default_cache_dir
from .scoring import RIGHT_CHOICE_WITHOUT_MEDIA, Score, loss_score, task_of, unusable_media_score

logger = logging.getLogger(__name__)

# The `--model_args` keys, as docs/benchmarks.md lists them (lmms-eval adds batch_size / device / max_batch_size itself;
# lmms-eval's --batch_size is the batch size, see `create_from_arg_string`).
MODEL_ARGS = ("pretrained", "imagebind", "base_model", "device", "dtype", "load_in_4bit", "batch_size",
              "max_new_tokens", "system_prompt", "embedding_cache", "max_batch_size", "compile",
              "prompt_lookup_num_tokens")
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the task nor model_args give one
LISTED_BAD_DOCS = 20  # documents named in the end-of-run summary (each one also had its own warning)

DocKey = tuple[str, str, Any]  # (task, split, doc_id)

# lmms-eval 0.7.x's evaluator passes every model output through `unwrap_generation_output`, which turns anything but
# a string, a (str, counts) pair or a GenerationResult into `str(output)`: a loglikelihood result (float, bool) would
# reach the multiple-choice scoring as the text "(-1.2, False)" and crash it, for every model. A GenerationResult's
# `text` is passed on as it is, so the scores travel inside one where the installed lmms-eval needs it.
_HARNESS_STRINGIFIES_SCORES = not isinstance(unwrap_generation_output((0.0, True))[0], tuple)


class UnsupportedMediaError(ValueError):
    """A document's media that MM-LLaMA cannot take (several items, audio, raw frame arrays)."""


# Errors that mean "this document's media is unusable" (not a bug, not a configuration problem): the model answers the
# other documents. OSError covers PIL's "image file is truncated" on lazily decoded images.
BAD_MEDIA_ERRORS = (MediaLoadError, UnsupportedMediaError, OSError, SyntaxError)


class MMLlamaLMM(lmms):
    """MM-LLaMA for lmms-eval.

    Args (the `--model_args` keys):
        pretrained: an MM-LLaMA folder (merged, stage-1, or stage-2 adapter; see `mm_llama.loading.load_model`).
        imagebind: a converted ImageBind vision model folder; needed unless the checkpoint has its own vision tower.
        base_model: for a stage-2 adapter folder, the stage-1 folder when the recorded one is not here.
        device: "cuda", "cuda:1", "cpu" (default: the first GPU, else CPU).
        dtype: "bfloat16" / "float16" / "float32" (default: bfloat16 on GPU, float32 on CPU).
        load_in_4bit: quantise the language model to nf4 (bitsandbytes).
        batch_size: prompts per generation / scoring batch (lmms-eval's `--batch_size`).
        max_new_tokens: upper bound on generated tokens per answer (the task's own value applies when it is lower;
            256 when neither gives one).
        system_prompt: a system prompt (or a file holding one); none by default.
        embedding_cache: folder of the embedding cache (default `$MM_LLAMA_EMBEDDING_CACHE` or
            `~/.cache/mm_llama/embeddings`); "none" or false turns it off.
        max_batch_size: accepted for lmms-eval's `--max_batch_size`; unused.
    """

    is_simple = True

    def __init__(self, pretrained: str, imagebind: str | None = None, base_model: str | None = None,
                 device: str | None = None, dtype: str | None = None, load_in_4bit: bool = False,
                 batch_size: int | str = 1, max_new_tokens: int | None = None, system_prompt: str | None = None,
                 embedding_cache: str | bool | None = None, max_batch_size: int | None = None,
                 compile: bool = False, prompt_lookup_num_tokens: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"mm_llama: unknown model_args {sorted(unknown)}; the known ones are "
                            f"{', '.join(MODEL_ARGS)}.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("mm_llama runs in one process: start `python -m lmms_eval` directly, not through "
                             "accelerate launch / torchrun (one GPU evaluates a 7B MM-LLaMA).")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = None if max_new_tokens is None else _positive_int(max_new_tokens, "max_new_tokens")
        self.model, self.processor = load_model(pretrained, device=device, dtype=dtype, load_in_4bit=bool(load_in_4bit),
                                                base_model=base_model)
        lookup = None if prompt_lookup_num_tokens is None else _positive_int(prompt_lookup_num_tokens,
                                                                              "prompt_lookup_num_tokens")
        set_decoding_options(self.model, DecodingOptions(compile=bool(compile), prompt_lookup_num_tokens=lookup))
        self._device = next(self.model.parameters()).device
        self.embedder = CachedMediaEmbedder.for_model(self.model, self.processor, imagebind=imagebind,
                                                      device=self._device, dtype=dtype)
        if self.embedder.encoder is None:
            # Checked now: otherwise every document would fail as "bad media" after the model has loaded.
            raise ValueError(f"{pretrained} has no vision tower, and benchmarks give raw images and videos: add "
                             "imagebind=FOLDER (a converted ImageBind vision model) to --model_args.")
        cache_dir = _cache_dir(embedding_cache)
        if cache_dir is not None:
            self.embedder.open_cache(cache_dir)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.bad_media: dict[DocKey, str] = {}  # documents whose media could not be used -> why
        self.media_by_doc: dict[DocKey, list[tuple[str, str]]] = {}  # -> [(media type, content sha256)]
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MMLlamaLMM":
        """As lmms-eval's (a key given in `--model_args` wins over lmms-eval's own option of that name), except for the
        batch size: lmms-eval prints its `--batch_size` (default 1) in the results header and records it in
        `results["config"]`, so that is the one the model uses, and `batch_size=N` in `--model_args` must agree."""
        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        if "batch_size" in args and "batch_size" in extra and (
                _positive_int(args["batch_size"], "batch_size") != _positive_int(extra["batch_size"], "batch_size")):
            raise ValueError(f"mm_llama: batch_size={args['batch_size']} in --model_args differs from lmms-eval's "
                             f"--batch_size ({extra['batch_size']}; 1 when not given), which is what lmms-eval reports "
                             f"in its results: give the batch size as --batch_size {args['batch_size']}.")
        return cls(**{**extra, **args})

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------------ media

    def _document_media(self, doc_to_visual: Callable, task: str, split: str, doc_id: Any) -> list[dict] | None:
        """The document's media as content parts with embeddings (at most one), or None when unusable."""
        key = (task, split, doc_id)
        if key in self.bad_media:
            return None
        # Task code decodes the media (any error means this document's media is unusable), and some tasks call
        # sys.exit on a missing video (lmms-eval's ActivityNet-QA).
        try:
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        except (Exception, SystemExit) as err:  # noqa: BLE001
            self._record_bad_media(key, f"the task could not load it: {type(err).__name__}: {err}")
            return None
        try:
            if len(visuals) > 1:
                raise UnsupportedMediaError(f"{len(visuals)} images/videos; MM-LLaMA answers about one per question")
            parts, record = [], []
            for visual in visuals:
                part, content_hash = self._embed_visual(visual)
                parts.append(part)
                record.append((part["type"], content_hash))
        except BAD_MEDIA_ERRORS as err:
            self._record_bad_media(key, f"{type(err).__name__}: {err}")
            return None
        self.media_by_doc[key] = record
        return parts

    def _embed_visual(self, visual: Any) -> tuple[dict, str]:
        """One document visual -> (`{"type", "embeds"}` content part, content sha256)."""
        if isinstance(visual, PIL.Image.Image):
            media_type, part = "image", {"type": "image", "image": visual}
        elif isinstance(visual, (str, os.PathLike)) and infer_media_type(visual) in ("image", "video"):
            media_type = infer_media_type(visual)
            part = {"type": media_type, "path": str(visual)}
        else:
            raise UnsupportedMediaError(f"a {type(visual).__name__} visual ({str(visual)[:80]!r}); MM-LLaMA takes PIL "
                                        "images and image or video files here")
        embeds = self.embedder.embed(part)
        source = part.get("image", part.get("path"))
        return {"type": media_type, "embeds": embeds}, self.embedder.content_hash(source)

    def _record_bad_media(self, key: DocKey, reason: str) -> None:
        self.bad_media[key] = reason
        task, split, doc_id = key
        logger.warning("mm_llama: %s (%s) doc %s: unusable media, left unanswered: %s", task, split, doc_id, reason)

    def _check_some_usable(self, keys: set[DocKey]) -> None:
        """Raises when every one of several documents failed: that is a missing download or a wrong path, not bad
        media, and it is better said before the task's judge (sometimes a paid API) scores empty answers."""
        if len(keys) >= 2 and keys <= self.bad_media.keys():
            first = next(iter(keys))
            raise RuntimeError(f"mm_llama: none of the {len(keys)} documents' media could be used; check that the "
                               f"benchmark's media are downloaded. First problem ({first[0]} doc {first[2]}): "
                               f"{self.bad_media[first]}")

    # ------------------------------------------------------------------------------------------------ requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers `(context, generation_kwargs, doc_to_visual, doc_id, task, split)` requests; greedy unless the task
        samples. Requests with the same settings are batched (longest prompts first, so batches pad little)."""
        answers = [""] * len(requests)
        groups: dict[tuple, list[tuple[int, list[dict], tuple[str, ...]]]] = {}
        keys: set[DocKey] = set()
        for index, request in enumerate(tqdm(requests, desc="mm_llama: media", disable=not requests)):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            keys.add((task, split, doc_id))
            media = self._document_media(doc_to_visual, task, split, doc_id)
            if media is None:
                continue
            settings, until = self._generation_settings(gen_kwargs)
            conversation = prompt_conversation(str(context), media[0] if media else None, system=self.system_prompt)
            groups.setdefault(astuple(settings), []).append((index, conversation, until))
        self._check_some_usable(keys)
        with tqdm(total=sum(map(len, groups.values())), desc="mm_llama: answering", disable=not groups) as bar:
            for settings_key, jobs in groups.items():
                jobs.sort(key=lambda job: -len(job[1][-1]["content"][0]["text"]))
                texts = generate_batched(self.model, self.processor, self.embedder, [job[1] for job in jobs],
                                         GenerationSettings(*settings_key), batch_size=self.batch_size,
                                         on_batch=lambda start, batch: bar.update(len(batch)))
                for (index, _, until), text in zip(jobs, texts):
                    answers[index] = cut_at_stop_sequences(text, until)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[Score]:
        """Scores `(context, continuation, doc_to_visual, doc_id, task, split)` requests (and the document-free
        `(context, continuation)` ones of `acc_mutual_info`): the continuation is what the model would say right after
        the generation prompt for the context (see `score_continuations`); returns lmms-eval's (loss, is_greedy):
        minus the sum of its tokens' log-probabilities, and whether greedy decoding gives exactly those tokens. A
        document with unusable media gets `unusable_media_score`s. With lmms-eval 0.7.x each pair comes wrapped in a
        `GenerationResult` (see `_HARNESS_STRINGIFIES_SCORES`); `unwrap_generation_output` unwraps it."""
        results: list[Score] = [RIGHT_CHOICE_WITHOUT_MEDIA] * len(requests)
        items: list[tuple[int, list[dict], str]] = []
        keys: set[DocKey] = set()
        for index, request in enumerate(requests):
            if len(request.args) == 2:
                (context, continuation), media = request.args, []
            else:
                context, target, doc_to_visual, doc_id, task, split = request.args
                keys.add((task, split, doc_id))
                media = self._document_media(doc_to_visual, task, split, doc_id)
                if media is None:
                    results[index] = unusable_media_score(task_of(doc_to_visual), self.task_dict[task][split][doc_id],
                                                          request.idx)
                    continue
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            conversation = prompt_conversation(str(context), media[0] if media else None, system=self.system_prompt)
            items.append((index, conversation, str(continuation)))
        self._check_some_usable(keys)
        for start in tqdm(range(0, len(items), self.batch_size), desc="mm_llama: scoring", disable=not items):
            chunk = items[start:start + self.batch_size]
            scores = self.score_continuations([(conversation, continuation) for _, conversation, continuation in chunk])
            for (index, _, _), (logprob, greedy) in zip(chunk, scores):
                results[index] = loss_score(logprob, greedy)
        if _HARNESS_STRINGIFIES_SCORES:
            return [GenerationResult(text=score) for score in results]  # type: ignore[arg-type]
        return results

    def score_continuations(self, items: Sequence[tuple[list[dict], str]]) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), continuation is the greedy one) for (conversation ending with a user turn
        whose media are given as embeddings, continuation) pairs, in one right-padded forward pass.

        The continuation's tokens are its sentencepiece ids after the generation prompt (which ends with "[/INST]"),
        exactly what generation would have to produce: the leading space that lmms-eval puts in a continuation is the
        template's own separator (sentencepiece's "▁" on the first piece), and neither the closing space nor the EOS
        of a training answer is scored.
        """
        encoded, spans = [], []
        for conversation, continuation in items:
            prompt = self.processor.encode_conversation(conversation, add_generation_prompt=True)
            text = continuation.lstrip()
            answer = self.processor.tokenizer.encode_text(text) if text else []
            spans.append((len(prompt.input_ids), len(answer)))
            prompt.input_ids = prompt.input_ids + answer  # only the ids are padded below; its labels are not used
            encoded.append(prompt)
        features = self.processor.pad(encoded, padding_side="right", with_labels=False)
        input_ids = torch.tensor(features["input_ids"])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (start, length) in enumerate(spans):
            labels[row, start:start + length] = input_ids[row, start:start + length]
        media = self.processor.prepare_media([item for prompt in encoded for item in prompt.media])
        inputs = {"input_ids": input_ids, "attention_mask": torch.tensor(features["attention_mask"]), **media}
        inputs = {name: value.to(self._device) for name, value in inputs.items()}
        with torch.no_grad():
            # Logits only where labels are set ([num_continuation_tokens, vocab], row-major): the LM head over the
            # prompt would be waste. The loss the model also returns is not used.
            logits = self.model(**inputs, labels=labels.to(self._device), loss_backend=LossBackend()).logits
        log_probs = logits.float().log_softmax(-1)
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].to(log_probs.device)
        scores, offset = [], 0
        for _, length in spans:
            row = slice(offset, offset + length)
            offset += length
            logprob = log_probs[row].gather(-1, targets[row, None]).sum().item() if length else 0.0
            scores.append((logprob, bool((log_probs[row].argmax(-1) == targets[row]).all())))
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mm_llama answers single-round tasks (generate_until and loglikelihood); "
                                  "multi-round tasks are not supported.")

    def _generation_settings(self, gen_kwargs: dict | None) -> tuple[GenerationSettings, tuple[str, ...]]:
        """A task's generation_kwargs -> (settings, stop sequences). Greedy unless the task samples."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new_tokens = int(kwargs.pop("max_new_tokens", None) or self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if kwargs.pop("do_sample", None) is False:
            temperature = 0.0
        top_p = kwargs.pop("top_p", None)
        num_beams = int(kwargs.pop("num_beams", 1) or 1)
        if num_beams > 1:
            self._warn_once("num_beams", f"mm_llama: num_beams={num_beams} is not supported; decoding without beams.")
        if kwargs:
            self._warn_once(f"ignored:{sorted(kwargs)}", f"mm_llama: ignoring generation_kwargs {sorted(kwargs)}.")
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=1.0 if top_p is None else float(top_p))
        return settings, tuple(stop for stop in until if stop)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------------------------------------ end of run

    def summary(self) -> dict[str, Any]:
        """The embedding cache's counts (distinct media this run) and the documents with unusable media."""
        stats = self.embedder.stats
        return {
            "cache_dir": str(self.embedder.cache.root) if self.embedder.cache is not None else None,
            "media_looked_up": stats.lookups,
            "cache_hits": stats.hits,
            "embedded": stats.misses,
            "cache_hit_rate": stats.hit_rate,
            "bad_media": len(self.bad_media),
            "bad_media_docs": [{"task": task, "split": split, "doc_id": doc_id, "reason": reason}
                               for (task, split, doc_id), reason in self.bad_media.items()],
        }

    def summary_lines(self) -> list[str]:
        summary = self.summary()
        if summary["cache_dir"] is None:
            lines = ["mm_llama: embedding cache off (embedding_cache=none): every medium was embedded with ImageBind."]
        else:
            lines = [f"mm_llama: embedding cache {summary['cache_dir']}: {summary['media_looked_up']} distinct media, "
                     f"{summary['cache_hits']} found in the cache ({100 * summary['cache_hit_rate']:.1f}% hits), "
                     f"{summary['embedded']} embedded with ImageBind."]
        lines.append(f"mm_llama: {summary['bad_media']} documents had unusable media and were left unanswered "
                     f"(an empty answer, or choice scores that count as wrong){':' if summary['bad_media'] else '.'}")
        for doc in summary["bad_media_docs"][:LISTED_BAD_DOCS]:
            lines.append(f"  {doc['task']} ({doc['split']}) doc {doc['doc_id']}: {doc['reason']}")
        if summary["bad_media"] > LISTED_BAD_DOCS:
            lines.append(f"  ... and {summary['bad_media'] - LISTED_BAD_DOCS} more (see the warnings above).")
        return lines

    def clean(self) -> None:
        """Called by lmms-eval after the last request: prints the summary, then frees the models."""
        for line in self.summary_lines():
            print(line, flush=True)
        self.embedder.encoder = None
        super().clean()


# ---------------------------------------------------------------------------------------------------- helpers


def cut_at_stop_sequences(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop sequence (lmms-eval's `until`)."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [item for visual in visuals for item in _flatten(visual)]


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mm_llama: {name} must be a positive integer, got {value!r}.") from None
    if number < 1:
        raise ValueError(f"mm_llama: {name} must be a positive integer, got {value!r}.")
    return number


def _cache_dir(setting: str | bool | None) -> Path | None:
    if setting is None or setting is True:
        return default_cache_dir()
    if setting is False or str(setting).lower() in ("none", "off", ""):
        return None
    return Path(str(setting)).expanduser()


__all__ = ["BAD_MEDIA_ERRORS", "MODEL_ARGS", "MMLlamaLMM", "UnsupportedMediaError", "cut_at_stop_sequences"]
