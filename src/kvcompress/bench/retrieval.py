"""Retrieval from long contexts: facts planted at known depths in a haystack, asked after it.

Every case is generated from ``(seed, index)``: a haystack of ``C`` tokens of plain, varied,
number-free sentences ("The old farmer crossed the wooden bridge at dusk."), facts planted on line
boundaries at stated depths, and a question asked after the context (through
:func:`kvcompress.generation.split_prompt`, so the question is not compressed). Three forms:

- ``passkey``: one number, stated twice (the classic passkey test).
- ``kv``: ``KV_FACTS`` ``name -> number`` facts at different depths, each stated twice; one is asked.
- ``two-part``: a pass key whose two halves sit in two sentences, the second deeper by
  ``SECOND_PART_AFTER``; the answer needs both.

Scoring is exact match on numbers: the distinct numbers of the reply, in order of appearance,
must start with the expected ones (one, or two for ``two-part``).

The wording and the haystack were chosen so that the uncompressed SmolLM2-135M-Instruct solves
most cases at 1k-4k tokens (seed 0: 3/3 at 1k, 8/9 at 2k, 7/9 at 4k; the misses are facts at
depth 0.1). A 135M model echoes the planted sentence ("The first half of the pass
key is 42. Remember it."), which the scoring accepts. With Python documentation as the haystack it
solved about half the cases at 2k tokens (its numbers and code distract it), so the haystack is
generated; chains (``A -> B``, ``B -> number``) failed even uncompressed, so the two halves of a
``two-part`` answer are combined by listing, not by reasoning.

Depth is the fraction of the context's tokens that precede the asked fact (the first sentence of
a two-part fact).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from kvcompress.bench.methods import BenchMethod

FORMS = ("passkey", "kv", "two-part")
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Gustav", "Hana", "Ivan", "Julia", "Kofi", "Lena")
KV_FACTS = 3  # facts planted in a kv case; one is asked
MAX_NEW_TOKENS = 48  # small models echo the whole planted sentence before the second number
FIRST_DEPTH, LAST_DEPTH = 0.1, 0.9
SECOND_PART_AFTER = 0.02  # the second half of a two-part fact, this much deeper than the first

# Haystack sentences: subject, verb, object, time; 12**4 combinations, no digits.
_SUBJECTS = ("The old farmer", "A small boat", "The tall woman", "My neighbour", "The school bus", "A grey cat",
             "The city council", "The baker", "A cold wind", "The museum guide", "The young painter", "A quiet train")
_VERBS = ("passed", "watched", "painted", "visited", "followed", "crossed",
          "cleaned", "described", "left", "reached", "found", "circled")
_OBJECTS = ("the wooden bridge", "a field of wheat", "the harbour", "the empty market", "a narrow street",
            "the bright garden", "the stone wall", "an open window", "the long road", "the village square",
            "a hill of pines", "the blue lake")
_TIMES = ("in the morning", "after lunch", "before the rain", "at dusk", "on Sunday", "during the fair",
          "in early spring", "late at night", "under the clouds", "in the warm evening", "while it snowed",
          "without a word")


@dataclass(frozen=True)
class Case:
    """One retrieval question.

    ``planted`` holds ``(depth, sentence)`` pairs, the asked fact first; ``expected`` the numbers of
    the answer separated by spaces.
    """

    form: str
    depth: float
    context: str
    question: str
    expected: str
    planted: tuple[tuple[float, str], ...]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


def _facts(form: str, depth: float, rng: random.Random) -> tuple[list[tuple[float, str]], str, str]:
    """``(planted, question, expected)`` for one case; the asked fact is planted first, at ``depth``."""
    if form == "passkey":
        key = _number(rng, 5)
        planted = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        return planted, "What is the pass key? Reply with the number.", str(key)
    if form == "kv":
        names = rng.sample(NAMES, KV_FACTS)
        values = [_number(rng, 4) for _ in names]
        depths = [depth] + [rng.uniform(FIRST_DEPTH, LAST_DEPTH) for _ in names[1:]]
        fact = "Fact: the phone extension of {0} is {1}. Remember it. {1} is the phone extension of {0}."
        planted = [(d, fact.format(n, v)) for d, n, v in zip(depths, names, values)]
        return planted, f"What is the phone extension of {names[0]}? Reply with the number.", str(values[0])
    if form == "two-part":
        first, second = rng.sample(range(10, 100), 2)  # distinct, so the scoring can tell them apart
        half = "{} is the {} half of the pass key"
        planted = [
            (depth, f"The first half of the pass key is {first}. Remember it. {half.format(first, 'first')}."),
            (depth + SECOND_PART_AFTER, f"The second half of the pass key is {second}. Remember it. {half.format(second, 'second')}."),
        ]
        question = "What is the first half of the pass key, and what is the second half? Reply with the two numbers."
        return planted, question, f"{first} {second}"
    raise ValueError(f"unknown retrieval form {form!r}; forms: {', '.join(FORMS)}")


def case_depths(count: int) -> list[tuple[str, float]]:
    """``(form, depth)`` of ``count`` cases: forms in turn, each form visiting evenly spaced depths.

    Cases ``3r .. 3r + 2`` form round ``r``; within a round the forms sit at different depths, so
    every form meets every depth over ``R = ceil(count / 3)`` rounds.
    """
    rounds = -(-count // len(FORMS))
    out = []
    for i in range(count):
        r, f = divmod(i, len(FORMS))
        slot = (r + f) % rounds
        depth = FIRST_DEPTH + (LAST_DEPTH - FIRST_DEPTH) * slot / (rounds - 1) if rounds > 1 else 0.5
        out.append((FORMS[f], round(depth, 4)))
    return out


def _plant(tokenizer, filler_ids: list[int], planted: list[tuple[float, str]]) -> str:
    """Put each sentence on its own line at the line break of the filler nearest to its depth.

    Depth counts the planted sentences too: a sentence at depth ``d`` follows ``d * total`` tokens.
    Sentences keep the order of their depths even when they are closer than a sentence's length.
    """
    text = tokenizer.decode(filler_ids)
    lengths = [len(tokenizer.encode(s, add_special_tokens=False)) + 1 for _, s in planted]  # +1: its newline
    total = len(filler_ids) + sum(lengths)
    breaks = [i + 1 for i, ch in enumerate(text) if ch == "\n"] or [len(text)]
    pieces, done, shallower = [], 0, 0
    for (depth, sentence), length in sorted(zip(planted, lengths)):
        before = round(depth * total) - shallower  # filler tokens before it
        at = len(tokenizer.decode(filler_ids[: max(before, 0)]))
        at = max(min(breaks, key=lambda b: abs(b - at)), done)
        pieces += [text[done:at], sentence, "\n"]
        done = at
        shallower += length
    return "".join(pieces) + text[done:]


def haystack(tokenizer, tokens: int, rng: random.Random) -> list[int]:
    """``tokens`` ids of generated sentences, two or three to a line."""
    lines, count = [], 0
    while count < tokens:
        line = " ".join(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
            for _ in range(rng.choice((2, 3)))
        )
        lines.append(line)
        count += len(tokenizer.encode(line + "\n", add_special_tokens=False))
    return tokenizer.encode("\n".join(lines) + "\n", add_special_tokens=False)[:tokens]


def make_cases(tokenizer, context_tokens: int, count: int, seed: int) -> list[Case]:
    """Generate ``count`` cases of about ``context_tokens`` context tokens each, deterministically from ``seed``."""
    cases = []
    for i, (form, depth) in enumerate(case_depths(count)):
        rng = random.Random(f"kvcompress-retrieval-{seed}-{i}")
        planted, question, expected = _facts(form, depth, rng)
        need = context_tokens - sum(len(tokenizer.encode(s, add_special_tokens=False)) + 1 for _, s in planted)
        context = _plant(tokenizer, haystack(tokenizer, need, rng), planted)
        cases.append(Case(form, depth, context, question, expected, tuple(planted)))
    return cases


def score(reply: str, expected: str) -> bool:
    """Exact match: the reply's first ``k`` distinct numbers equal the ``k`` expected numbers, in order."""
    want = expected.split()
    return list(dict.fromkeys(re.findall(r"\d+", reply)))[: len(want)] == want


def run_retrieval(method: BenchMethod, model, tokenizer, cases: list[Case], desc: str = "") -> dict:
    """Ask every case through ``method`` (one compressed context per question); score the replies.

    Returns:
        ``{"correct", "cases", "by_form": {form: [correct, total]}, "results": [...]}`` where each
        result holds the case (without its context), the reply and whether it is correct.
    """
    results = []
    for case in tqdm(cases, desc=desc or f"retrieval {method.spec}", leave=False):
        reply = method.answer(model, tokenizer, case.context, case.question, MAX_NEW_TOKENS)
        record = {k: v for k, v in asdict(case).items() if k != "context"}
        results.append({**record, "context_tokens": len(tokenizer.encode(case.context)), "reply": reply, "correct": score(reply, case.expected)})
    correct, total = Counter(), Counter()
    for r in results:
        total[r["form"]] += 1
        correct[r["form"]] += r["correct"]
    return {
        "correct": sum(correct.values()),
        "cases": len(results),
        "by_form": {f: [correct[f], total[f]] for f in FORMS if total[f]},
        "results": results,
    }
