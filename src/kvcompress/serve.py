"""``kvcompress serve``: an OpenAI-compatible HTTP server that compresses each context once and reuses it.

One model and one method, chosen at start. How a request splits into the compressed context and the
uncompressed question (the rule is the library's, :func:`~kvcompress.generation.split_prompt` and
:func:`~kvcompress.generation.split_chat`, so a greedy answer equals :func:`kvcompress.generate` with the
same context, question, method and ``max_new_tokens``):

- ``/v1/completions``: ``prompt`` is the context. An optional ``question`` field (``extra_body`` in the
  ``openai`` client) is asked after it; without one the model answers the prompt itself.
- ``/v1/chat/completions``: messages of roles ``system``, ``user`` and ``assistant``, written by the
  model's chat template. The last message is the user's question; the conversation before it is the
  context. Consecutive user messages share one turn, joined by blank lines (so with user messages only,
  all but the last are the context). One user message alone is the context, with no question.

A compressed context is kept under a hash of the model, the method and the context's token ids, so
the same document (or conversation before its last user message) sent again is not prefilled again.
Kept contexts are held in memory up to a budget of bytes (:attr:`CompressedCache.nbytes`); the least
recently used go to disk in the saved format (:meth:`CompressedCache.save`) and come back on their next
use. The model runs on one worker thread: requests queue, and those waiting for the same context are
answered as one batch (each answer a row on its own fork of the context, so no request sees another's
tokens; a request's ``n`` answers are ``n`` rows). Decoding is greedy unless a request sets a
``temperature``; then tokens are drawn by :class:`~kvcompress.sampling.Sampler` (``top_p``, ``top_k``,
``seed``). ``stop`` texts end an answer before them.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import queue
import re
import signal
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from kvcompress.cache import CompressedCache, load_cache
from kvcompress.generation import ContextTooLongError, ask, asked_part, check_room, compress, split_chat, split_prompt
from kvcompress.models import model_identity, model_name
from kvcompress.persist import CacheFileError
from kvcompress.sampling import MAX_TOP_LOGPROBS, Choice, Sampler, Sampling

log = logging.getLogger("kvcompress.serve")

DEFAULT_BUDGET = 1 << 30
DEFAULT_MAX_BODY = 4 << 20


def parse_size(text: str) -> int:
    """Bytes in ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"100000"``; ValueError naming the accepted forms."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in units:
        raise ValueError(f"{text!r} is not a size; write bytes, or a number with KiB, MiB, GiB (or kB, MB, GB), e.g. 512MiB")
    return int(float(match[1]) * units[match[2].lower()])


# --------------------------------------------------------------------------------------- kept contexts


class ContextStore:
    """Compressed contexts by key: the most recently used in memory up to ``budget`` bytes, the rest on disk,
    whose files are deleted, least recently used first, while they take more than ``disk_budget`` bytes
    (None: no limit); a deleted context is compressed again when next asked for.

    Pure bookkeeping: ``save(cache, path)`` and ``load(path)`` do the file work, ``size(cache)`` gives
    a context's bytes. Used by one thread (the server's worker).
    """

    def __init__(
        self, folder: Path, budget: int, save: Callable, load: Callable, size: Callable = lambda c: c.nbytes,
        disk_budget: int | None = None,
    ):
        self.folder, self.budget, self.disk_budget = Path(folder), budget, disk_budget
        self._save, self._load, self._size = save, load, size
        self.memory: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (cache, bytes), oldest first
        self.folder.mkdir(parents=True, exist_ok=True)
        found = sorted(self.folder.glob("*.kvc"), key=lambda p: p.stat().st_mtime)  # saved by an earlier run
        self.disk: OrderedDict[str, int] = OrderedDict((p.stem, p.stat().st_size) for p in found)  # key -> file bytes, oldest first
        self.evictions = self.deleted = 0
        self._trim_disk()

    @property
    def kept_bytes(self) -> int:
        return sum(size for _, size in self.memory.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.kvc"

    def get(self, key: str) -> tuple[object | None, str | None]:
        """``(cache, "memory" | "disk")`` for a kept context (now the most recently used), else ``(None, None)``."""
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key][0], "memory"
        if key in self.disk:
            try:
                cache = self._load(self.path(key))
            except CacheFileError as err:  # damaged, or saved for another model: compress again
                log.warning("dropping kept context %s: %s", key, err)
                del self.disk[key]
                self.path(key).unlink(missing_ok=True)
                return None, None
            self.disk.move_to_end(key)
            self.path(key).touch()  # the order of use survives a restart
            return cache, "disk"
        return None, None

    def put(self, key: str, cache) -> None:
        """Keep ``cache`` as the most recently used; move the least recently used to disk while over budget
        (a context larger than the whole budget goes straight to disk)."""
        self.memory[key] = (cache, self._size(cache))
        self.memory.move_to_end(key)
        while self.memory and self.kept_bytes > self.budget:
            old, (old_cache, _) = self.memory.popitem(last=False)
            self._spill(old, old_cache)
            self.evictions += 1

    def _spill(self, key: str, cache) -> None:
        if key not in self.disk:  # a context reloaded from disk is still there, unchanged
            self._save(cache, self.path(key))
            self.disk[key] = self.path(key).stat().st_size
            self._trim_disk()

    def _trim_disk(self) -> None:
        while self.disk_budget is not None and self.disk and self.disk_bytes > self.disk_budget:
            old, _ = self.disk.popitem(last=False)
            self.path(old).unlink(missing_ok=True)
            self.deleted += 1

    def save_all(self) -> int:
        """Write every context held in memory to disk (at shutdown); returns how many were written."""
        written = [key for key in self.memory if key not in self.disk]
        for key, (cache, _) in self.memory.items():
            self._spill(key, cache)
        return len(written)


# ----------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind: str = "invalid_request_error"):
        message = _printable(message)  # a lone surrogate echoed back is written as its escape
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


# ------------------------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    """Fields are taken as sent: no unknown field, and no coercion (``true`` is not the integer 1, nor ``1`` a bool)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in a parsed JSON ``value`` a string or key holds a lone UTF-16 surrogate (JSON ``"\\ud800"``,
    which no UTF-8 text holds), e.g. ``"messages.0.content"``; None if nowhere."""
    if isinstance(value, str):
        return (where or "body") if _SURROGATE.search(value) else None
    pairs = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in pairs:
        place = f"{where}.{key}" if where else str(key)
        found = _lone_surrogate(str(key), place) or _lone_surrogate(item, place)
        if found:
            return found
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(text: str) -> str:
    """``text`` with each lone surrogate written as its ``\\udxxx`` escape, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode()


class _Sampling(_Strict):
    """Fields shared by both endpoints: how tokens are chosen. A field this server cannot honour gets a
    400 naming it; none is silently ignored."""

    model: str
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; as vLLM's (0 or -1: no limit)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    seed: int | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        where = _lone_surrogate(data)
        if where:
            message = "{where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text; send UTF-8 text"
            raise PydanticCustomError("invalid_text", message, {"where": _printable(where)})
        return data

    def check(self, max_n: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ApiError(
                    400, f"{name}={getattr(self, name)!r} is not supported; omit {name} or set it to 0", "unsupported_parameter", name
                )
        if self.n is not None and self.n > max_n:
            raise ApiError(400, f"n={self.n} is more choices than this server answers at once ({max_n}, --max-batch)", "invalid_value", "n")
        if self.stream_options and set(self.stream_options) - {"include_usage"}:
            raise ApiError(400, "stream_options supports only include_usage", "unsupported_parameter", "stream_options")
        stops = self.stops()
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "invalid_value", "stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, logprobs: int | None = None) -> Sampling:
        """The request's :class:`Sampling` (greedy when temperature is absent or 0)."""
        top_k = self.top_k if self.top_k not in (None, -1) else 0
        fields = {"temperature": self.temperature or 0.0, "top_p": 1.0 if self.top_p is None else self.top_p, "top_k": top_k}
        try:
            return Sampling(**fields, seed=self.seed, logprobs=logprobs)
        except ValueError as err:  # its message starts with the field's name
            raise ApiError(400, str(err), "invalid_value", str(err).split()[0]) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    question: str | None = None  # asked after the compressed prompt; `extra_body={"question": ...}` in openai
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = None

    def parts(self, tokenizer) -> tuple[str, str]:
        """The prompt's text up to the cut (compressed) and after it (asked), as the chat template writes them."""
        if self.echo:
            raise ApiError(400, "echo is not supported; omit it", "unsupported_parameter", "echo")
        if self.logprobs not in (None, False, 0):
            raise ApiError(
                400, "logprobs is served on /v1/chat/completions only (logprobs: true, top_logprobs); omit it here",
                "unsupported_parameter", "logprobs",
            )  # fmt: skip
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} texts; send one prompt per request", "invalid_prompt", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the context is empty; send some text", "invalid_prompt", "prompt")
        return split_prompt(tokenizer, prompt, None)[0], asked_part(tokenizer, self.question)


class _Text(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[_Text]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top(self) -> int | None:
        """How many alternatives each token's logprobs lists (None: no logprobs)."""
        if self.logprobs not in (None, False, True):
            raise ApiError(400, "logprobs is true or false here; the number of alternatives is top_logprobs", "invalid_value", "logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def parts(self, tokenizer) -> tuple[str, str]:
        """The conversation before the last user message (compressed) and that message (asked): see :func:`split_chat`."""
        roles = sorted({m.role for m in self.messages} - {"system", "user", "assistant"})
        if roles:
            raise ApiError(
                400, f"messages may have roles system, user and assistant (got {', '.join(roles)})", "unsupported_role", "messages"
            )
        if self.messages[-1].role != "user":
            raise ApiError(
                400,
                f"the last message is the {self.messages[-1].role}'s; end with the user's question (the conversation "
                "before it is the compressed context)",
                "invalid_messages",
                "messages",
            )
        if len(self.messages) == 1 and not self.messages[0].text():
            raise ApiError(400, "the context is empty; send some text", "invalid_prompt", "messages")
        try:
            return split_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in self.messages])
        except ValueError as err:
            raise ApiError(400, str(err), "invalid_messages", "messages") from None


# ------------------------------------------------------------------------------------------- the worker


@dataclass
class Job:
    """One request waiting for the model: its prompt cut in two (``context``, compressed, and ``asked``,
    both as the chat template writes them), how to choose its ``n`` answers' tokens, and where its
    events go (an asyncio queue): ``("token", choice, token_id, Choice | None)`` for each token of each
    answer, then ``("done", [finish_reason per answer], [tokens per answer])``, or ``("error", exception)``.

    ``cancelled`` is set by the handler when its client is gone (:class:`_JobStream`,
    :func:`_cancel_when_gone`); the worker then stops decoding it at its next step, or never starts.
    """

    key: str
    context: str
    asked: str
    max_tokens: int
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (the earliest), or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def _starting_stop(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` may be the start of a stop text (held back while streaming)."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def _final(decode: Callable[[list[int]], str], ids: list[int], stops: list[str]) -> tuple[str, int]:
    """An answer's text (cut before its first stop text, stripped) and how many of its tokens begin before the cut."""
    text = decode(ids)
    cut = _stop_at(text, stops)
    if cut is None:
        return text.strip(), len(ids)
    return text[:cut].strip(), sum(len(decode(ids[:k])) < cut for k in range(len(ids)))


class _RowStreamer(BaseStreamer, StoppingCriteria):
    """Hands each row's new tokens to its job as they come (a job's ``n`` answers are ``n`` rows), and ends
    a row at EOS, at a stop text, at its job's ``max_tokens``, or when its job is cancelled. As a stopping
    criterion it tells ``generate`` which rows are done (``(B,)`` bools), so a batch stops once every row
    is, not at the largest ``max_tokens``. ``sampler``, when the batch has one, gives each token's logprobs."""

    def __init__(self, jobs: list[Job], eos: set[int], decode: Callable[[list[int]], str], sampler: Sampler | None = None):
        self.rows = [(job, choice) for job in jobs for choice in range(job.n)]
        self.eos, self.decode, self.sampler = eos, decode, sampler
        self.prompt_seen = False
        self.ids: list[list[int]] = [[] for _ in self.rows]
        self.finish: list[str | None] = [None] * len(self.rows)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call gets the prompt's ids
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            job, choice = self.rows[i]
            if self.finish[i] is not None:
                continue
            if job.cancelled:
                self.finish[i] = "cancelled"
                continue
            if token in self.eos:
                self.finish[i] = "stop"
                continue
            self.ids[i].append(token)
            job.emit(("token", choice, token, self.sampler.chosen[i] if self.sampler else None))
            if job.stop and _stop_at(self.decode(self.ids[i]), job.stop) is not None:
                self.finish[i] = "stop"
            elif len(self.ids[i]) >= job.max_tokens:
                self.finish[i] = "length"

    def end(self) -> None:
        self.finish = [f or "length" for f in self.finish]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def results(self, job: Job) -> tuple[list[str], list[int]]:
        """``job``'s finish reason and token count, per answer."""
        rows = [i for i, (j, _) in enumerate(self.rows) if j is job]
        return [self.finish[i] or "length" for i in rows], [len(self.ids[i]) for i in rows]


class Metrics:
    """Counters the worker and the handlers update, read by ``/metrics``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, float] = dict.fromkeys(
            [
                "requests",
                "completions",
                "chat_completions",
                "streamed",
                "prefills",
                "memory_hits",
                "disk_hits",
                "prompt_tokens",
                "completion_tokens",
                "batches",
                "largest_batch",
                "prefill_seconds",
                "decode_seconds",
                "queue_seconds",
                "cancelled",
            ],
            0,
        )
        self.errors: dict[str, int] = {}

    def add(self, **values: float) -> None:
        with self.lock:
            for name, value in values.items():
                self.counts[name] += value

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1


class _Exporter:
    """A ``prometheus_client`` collector of the server's figures, read from ``snapshot()`` (``/metrics``'
    JSON form) at each scrape: counts as counters (``kvcompress_<name>_total``, errors by HTTP status),
    the rest as gauges."""

    COUNTERS = {
        "requests": "requests accepted",
        "completions": "/v1/completions requests",
        "chat_completions": "/v1/chat/completions requests",
        "streamed": "requests answered as server-sent events",
        "prefills": "contexts compressed",
        "memory_hits": "contexts found in memory",
        "disk_hits": "contexts reloaded from the store's folder",
        "prompt_tokens": "prompt tokens of answered requests",
        "completion_tokens": "tokens decoded",
        "batches": "batches run by the model",
        "prefill_seconds": "seconds spent compressing contexts",
        "decode_seconds": "seconds spent decoding answers",
        "queue_seconds": "seconds requests waited for the model",
        "cancelled": "requests whose client left before the answer ended",
        "evictions": "contexts moved from memory to disk",
        "deleted_from_disk": "context files deleted beyond --store-budget",
    }
    GAUGES = {
        "largest_batch": "the most requests answered in one batch",
        "kept_bytes": "bytes of compressed contexts held in memory",
        "memory_budget": "bytes of compressed contexts the memory may hold (--memory-budget)",
        "kept_in_memory": "compressed contexts held in memory",
        "kept_on_disk": "compressed contexts in the store's folder",
        "disk_bytes": "bytes of the store's files",
        "store_budget": "bytes the store's files may take (--store-budget; absent: no limit)",
        "queued": "requests waiting for the model",
    }

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        values = self.snapshot()
        for key, text in self.COUNTERS.items():
            yield CounterMetricFamily(f"kvcompress_{key}", text, value=values[key])
        for key, text in self.GAUGES.items():
            if values[key] is not None:
                yield GaugeMetricFamily(f"kvcompress_{key}", text, value=values[key])
        errors = CounterMetricFamily("kvcompress_errors", "requests refused or failed, by HTTP status", labels=["status"])
        for status, count in sorted(values["errors"].items()):
            errors.add_metric([status], count)
        yield errors


class Engine:
    """The model's one worker thread: takes queued jobs, batches those of one context, answers them."""

    def __init__(self, model, tokenizer, method: str, store: ContextStore, metrics: Metrics, max_batch: int, max_queue: int):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.store, self.metrics, self.max_batch = store, metrics, max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.thread = threading.Thread(target=self._run, name="kvcompress-model", daemon=True)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429, f"{self.jobs.maxsize} requests are already waiting; retry later", "server_busy", kind="server_error"
            ) from None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the jobs already queued, then end the worker."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self.jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            groups: dict[str, list[Job]] = {}
            for job in batch:
                if job.cancelled:  # its client left while it waited; its handler ends on "done"
                    self.metrics.add(cancelled=1)
                    job.emit(("done", ["cancelled"] * job.n, [0] * job.n))
                    continue
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._answer(jobs)

    def _context(self, job: Job) -> tuple[CompressedCache, str]:
        cache, where = self.store.get(job.key)
        if cache is not None:
            self.metrics.add(**{f"{where}_hits": 1})
            return cache, where
        start = time.perf_counter()
        cache = compress(self.model, self.tokenizer, job.context, self.method, templated=True)
        self.metrics.add(prefills=1, prefill_seconds=time.perf_counter() - start)
        return cache, "prefilled"

    def _answer(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        self.metrics.add(batches=1, queue_seconds=sum(start - j.queued for j in jobs))
        with self.metrics.lock:
            self.metrics.counts["largest_batch"] = max(self.metrics.counts["largest_batch"], len(jobs))
        try:
            cache, where = self._context(jobs[0])
            # A batch all greedy without logprobs is decoded as the library does (no sampler).
            plain = all(j.sampling.greedy and j.sampling.logprobs is None for j in jobs)
            sampler = None if plain else Sampler([(j.sampling, j.n) for j in jobs])
            decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            streamer = _RowStreamer(jobs, self.eos, decode, sampler)
            asked = time.perf_counter()
            questions, longest = [j.asked for j in jobs for _ in range(j.n)], max(j.max_tokens for j in jobs)
            with torch.inference_mode():
                ask(
                    self.model, self.tokenizer, cache, questions, longest, streamer=streamer, stopping_criteria=[streamer],
                    sampler=sampler, templated=True,
                )  # fmt: skip
            self.metrics.add(decode_seconds=time.perf_counter() - asked)
            self.store.put(jobs[0].key, cache)
            log.info(
                "answered %d request(s) of context %s (%s; %d tokens, %s bytes): %.2f s context, %.2f s decode",
                len(jobs), jobs[0].key[:12], where, cache.get_seq_length(), f"{cache.nbytes:,}", asked - start,
                time.perf_counter() - asked,
            )  # fmt: skip
        except Exception as err:  # the jobs fail; the worker and the server go on
            log.exception("answering %d request(s) failed", len(jobs))
            for job in jobs:
                job.emit(("error", err))
            return
        for job in jobs:
            finishes, counts = streamer.results(job)
            cancelled = int(all(f == "cancelled" for f in finishes))
            self.metrics.add(prompt_tokens=job.prompt_tokens, completion_tokens=sum(counts), cancelled=cancelled)
            job.emit(("done", finishes, counts))


# ---------------------------------------------------------------------------------------------- the app


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before the app reads it
    (counted by ``refused(413)``, as the app's own errors are)."""

    def __init__(self, app, limit: int, refused: Callable[[int], None]):
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        chunks, size, more = [], 0, True
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            size = int(declared)
        else:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False) and size <= self.limit
        if size > self.limit:
            err = ApiError(413, f"the request body is over {self.limit:,} bytes; send a shorter prompt", "request_too_large")
            self.refused(err.status)
            return await _error_response(err)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():  # the body read above, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _validation_message(err: RequestValidationError) -> tuple[str, str, str | None]:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", "invalid_json", None
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    if first.get("type") == "invalid_text":
        return first["msg"], "invalid_text", first["ctx"]["where"]
    if first.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}; see /docs for the fields this server takes", "unknown_parameter", loc
    return f"{loc or 'body'}: {first.get('msg')}", "invalid_value", loc


def create_app(
    model,
    tokenizer,
    method: str = "none",
    *,
    name: str | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    store: str | Path | None = None,
    max_batch: int = 8,
    max_queue: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    store_budget: int | None = None,
) -> FastAPI:
    """The ASGI app serving ``model`` with compression ``method`` (a spec, checked here).

    Args:
        name: the model's name in the API (default: the name it was loaded under).
        memory_budget: bytes of compressed contexts kept in memory; the least recently used beyond go to disk.
        store: folder for contexts moved to disk. Given, it persists: contexts found there are reused and
            those in memory are saved there at shutdown. None: a temporary folder, removed at shutdown.
        max_batch: the most queued requests answered in one batch (those of one context are batched).
        max_queue: requests waiting beyond this get a 429.
        max_body_bytes: larger request bodies get a 413.
        store_budget: bytes of files kept in the store; the least recently used beyond are deleted (None: no limit).
    """
    from kvcompress.cache import make_cache

    make_cache(method, model)  # a bad spec fails here, not at the first request
    name = name or model_name(model)
    temporary = tempfile.TemporaryDirectory(prefix="kvcompress-serve-") if store is None else None
    folder = Path(temporary.name if temporary else store)
    digest = hashlib.sha256(json.dumps([model_identity(model), method]).encode()).hexdigest()
    kept = ContextStore(
        folder,
        memory_budget,
        save=lambda cache, path: cache.save(path, tokenizer),
        load=lambda path: load_cache(path, model, tokenizer),
        disk_budget=store_budget,
    )
    metrics = Metrics()
    engine = Engine(model, tokenizer, method, kept, metrics, max_batch, max_queue)
    # The worker's tokenizer pads (which changes its Rust state); requests are tokenized with a copy.
    request_tokenizer = copy.deepcopy(tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        log.info(
            "serving %s with %s on one worker; kept contexts in %s (budget %s bytes)", name, method, folder, f"{memory_budget:,}"
        )
        yield
        await asyncio.to_thread(engine.stop)
        if temporary is None:
            written = kept.save_all()
            log.info("saved %d kept context(s) to %s", written, folder)
        else:
            temporary.cleanup()

    app = FastAPI(title="kvcompress serve", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_body_bytes, refused=metrics.error)
    app.state.engine, app.state.store, app.state.metrics = engine, kept, metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        metrics.error(err.status)
        log.info("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, code, param = _validation_message(err)
        return await api_error(request, ApiError(400, message, code, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return await api_error(request, ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {err}", "internal_error", kind="server_error"))

    def submit(req: CompletionRequest | ChatRequest, max_tokens: int, logprobs: int | None = None) -> Job:
        if req.model != name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves {name!r} (see /v1/models)",
                "model_not_found",
                "model",
            )
        req.check(max_batch)
        sampling = req.sampling(logprobs)
        context, asked = req.parts(request_tokenizer)
        context_ids = request_tokenizer(context)["input_ids"]
        asked_ids = request_tokenizer(asked, add_special_tokens=False)["input_ids"]
        try:
            check_room(model, len(context_ids) + len(asked_ids), max_tokens)
        except ContextTooLongError as err:
            raise ApiError(400, str(err), "context_length_exceeded", "max_tokens") from None
        key = hashlib.sha256(digest.encode() + json.dumps(context_ids).encode()).hexdigest()[:32]
        loop = asyncio.get_running_loop()
        job = Job(key, context, asked, max_tokens, len(context_ids) + len(asked_ids), loop, sampling, req.n or 1, req.stops())
        engine.submit(job)
        metrics.add(requests=1, streamed=int(req.stream))
        return job

    def decode(ids: list[int]) -> str:
        return request_tokenizer.decode(ids, skip_special_tokens=True)

    def logprobs(job: Job, picks: list[Choice]) -> dict | None:
        """OpenAI's chat ``logprobs`` of the chosen tokens ``picks`` (None when ``job`` did not ask for them)."""
        if job.sampling.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text = decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(*t) for t in p.top]} for p in picks]}

    async def tokens(job: Job):
        """``job``'s events (see :class:`Job`), ending with its ``done``; ApiError/500 on failure."""
        while True:
            event = await job.events.get()
            if event[0] == "error":
                err = event[1]
                if isinstance(err, ContextTooLongError):
                    raise ApiError(400, str(err), "context_length_exceeded")
                if isinstance(err, ValueError):
                    raise ApiError(400, str(err), "invalid_request")
                raise ApiError(500, f"internal error: {err}", "internal_error", kind="server_error")
            yield event
            if event[0] == "done":
                return

    async def answer(job: Job, request: Request) -> tuple[list[tuple[str, str, dict | None]], int]:
        """Each answer's ``(text, finish_reason, logprobs)``, and the tokens decoded in all."""
        ids, picks = [[] for _ in range(job.n)], [[] for _ in range(job.n)]
        finishes, counts = ["length"] * job.n, [0] * job.n
        watch = asyncio.create_task(_cancel_when_gone(job, request))
        try:
            async for event in tokens(job):
                if event[0] == "token":
                    _, choice, token, pick = event
                    ids[choice].append(token)
                    picks[choice].append(pick)
                else:
                    _, finishes, counts = event
        finally:
            watch.cancel()
        answers = []
        for choice in range(job.n):
            text, kept = _final(decode, ids[choice], job.stop)
            answers.append((text, finishes[choice], logprobs(job, picks[choice][:kept])))
        return answers, sum(counts)

    def usage(job: Job, count: int) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": count, "total_tokens": job.prompt_tokens + count}

    def stream(job: Job, chunk: Callable[..., dict], include_usage: bool, first: list[dict] | None = None):
        """Server-sent events of ``job``'s answers: ``chunk(choice, text, finish, logprobs)`` for each piece.
        A piece holds back a partial character, trailing spaces and what may be the start of a stop text,
        so the pieces of an answer add up to its whole (stripped, cut before its stop text)."""

        async def events():
            ids, picks = [[] for _ in range(job.n)], [[] for _ in range(job.n)]
            sent, released, count = [""] * job.n, [0] * job.n, 0
            for event in first or []:
                yield _sse(event)

            def piece(choice: int, text: str, kept: int, finish: str | None = None) -> str | None:
                """The event adding what ``text`` has past what was sent, with the logprobs of tokens up to ``kept``."""
                more = text[len(sent[choice]) :] if text.startswith(sent[choice]) and len(text) > len(sent[choice]) else ""
                if not more and finish is None:
                    return None
                sent[choice] += more
                pending, released[choice] = picks[choice][released[choice] : kept], max(released[choice], kept)
                return _sse(chunk(choice, more or None, finish, logprobs(job, pending) if pending else None))

            try:
                async for event in tokens(job):
                    if event[0] == "token":
                        _, choice, token, pick = event
                        ids[choice].append(token)
                        picks[choice].append(pick)
                        text = decode(ids[choice])
                        if text.endswith("\ufffd"):  # a partial character: wait for the rest
                            continue
                        cut = _stop_at(text, job.stop)
                        text = text[:cut] if cut is not None else text[: len(text) - _starting_stop(text, job.stop)]
                        if (out := piece(choice, text.strip(), len(ids[choice]) - (cut is not None))) is not None:
                            yield out
                    else:
                        _, finishes, counts = event
                        count = sum(counts)
                        for choice in range(job.n):
                            text, kept = _final(decode, ids[choice], job.stop)
                            if (out := piece(choice, text, kept)) is not None:
                                yield out
                            yield piece(choice, sent[choice], kept, finishes[choice])
            except ApiError as err:
                metrics.error(err.status)
                yield _sse(err.body())
            if include_usage:
                yield _sse({**chunk(0, None, None, None), "choices": [], "usage": usage(job, count)})
            yield "data: [DONE]\n\n"

        return _JobStream(job, events())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "method": method, "queued": engine.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "kvcompress", "method": method}],
        }

    def snapshot() -> dict:
        with metrics.lock:
            counts, errors = dict(metrics.counts), dict(metrics.errors)
        return {
            **counts,
            "errors": errors,
            "kept_bytes": kept.kept_bytes,
            "memory_budget": kept.budget,
            "kept_in_memory": len(kept.memory),
            "kept_on_disk": len(kept.disk),
            "disk_bytes": kept.disk_bytes,
            "store_budget": kept.disk_budget,
            "deleted_from_disk": kept.deleted,
            "evictions": kept.evictions,
            "queued": engine.jobs.qsize(),
        }

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Exporter(snapshot))

    @app.get("/metrics")
    async def show_metrics(request: Request, format: Literal["prometheus", "json"] | None = None):
        """Prometheus' text format; JSON with ``?format=json`` or ``Accept: application/json``."""
        if format == "json" or (format is None and "application/json" in request.headers.get("accept", "")):
            return snapshot()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = submit(req, req.max_tokens or 16)
        metrics.add(completions=1)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: int, text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
            piece = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": [piece]}

        if req.stream:
            return stream(job, chunk, bool((req.stream_options or {}).get("include_usage")))
        answers, count = await answer(job, request)
        choices = [chunk(i, text, finish)["choices"][0] for i, (text, finish, _) in enumerate(answers)]
        return {**chunk(0, None, None), "choices": choices, "usage": usage(job, count)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        job = submit(req, req.max_completion_tokens or req.max_tokens or 128, req.top())
        metrics.add(chat_completions=1)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: int, text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
            delta = {} if text is None else {"content": text}
            piece = {"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name, "choices": [piece]}

        if req.stream:
            first = [chunk(i, "", None) for i in range(job.n)]
            for event in first:
                event["choices"][0]["delta"]["role"] = "assistant"
            return stream(job, chunk, bool((req.stream_options or {}).get("include_usage")), first)
        answers, count = await answer(job, request)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}
            for i, (text, finish, logprobs) in enumerate(answers)
        ]
        return {"id": rid, "object": "chat.completion", "created": now, "model": name, "choices": choices, "usage": usage(job, count)}

    return app


async def _cancel_when_gone(job: Job, request: Request, every: float = 0.5) -> None:
    """Cancel ``job`` once the client of its (not streamed) ``request`` has disconnected; checks ``every`` seconds."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.cancelled = True


class _JobStream(StreamingResponse):
    """Server-sent events of one job; the job is cancelled once the response ends, so a client that
    leaves early (Starlette then cancels the response) stops its decoding at the next step."""

    def __init__(self, job: Job, events):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # after the last event this changes nothing: the worker is done with the job
            self.job.cancelled = True


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def run(args) -> None:
    """``kvcompress serve``: load the model, then serve until SIGINT/SIGTERM (which saves kept contexts)."""
    import uvicorn

    from kvcompress.models import load_model

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_model(args.model)
    app = create_app(
        model,
        tokenizer,
        args.method,
        name=args.name,
        memory_budget=args.memory_budget,
        store=args.store,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        store_budget=args.store_budget,
    )
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (queued requests answered, kept contexts
    # saved by the lifespan), then raises the signal again for the handler it found: make that one a
    # no-op, so a clean shutdown exits with status 0.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    log.info("shut down")
