"""The batching engine: concurrent requests are gathered for a short window and decoded together.

One background thread owns the model. It takes the oldest waiting request, waits up to `batch_window` seconds for
more (up to `max_batch_size`) that share its sampling settings, and runs them as ONE left-padded batch through the
project's decoding route (`mm_llama.generation.build_generation_inputs` + `generate`), so N concurrent users cost
about one generation, not N. Requests that arrive meanwhile wait for the next batch (a static batch: rows are not
added to a running `generate`).

Per-row control goes through one transformers `StoppingCriteria` (`_BatchRows`) that returns a `[batch]` bool
tensor: it is called after every decoding step with the whole `input_ids`, before the step's token is streamed, so
it is the one place that sees each row's new token and decides, for that row alone, whether it is finished (EOS,
its own `max_tokens`, a stop string, or its client went away). It also turns each row's tokens into text deltas:
the row's tokens are decoded as a whole every step (so sentencepiece spaces and multi-byte characters come out
right) and only the new, settled part is sent; a request's streamed pieces join to exactly its final answer.

Why greedy answers in a batch equal the same request alone: left padding with the attention mask (as the chat CLI's
`--batch_file` does), and a row's finishing never changes the others' computation.
Sampling: requests batch only with requests of equal temperature and top_p. A request with `seed` (and temperature
> 0) runs in a batch of its own after `torch.manual_seed(seed)`, so the same request with the same seed gets the
same answer on the same server whatever else is being served.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria

from ...generation import (
    GenerationSettings,
    MediaEmbedder,
    build_generation_inputs,
    generate,
)
from ...model.processing_mm_llama import MMLlamaProcessor
from .schema import ApiError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One chat completion request on its way through the engine. Events go to `events` (an asyncio queue of the
    request's event loop) as `("delta", {"text"})`, then `("done", {"text", "finish_reason", "completion_tokens",
    "batch_size"})` or `("error", {"message"})`."""

    id: str
    conversation: list[dict]
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Decoding state, touched by the engine thread only.
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    text: str = ""
    sent: str = ""

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch."""
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", self.id)  # alone: its seed then fixes its answer
        return ("sample", self.temperature, self.top_p)

    def emit(self, kind: str, **data: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the request's event loop is closed: nobody is waiting any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stops this request's row at the next decoding step (or drops it before its batch starts)."""
        self.cancelled.set()


class _BatchRows(StoppingCriteria):
    """Per-row bookkeeping of one batch: new tokens -> text deltas, and which rows are finished (`[batch]` bool)."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos_ids: set[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.done = [False] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """input_ids `[batch, prompt + steps]` -> `[batch]` bool: rows that must stop now."""
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[row]:
                self._step(row, token)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: int, token: int) -> None:
        job = self.jobs[row]
        if job.cancelled.is_set():
            self.finish(row, "cancelled")
            return
        job.generated += 1
        if token in self.eos_ids:
            self.finish(row, "stop")
            return
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((index for index in (text.find(stop) for stop in job.stop) if index >= 0), default=None)
        job.text = text if cut is None else text[:cut]
        if cut is not None:
            self.finish(row, "stop")
        elif job.generated >= job.max_tokens:
            self.finish(row, "length")
        else:
            self._send(job, _settled(job.text.lstrip(), job.stop))

    def _send(self, job: Job, visible: str) -> None:
        if visible.startswith(job.sent) and len(visible) > len(job.sent):
            job.emit("delta", text=visible[len(job.sent):])
            job.sent = visible

    def finish(self, row: int, reason: str) -> None:
        self.done[row] = True
        job = self.jobs[row]
        if reason == "cancelled":
            logger.debug("%s: the client went away; its row stopped after %d tokens", job.id, job.generated)
            return
        final = job.text.strip()
        self._send(job, final)
        job.emit("done", text=final, finish_reason=reason, completion_tokens=job.generated,
                 batch_size=len(self.jobs))


def _settled(text: str, stops: list[str]) -> str:
    """The part of a row's text that later tokens cannot change: without trailing whitespace (the final answer is
    stripped), an unfinished multi-byte character (U+FFFD), or an ending that may be the start of a stop string."""
    text = text.rstrip().rstrip("\ufffd").rstrip()
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[:len(text) - held]


class BatchingEngine:
    """Owns the model in one thread and decodes queued `Job`s in batches (see the module docstring).

    Args:
        max_batch_size: rows per batch (1: requests are answered one after another).
        batch_window: seconds to wait for more requests once one arrived.
        max_queue: waiting requests (not yet decoding) before `submit` refuses with 429; None: unlimited.
    """

    def __init__(self, model: torch.nn.Module, processor: MMLlamaProcessor, embedder: MediaEmbedder,
                 max_batch_size: int = 8, batch_window: float = 0.01, max_queue: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be >= 1, got {max_batch_size}.")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"--max_queue must be >= 1, got {max_queue}.")
        self.model, self.processor, self.embedder = model, processor, embedder
        self.max_batch_size, self.batch_window, self.max_queue = max_batch_size, batch_window, max_queue
        eos = processor.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran (for logs and tests)
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mm-llama-batching", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the batches already queued, then ends the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues a job; ApiError 429 when `max_queue` requests already wait, 503 while shutting down."""
        with self._condition:
            if self._stopping:
                raise ApiError(503, "The server is shutting down; retry on another replica or later.",
                               code="shutting_down", type="server_error")
            if self.max_queue is not None and len(self._pending) >= self.max_queue:
                raise ApiError(429, f"The server is busy: {len(self._pending)} requests are waiting (--max_queue "
                                    f"{self.max_queue}). Retry in a moment.", code="queue_full",
                               type="rate_limit_error")
            self._pending.append(job)
            self._condition.notify_all()

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            if batch:
                self._decode(batch)

    def _take_batch(self) -> list[Job] | None:
        """The next batch (possibly empty when all waiting jobs were cancelled), or None once stopped and drained."""
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.batch_window
            while len(self._pending) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            live = [job for job in self._pending if not job.cancelled.is_set()]
            key = live[0].batch_key() if live else None
            batch = [job for job in live if job.batch_key() == key][:self.max_batch_size]
            taken = set(map(id, batch))
            self._pending = deque(job for job in live if id(job) not in taken)
            return batch

    def _decode(self, batch: list[Job]) -> None:
        rows = _BatchRows(batch, self.processor.tokenizer, self.eos_ids)
        first = batch[0]
        settings = GenerationSettings(max(job.max_tokens for job in batch), first.temperature, first.top_p)
        self.batch_sizes[len(batch)] += 1
        try:
            inputs = build_generation_inputs(self.processor, [job.conversation for job in batch], self.embedder)
            if first.seed is not None and first.temperature > 0:
                torch.manual_seed(first.seed)
            generate(self.model, self.processor, inputs, settings, stopping_criteria=[rows])
        except Exception as error:
            logger.exception("decoding a batch of %d failed", len(batch))
            for row, job in enumerate(batch):
                if not rows.done[row]:
                    rows.done[row] = True
                    job.emit("error", message=f"Generation failed ({type(error).__name__}: {error}).")
            return
        for row in range(len(batch)):
            if not rows.done[row]:  # generate ended for a reason of its own (e.g. the model's length limit)
                rows.finish(row, "length")


__all__ = ["BatchingEngine", "Job"]
