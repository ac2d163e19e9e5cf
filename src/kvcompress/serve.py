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
The keys are a hash chain over pages of token ids (:mod:`kvcompress.prefixes`): a context that starts with a
kept one, such as a conversation's next turn, continues a copy of the longest such context and prefills only
its new tokens, where the method does not evict (with eviction, what is kept depends on the whole context,
so contexts are shared whole). The copy costs the kept context's bytes again, not its prefill; each kept
context owns its memory, so it moves to disk and back alone.

The model runs on one worker thread that batches continuously (:class:`Engine`): every model step
decodes one token for every running request, whatever its context (:class:`~kvcompress.batching.CacheBatch`:
one forward, each request's own fork of its context attended per layer, so no request sees another's
tokens; a request's ``n`` answers are ``n`` rows); between steps, waiting requests start in order
while their bytes fit ``--memory-budget`` (:class:`~kvcompress.scheduler.Scheduler`), a new context
being compressed ``--prefill-chunk`` tokens per step; when the running requests' answers outgrow the
budget, the newest is preempted and later resumes by recomputing its own tokens. Idle kept contexts
take what the running ones leave of the budget; the least recently used go to disk in the saved format
(:meth:`CompressedCache.save`) and come back on their next use. Decoding is greedy unless a request sets
a ``temperature``; then tokens are drawn by :class:`~kvcompress.sampling.Sampler` (``top_p``, ``top_k``,
``seed``). ``stop`` texts end an answer before them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
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
from collections.abc import Callable, Iterator
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

from kvcompress.attach import attach
from kvcompress.batching import CacheBatch
from kvcompress.cache import CompressedCache, load_cache, make_cache
from kvcompress.generation import ContextTooLongError, asked_part, check_room, compressing, split_chat, split_prompt
from kvcompress.models import cache_kwarg, model_identity, model_name, model_summary
from kvcompress.persist import CacheFileError, context_tokens, read_header
from kvcompress.prefixes import PrefixKeys
from kvcompress.registry import parse_spec
from kvcompress.sampling import MAX_TOP_LOGPROBS, Choice, Sampler, Sampling
from kvcompress.scheduler import Scheduler, Sequence

log = logging.getLogger("kvcompress.serve")

DEFAULT_BUDGET = 1 << 30
DEFAULT_MAX_BODY = 4 << 20
DEFAULT_PREFILL_CHUNK = 512  # tokens of a new context compressed per model step, between the running answers' steps


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
    a context's bytes and ``pages(cache)`` the pages it holds (a file holds the same pages: its header says
    how many). Used by one thread (the server's worker).
    """

    def __init__(
        self, folder: Path, budget: int, save: Callable, load: Callable, size: Callable = lambda c: c.nbytes,
        disk_budget: int | None = None, pages: Callable = lambda c: getattr(c, "held_pages", 0),
    ):
        self.folder, self.budget, self.disk_budget = Path(folder), budget, disk_budget
        self._save, self._load, self._size, self._pages = save, load, size, pages
        self.memory: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (cache, bytes), oldest first
        self.folder.mkdir(parents=True, exist_ok=True)
        found = sorted(self.folder.glob("*.kvc"), key=lambda p: p.stat().st_mtime)  # saved by an earlier run
        self.disk: OrderedDict[str, int] = OrderedDict((p.stem, p.stat().st_size) for p in found)  # key -> file bytes, oldest first
        self.page_counts: dict[str, int] = {p.stem: _file_pages(p) for p in found}  # key -> pages, in memory or on disk
        self.evictions = self.deleted = 0
        self._trim_disk()

    @property
    def kept_bytes(self) -> int:
        return sum(size for _, size in self.memory.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    @property
    def kept_pages(self) -> int:
        """Pages of the contexts held in memory."""
        return sum(self.page_counts.get(key, 0) for key in list(self.memory))

    @property
    def disk_pages(self) -> int:
        """Pages the store's files hold (as their headers say; 0 for a file saved before headers said it)."""
        return sum(self.page_counts.get(key, 0) for key in list(self.disk))

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
                self.page_counts.pop(key, None)
                self.path(key).unlink(missing_ok=True)
                return None, None
            self.disk.move_to_end(key)
            self.path(key).touch()  # the order of use survives a restart
            return cache, "disk"
        return None, None

    def take(self, key: str) -> tuple[object | None, str | None]:
        """As :meth:`get`, but a context found in memory leaves it (it is in use: :meth:`put` it back after);
        one found on disk stays there too."""
        cache, where = self.get(key)
        if where == "memory":
            del self.memory[key]
        return cache, where

    def put(self, key: str, cache) -> None:
        """Keep ``cache`` as the most recently used; move the least recently used to disk while over budget
        (a context larger than the whole budget goes straight to disk)."""
        self.memory[key] = (cache, self._size(cache))
        self.page_counts[key] = self._pages(cache)
        self.memory.move_to_end(key)
        self.fit()

    def fit(self) -> None:
        """Move the least recently used contexts to disk while those in memory take more than the budget."""
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
            if old not in self.memory:
                self.page_counts.pop(old, None)
            self.path(old).unlink(missing_ok=True)
            self.deleted += 1

    def save_all(self) -> int:
        """Write every context held in memory to disk (at shutdown); returns how many were written."""
        written = [key for key in self.memory if key not in self.disk]
        for key, (cache, _) in self.memory.items():
            self._spill(key, cache)
        return len(written)


def _file_pages(path: Path) -> int:
    """The pages a saved context holds, from its header (0 where it does not say, or cannot be read)."""
    try:
        return int(read_header(path).get("pages", 0))
    except (CacheFileError, ValueError):
        return 0


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
    asked_tokens: int = 0  # tokens of ``asked``
    prefixes: PrefixKeys | None = None  # the keys of the context's prefixes (``key`` is the whole's)

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


class _Rows:
    """The answers of one job (its ``n`` rows), token by token: hands each new token to the job as it comes,
    and ends a row at EOS, at a stop text, at the job's ``max_tokens``, or when the job is cancelled."""

    def __init__(self, job: Job, eos: set[int], decode: Callable[[list[int]], str]):
        self.job, self.eos, self.decode = job, eos, decode
        self.ids: list[list[int]] = [[] for _ in range(job.n)]
        self.finish: list[str | None] = [None] * job.n

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def put(self, tokens: list[int], chosen: list[Choice | None]) -> None:
        """One step's token and its :class:`~kvcompress.sampling.Choice` (or None) for each row."""
        job = self.job
        for i, (token, choice) in enumerate(zip(tokens, chosen)):
            if self.finish[i] is not None:
                continue
            if job.cancelled:
                self.finish[i] = "cancelled"
                continue
            if token in self.eos:
                self.finish[i] = "stop"
                continue
            self.ids[i].append(token)
            job.emit(("token", i, token, choice))
            if job.stop and _stop_at(self.decode(self.ids[i]), job.stop) is not None:
                self.finish[i] = "stop"
            elif len(self.ids[i]) >= job.max_tokens:
                self.finish[i] = "length"

    def results(self) -> tuple[list[str], list[int]]:
        """Each answer's finish reason and token count."""
        return [f or "length" for f in self.finish], [len(ids) for ids in self.ids]


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
                "preemptions",
                "prefix_hits",
                "reused_tokens",
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
    the rest as gauges, pages by tier (``kvcompress_pages{tier="running" | "memory" | "disk"}``)."""

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
        "batches": "decode steps run by the model (a token for every running answer)",
        "prefill_seconds": "seconds spent compressing contexts",
        "decode_seconds": "seconds spent decoding answers",
        "queue_seconds": "seconds requests waited for the model",
        "cancelled": "requests whose client left before the answer ended",
        "preemptions": "running requests stopped to free memory (resumed later, their own tokens recomputed)",
        "prefix_hits": "contexts compressed by continuing a kept context that starts them (a conversation's earlier turns)",
        "reused_tokens": "context tokens not prefilled because a kept context that started their context held them",
        "evictions": "contexts moved from memory to disk",
        "deleted_from_disk": "context files deleted beyond --store-budget",
    }
    GAUGES = {
        "largest_batch": "the most answers (rows) decoded in one step",
        "running": "requests decoding",
        "waiting": "requests admitted to the worker, waiting for memory or for their context's prefill",
        "active_bytes": "bytes of the contexts running requests read and of their forks",
        "kept_bytes": "bytes of idle compressed contexts held in memory",
        "memory_budget": "bytes of KV memory running requests and idle kept contexts may hold (--memory-budget)",
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
        pages = GaugeMetricFamily(
            "kvcompress_pages", "pages of KV held, by tier: running (contexts running requests read and their forks' "
            "own pages), memory (idle contexts kept in memory), disk (the store's files)", labels=["tier"],
        )
        for tier, key in (("running", "active_pages"), ("memory", "kept_pages"), ("disk", "disk_pages")):
            pages.add_metric([tier], values[key])
        yield pages
        errors = CounterMetricFamily("kvcompress_errors", "requests refused or failed, by HTTP status", labels=["status"])
        for status, count in sorted(values["errors"].items()):
            errors.add_metric([status], count)
        yield errors


@dataclass(eq=False)
class _Answer:
    """A job in the worker: its place in the scheduler, its context (compressed chunk by chunk while
    ``prefill`` runs), its fork of the context (None while waiting or preempted), the tokens it has fed
    after its question (what a preempted answer recomputes) and the tokens its next step feeds."""

    job: Job
    seq: Sequence
    rows: _Rows
    sampler: Sampler | None
    context: CompressedCache | None = None
    prefill: Iterator | None = None
    fork: CompressedCache | None = None
    asked: torch.Tensor | None = None  # (n, q) the question's ids (and any of the context held back)
    fed: list[torch.Tensor] = field(default_factory=list)  # (n, 1) each step's tokens
    pending: torch.Tensor | None = None  # (n, 1)
    where: str = ""  # where its context was found: memory, disk, prefilled


class Engine:
    """The model's one worker thread, batching continuously: every model step decodes one token for each
    running answer, whatever its context; between steps, waiting requests are admitted (their context
    compressed ``prefill_chunk`` tokens per step, or found kept) while their bytes fit ``memory_budget``,
    and answers that outgrow it are preempted (:class:`~kvcompress.scheduler.Scheduler`). A finished or
    cancelled answer frees its pages at once.

    Memory is the KV bytes of the contexts that running answers read, plus their forks; idle kept
    contexts take what is left of the budget (the :class:`ContextStore` moves the rest to disk).
    """

    def __init__(
        self, model, tokenizer, method: str, store: ContextStore, metrics: Metrics, max_batch: int, max_queue: int,
        memory_budget: int | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.store, self.metrics, self.prefill_chunk = store, metrics, prefill_chunk
        self.budget = memory_budget if memory_budget is not None else (store.budget if store is not None else None)
        self.scheduler = Scheduler(self.budget, max_batch)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pinned: dict[str, list] = {}  # key -> [context, answers reading it, its bytes, its pages]: contexts in use
        self.context_token_bytes: int | None = None  # bytes per context token, learned from contexts compressed
        self.active = 0  # bytes of the pinned contexts, a context being compressed and the running forks (see _held)
        self.active_pages = 0  # pages they hold (see _held_pages)
        self.lengths: dict[str, int] = {}  # key -> tokens of each context kept or in use (the prefixes to look up)
        self.scanned = False  # the store's files found at start are in lengths
        self.continues = parse_spec(method).selection is None  # a kept context can be continued: the method does not evict
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

    # ---- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        with torch.inference_mode():
            while True:
                idle = not self.scheduler.running and not self.scheduler.waiting
                stopping = self._take(block=idle and not stopping) or stopping
                if stopping and not self.scheduler.running and not self.scheduler.waiting:
                    break
                self._drop_cancelled()
                self._admit()
                if self.scheduler.running:
                    self._step()

    def _take(self, block: bool) -> bool:
        """Queue the submitted jobs (waiting for one if ``block``); True if the stop sign came."""
        stop = False
        try:
            job = self.jobs.get() if block else self.jobs.get_nowait()
            while True:
                if job is None:
                    stop = True
                elif job.cancelled:  # its client left while it waited; its handler ends on "done"
                    self.metrics.add(cancelled=1)
                    job.emit(("done", ["cancelled"] * job.n, [0] * job.n))
                else:
                    plain = job.sampling.greedy and job.sampling.logprobs is None
                    rows = _Rows(job, self.eos, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
                    answer = _Answer(job, Sequence(None, rows=job.n), rows, None if plain else Sampler([(job.sampling, job.n)]))
                    answer.seq.request = answer
                    self.scheduler.add(answer.seq)
                job = self.jobs.get_nowait()
        except queue.Empty:
            pass
        return stop

    def _drop_cancelled(self) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.request.job.cancelled:
                self._end(seq.request)

    # ---- admission --------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting answers while they fit, in order; compress at most one chunk of a context."""
        while self.scheduler.waiting:
            answer = self.scheduler.waiting[0].request
            answer.seq.need = self._need(answer)
            if not self.scheduler.can_start(answer.seq, self.active):
                return
            try:
                if answer.context is None:
                    self._find_context(answer)
                if answer.prefill is not None:
                    if self._prefill_chunk(answer):
                        return  # a chunk per step: the running answers decode between chunks
                self._start(answer)
            except Exception as err:  # this answer fails; the others go on
                log.exception("starting a request failed")
                self._end(answer, err)

    @functools.cached_property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values at full precision, in every layer."""
        return model_summary(self.model)["kv_bytes_per_token"]

    def _need(self, answer: _Answer) -> int:
        """Bytes ``answer`` would add if it started now: its context's (unless running answers read it; until
        a context was compressed, at full precision) and its rows' question at full precision. Its answer's
        tokens are not reserved: as in vLLM, a step that outgrows the budget preempts (see :meth:`_account`)."""
        job = answer.job
        own = job.n * job.asked_tokens * self.token_bytes
        if job.key in self.pinned:  # running answers read its context
            return own
        if answer.context is not None and answer.prefill is None:
            return own + answer.context.nbytes
        cached = self.store.memory.get(job.key)
        context = cached[1] if cached else job.prompt_tokens * (self.context_token_bytes or self.token_bytes)
        if answer.prefill is not None:  # what it holds so far is counted as held (see _held)
            context = max(0, context - answer.context.nbytes)
        return own + context

    def _find_context(self, answer: _Answer) -> None:
        job = answer.job
        if job.key in self.pinned:
            answer.context, answer.where = self.pinned[job.key][0], "memory"
            self.metrics.add(memory_hits=1)
            return
        cache, where = self.store.take(job.key)
        if cache is not None:
            answer.context, answer.where = cache, where
            self.lengths[job.key] = cache.context[0].shape[1]
            self.metrics.add(**{f"{where}_hits": 1})
            return
        earlier = self._kept_prefix(job)
        if earlier is None:
            answer.context, answer.where = make_cache(self.method, self.model), "prefilled"
        else:
            answer.context, answer.where = earlier, "continued"
            self.metrics.add(prefix_hits=1, reused_tokens=earlier.get_seq_length())
        answer.prefill = compressing(self.model, self.tokenizer, job.context, answer.context, self.prefill_chunk, templated=True)

    def _kept_prefix(self, job: Job) -> CompressedCache | None:
        """A cache to continue into ``job``'s context: a copy of the longest kept context that starts it (in
        memory or in use; one reloaded from disk is its own copy), or None. Only where the method does not
        evict: an evicting method's compressed context depends on all of it (then contexts are shared whole)."""
        if not self.continues or job.prefixes is None:
            return None
        if not self.scanned:  # contexts an earlier run saved: their lengths, from their files' indexes
            self.scanned = True
            for key in list(self.store.disk):
                self.lengths.setdefault(key, context_tokens(self.store.path(key)) or 0)
        if len(self.lengths) > 64 + 2 * (len(self.store.memory) + len(self.store.disk) + len(self.pinned)):
            held = self.store.memory.keys() | self.store.disk.keys() | self.pinned.keys()
            self.lengths = {key: n for key, n in self.lengths.items() if key in held}  # forget deleted contexts
        for length in sorted({n for n in self.lengths.values() if 0 < n < len(job.prefixes)}, reverse=True):
            key = job.prefixes(length)
            if key in self.pinned:
                return self.pinned[key][0].copy()
            cache, where = self.store.get(key)
            if cache is not None:
                return cache.copy() if where == "memory" else cache
        return None

    def _prefill_chunk(self, answer: _Answer) -> bool:
        """Compress the next chunk of ``answer``'s context; False once the context is compressed."""
        start = time.perf_counter()
        try:
            next(answer.prefill)
            done = False
        except StopIteration:
            answer.prefill, done = None, True
            tokens = answer.context.get_seq_length()
            self.lengths[answer.job.key] = answer.context.context[0].shape[1]
            self.context_token_bytes = max(1, answer.context.nbytes // max(1, tokens))
            self.metrics.add(prefills=1)
        self.metrics.add(prefill_seconds=time.perf_counter() - start)
        self._fit_store()
        return not done

    def _start(self, answer: _Answer) -> None:
        """Fork the context for ``answer``'s rows and feed its question (a preempted answer: its question and
        every token it had fed), choosing its first tokens."""
        job, context = answer.job, answer.context
        if answer.pending is None:
            self.metrics.add(queue_seconds=time.perf_counter() - job.queued)
        if answer.asked is None:
            ids = context.context[0].repeat(job.n, 1)  # (n, C)
            asked = self.tokenizer([job.asked] * job.n, return_tensors="pt", add_special_tokens=False)["input_ids"]
            answer.asked = torch.cat([ids, asked.to(ids.device)], 1)[:, context.get_seq_length() :]  # what the cache has not seen
        self._pin(job.key, context)
        fork = context.fork(job.n)
        try:
            feed = torch.cat([answer.asked, *answer.fed], 1)  # (n, q)
            seen = fork.get_seq_length()
            positions = torch.arange(seen, seen + feed.shape[1], device=feed.device)[None].expand(job.n, -1)
            with attach(self.model, fork):
                logits = self.model(
                    input_ids=feed, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): fork}
                ).logits[:, -1]  # (n, V)
        except Exception:
            self._unpin(job.key)
            raise
        answer.fork = fork
        self.scheduler.start(answer.seq)
        if answer.pending is None:  # a resumed answer has its next tokens already
            self._choose(answer, logits)
        self._fit_store()
        log.info("started a request on context %s (%s; %d tokens)", job.key[:12], answer.where, context.get_seq_length())

    def _pin(self, key: str, context: CompressedCache) -> None:
        if key not in self.pinned:
            self.pinned[key] = [context, 0, context.nbytes, context.held_pages]
        self.pinned[key][1] += 1

    def _unpin(self, key: str) -> None:
        entry = self.pinned[key]
        entry[1] -= 1
        if not entry[1]:
            del self.pinned[key]
            self.store.put(key, entry[0])

    # ---- decoding ---------------------------------------------------------------------------------

    def _step(self) -> None:
        """One model step: a token for every row of every running answer."""
        answers = [seq.request for seq in self.scheduler.running]
        start = time.perf_counter()
        try:
            batch = CacheBatch([a.fork for a in answers])
            tokens = torch.cat([a.pending for a in answers])  # (B, 1)
            with attach(self.model, batch):
                logits = self.model(
                    input_ids=tokens, position_ids=batch.positions(), use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(self.model): batch},
                ).logits[:, -1]  # (B, V)
        except Exception as err:  # the running answers fail; the worker and the server go on
            log.exception("a decode step of %d request(s) failed", len(answers))
            for answer in answers:
                self._end(answer, err)
            return
        rows = batch.batch_size
        self.metrics.add(batches=1, decode_seconds=time.perf_counter() - start)
        with self.metrics.lock:
            self.metrics.counts["largest_batch"] = max(self.metrics.counts["largest_batch"], rows)
        first = 0
        for answer in answers:
            n = answer.job.n
            answer.fed.append(answer.pending)
            self._choose(answer, logits[first : first + n])
            first += n
            if answer.rows.done:
                self._end(answer)
        self._account()

    def _choose(self, answer: _Answer, logits: torch.Tensor) -> None:
        """``answer``'s next tokens from its rows' ``(n, V)`` logits, handed to its rows."""
        if answer.sampler is None:
            tokens, chosen = logits.argmax(-1), [None] * answer.job.n  # as generate's greedy step picks
        else:
            tokens = answer.sampler(None, logits).argmax(-1)
            chosen = answer.sampler.chosen
        answer.pending = tokens[:, None]
        answer.rows.put(tokens.tolist(), chosen)

    def _held(self) -> int:
        """Bytes of the contexts running answers read and of their forks; each answer's ``held``: what stopping it frees."""
        held = sum(entry[2] for entry in self.pinned.values())
        held += sum(seq.request.context.nbytes for seq in self.scheduler.waiting if seq.request.prefill is not None)
        for seq in self.scheduler.running:
            answer = seq.request
            seq.held = answer.fork.nbytes
            held += seq.held
            entry = self.pinned[answer.job.key]
            if entry[1] == 1:
                seq.held += entry[2]  # its context goes idle with it
        return held

    def _held_pages(self) -> int:
        """Pages of the contexts running answers read, of a context being compressed, and of their forks (a
        fork's own: those it wrote)."""
        pages = sum(entry[3] for entry in self.pinned.values())
        pages += sum(seq.request.context.held_pages for seq in self.scheduler.waiting if seq.request.prefill is not None)
        return pages + sum(seq.request.fork.held_pages for seq in self.scheduler.running)

    def _account(self) -> None:
        """Bytes held by running answers; preempt the newest while they are over the budget."""
        held = self._held()
        victims = self.scheduler.to_preempt(held)
        for seq in victims:
            answer = seq.request
            answer.fork.reset()
            answer.fork = answer.context = None  # its context is found again when it resumes (it may go to disk)
            self._unpin(answer.job.key)
            self.metrics.add(preemptions=1)
            log.info("preempted a request of context %s: %s bytes were in use of %s", answer.job.key[:12], f"{held:,}", f"{self.budget:,}")
        self._fit_store(None if victims else held)

    def _fit_store(self, held: int | None = None) -> None:
        """Recount the bytes running answers hold (unless ``held``, counted since nothing changed); idle kept
        contexts get what is left of the budget."""
        self.active = self._held() if held is None else held
        self.active_pages = self._held_pages()
        if self.budget is not None:
            self.store.budget = max(0, self.budget - self.active)
            self.store.fit()

    def _end(self, answer: _Answer, error: Exception | None = None) -> None:
        """``answer`` is done, failed or cancelled: free its fork's pages and tell its handler. The bytes held
        are recounted at once: its context may have just gone back to the store, and ``/metrics`` reads the
        store's bytes beside :attr:`active` from another thread."""
        job = answer.job
        self.scheduler.finish(answer.seq)
        compressing = answer.prefill is not None
        if compressing:  # a context half compressed is dropped
            answer.prefill.close()
            answer.prefill = None
        if answer.fork is not None:
            answer.fork.reset()
            answer.fork = None
            self._unpin(job.key)
            self._fit_store()
        elif answer.context is not None and not compressing and job.key not in self.pinned:
            self.store.put(job.key, answer.context)  # taken from the store, never started: kept again
        answer.context = None
        if error is not None:
            job.emit(("error", error))
            return
        finishes, counts = answer.rows.results()
        if job.cancelled:
            finishes = [f if f != "length" or c >= job.max_tokens else "cancelled" for f, c in zip(finishes, counts)]
        cancelled = int(job.cancelled)
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
    max_batch: int = 16,
    max_queue: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    store_budget: int | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> FastAPI:
    """The ASGI app serving ``model`` with compression ``method`` (a spec, checked here).

    Args:
        name: the model's name in the API (default: the name it was loaded under).
        memory_budget: bytes of KV memory: the contexts running answers read and their forks, then idle kept
            contexts in what is left (the least recently used beyond go to disk). Requests start while they fit.
        store: folder for contexts moved to disk. Given, it persists: contexts found there are reused and
            those in memory are saved there at shutdown. None: a temporary folder, removed at shutdown.
        max_batch: the most rows (answers) one model step decodes, and the most choices (``n``) a request may ask.
        max_queue: requests waiting beyond this get a 429.
        max_body_bytes: larger request bodies get a 413.
        store_budget: bytes of files kept in the store; the least recently used beyond are deleted (None: no limit).
        prefill_chunk: a new context is compressed this many tokens per model step, between decode steps of the
            running answers (None: in one forward); answers equal :func:`kvcompress.generate` with the same
            ``prefill_chunk``.
    """
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
    engine = Engine(model, tokenizer, method, kept, metrics, max_batch, max_queue, memory_budget, prefill_chunk)
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
        prefixes = PrefixKeys(digest.encode(), context_ids)
        loop = asyncio.get_running_loop()
        job = Job(prefixes(len(prefixes)), context, asked, max_tokens, len(context_ids) + len(asked_ids), loop, sampling, req.n or 1, req.stops())
        job.asked_tokens, job.prefixes = len(asked_ids), prefixes
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
            "memory_budget": engine.budget,
            "kept_in_memory": len(kept.memory),
            "kept_on_disk": len(kept.disk),
            "disk_bytes": kept.disk_bytes,
            "store_budget": kept.disk_budget,
            "deleted_from_disk": kept.deleted,
            "evictions": kept.evictions,
            "queued": engine.jobs.qsize(),
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "active_bytes": engine.active,
            "active_pages": engine.active_pages,
            "kept_pages": kept.kept_pages,
            "disk_pages": kept.disk_pages,
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
        prefill_chunk=args.prefill_chunk,
    )
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (queued requests answered, kept contexts
    # saved by the lifespan), then raises the signal again for the handler it found: make that one a
    # no-op, so a clean shutdown exits with status 0.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    log.info("shut down")
