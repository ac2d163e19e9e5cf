"""What the harness compares: a method spec resolved into a way to build and fill a cache.

Every row of a benchmark is a :class:`BenchMethod`. kvcompress specs (``none``, ``kivi:bits=2``,
any registered method or combination) resolve to :class:`KVCompressMethod`; specs that start with
``kvpress:`` resolve to the optional adapter in :mod:`kvcompress.bench.kvpress_adapter`, and specs that
start with ``peer:`` to transformers' own ``QuantizedCache`` (:mod:`kvcompress.bench.peers`). The
harness knows no method by name apart from ``none`` (the baseline) and those prefixes.

A kvcompress spec ending in ``@question-aware`` is the same method compressing the context only
once the question has been read (``kvcompress.generate(..., question_aware=True)``): a separate row
that measures retrieval only, since perplexity and speed involve no question.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Protocol

from kvcompress.attach import attach
from kvcompress.bench.kvpress_adapter import PREFIX as KVPRESS_PREFIX
from kvcompress.bench.kvpress_adapter import resolve_press
from kvcompress.bench.peers import PREFIX as PEER_PREFIX
from kvcompress.bench.peers import resolve_peer
from kvcompress.cache import make_cache
from kvcompress.generation import answer
from kvcompress.registry import parse_spec

BASELINE = "none"
QUESTION_AWARE = "@question-aware"
ALL_PARTS = ("speed", "perplexity", "retrieval", "throughput")
DEFAULT_PARTS = ("speed", "perplexity", "retrieval")  # throughput (batched decode) only when asked: it is long


def perplexity_parts(texts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The stored parts of perplexity on ``texts`` (names): ``("perplexity",)`` for one text (the
    name parts had before several texts), else ``perplexity[<name>]`` per text."""
    return ("perplexity",) if len(texts) == 1 else tuple(f"perplexity[{name}]" for name in texts)


def part_kind(part: str) -> str:
    """What a stored part measures, among :data:`ALL_PARTS`: ``perplexity[kjv]`` -> ``perplexity``."""
    return part.partition("[")[0]


class BenchMethod(Protocol):
    """One row of the benchmark: how to build its cache and compress a context into it."""

    spec: str  # as the user typed it
    source: str  # "kvcompress", "kvpress" or "peer" (transformers' QuantizedCache): which library compresses
    parts: tuple[str, ...]  # what this row measures, among ALL_PARTS

    def new_cache(self, model):
        """An empty cache for one sequence."""

    def session(self, model, cache) -> ContextManager:
        """Context manager active while ``cache`` is used with ``model`` (prefill and decoding)."""

    def compressing(self, model) -> ContextManager:
        """Context manager active while the context is prefilled (a press's hooks); may do nothing."""

    def nbytes(self, cache) -> int:
        """Exact bytes of every tensor ``cache`` holds."""

    def answer(self, model, tokenizer, context: str, question: str, max_new_tokens: int, prefill_chunk: int | None = None) -> str:
        """Compress ``context`` (``prefill_chunk`` tokens at a time, when given), ask ``question`` after it
        (not compressed), and answer greedily."""


@dataclass(frozen=True)
class KVCompressMethod:
    """A kvcompress spec such as ``streaming:window=512+kivi:bits=4``; compression lives in the cache."""

    spec: str
    source: str = "kvcompress"
    question_aware: bool = False
    parts: tuple[str, ...] = ALL_PARTS

    @property
    def cache_spec(self) -> str:
        """The spec of the cache, without the row's ``@question-aware`` mark."""
        return self.spec.removesuffix(QUESTION_AWARE)

    def new_cache(self, model):
        return make_cache(self.cache_spec, model)

    def session(self, model, cache) -> ContextManager:
        return attach(model, cache)

    def compressing(self, model) -> ContextManager:
        return contextlib.nullcontext()

    def nbytes(self, cache) -> int:
        return cache.nbytes

    def answer(self, model, tokenizer, context: str, question: str, max_new_tokens: int, prefill_chunk: int | None = None) -> str:
        cache = self.new_cache(model)
        return answer(model, tokenizer, context, question, cache, max_new_tokens, self.question_aware, prefill_chunk)[0]


def resolve(spec: str) -> BenchMethod:
    """Turn a spec into a :class:`BenchMethod`, checking it before any model loads.

    Raises:
        SpecError: a bad kvcompress spec.
        kvcompress.bench.kvpress_adapter.KVPressUnavailable: a ``kvpress:`` spec that cannot run here.
        kvcompress.bench.peers.PeerUnavailable: a ``peer:`` spec that is bad or whose backend is missing.
    """
    spec = spec.strip()
    if spec.startswith(KVPRESS_PREFIX):
        return resolve_press(spec, ALL_PARTS)
    if spec.startswith(PEER_PREFIX):
        return resolve_peer(spec, ALL_PARTS)
    if spec.endswith(QUESTION_AWARE):
        parse_spec(spec.removesuffix(QUESTION_AWARE))
        return KVCompressMethod(spec, question_aware=True, parts=("retrieval",))
    parse_spec(spec)
    return KVCompressMethod(spec)
