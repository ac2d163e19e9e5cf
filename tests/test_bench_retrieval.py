"""Retrieval cases: generated deterministically from the seed, facts planted at the stated depth."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from kvcompress.bench.retrieval import FORMS, case_depths, make_cases, run_retrieval, score

CONTEXT = 600


@pytest.fixture(scope="module")
def tokenizer(smol):
    return smol[1]


def test_same_seed_same_cases(tokenizer):
    first = make_cases(tokenizer, CONTEXT, 6, seed=3)
    assert first == make_cases(tokenizer, CONTEXT, 6, seed=3)
    other = make_cases(tokenizer, CONTEXT, 6, seed=4)
    assert [c.context for c in other] != [c.context for c in first]
    assert [c.expected for c in other] != [c.expected for c in first]


def test_every_form_meets_every_depth():
    cases = case_depths(9)
    assert Counter(form for form, _ in cases) == {form: 3 for form in FORMS}
    for form in FORMS:
        assert sorted(d for f, d in cases if f == form) == [0.1, 0.5, 0.9]
    assert [f for f, _ in case_depths(3)] == list(FORMS)


def _token_depth(tokenizer, context: str, sentence: str) -> float:
    at = context.index(sentence)
    return len(tokenizer.encode(context[:at], add_special_tokens=False)) / len(tokenizer.encode(context, add_special_tokens=False))


def test_facts_planted_at_stated_depth(tokenizer):
    for case in make_cases(tokenizer, CONTEXT, 9, seed=0):
        tokens = len(tokenizer.encode(case.context, add_special_tokens=False))
        assert abs(tokens - CONTEXT) <= 0.02 * CONTEXT, "the haystack holds about C tokens"
        depths = {s: _token_depth(tokenizer, case.context, s) for _, s in case.planted}
        assert all(case.context.count(s) == 1 for s in depths)
        asked = case.planted[0]
        assert asked[0] == case.depth and depths[asked[1]] == pytest.approx(case.depth, abs=0.04)
        # Others too, as near as sentences at most a few tokens apart allow, and in depth order.
        assert all(depths[s] == pytest.approx(d, abs=0.08) for d, s in case.planted)
        assert sorted(case.planted) == sorted(case.planted, key=lambda p: depths[p[1]])
        numbers = case.expected.split()
        assert all(n in " ".join(s for _, s in case.planted) for n in numbers)
        assert all(n not in case.question for n in numbers), "the answer is not in the question"
        haystack = case.context
        for _, sentence in case.planted:
            haystack = haystack.replace(sentence, "")
        assert not any(ch.isdigit() for ch in haystack), "the only numbers are the planted ones"


def test_kv_case_plants_distractors(tokenizer):
    case = next(c for c in make_cases(tokenizer, CONTEXT, 3, seed=0) if c.form == "kv")
    values = {s.split(" is ")[1].split(".")[0] for _, s in case.planted}
    assert len(case.planted) == 3 and len(values) == 3 and case.expected in values


@pytest.mark.parametrize(
    "reply, expected, correct",
    [
        ("The pass key is 60494.", "60494", True),
        ("60494", "60494", True),
        ("The pass key is 604941.", "60494", False),
        ("The phone extension of Chen is 880", "8961", False),
        ("The first half of the pass key is 42. Remember it. 42 is the first half. The second half is 25.", "42 25", True),
        ("The first half is 67. The second half is 67.", "67 70", False),
        ("The second half is 25, the first 42.", "42 25", False),
        ("I do not know.", "42", False),
    ],
)
def test_score(reply, expected, correct):
    assert score(reply, expected) is correct


@dataclass(frozen=True)
class _AnswersPasskeysOnly:
    """A stand-in method: right on passkey cases, wrong otherwise; no model involved."""

    spec: str = "fake"
    source: str = "kvcompress"

    def answer(self, model, tokenizer, context, question, max_new_tokens):
        return context.split("The pass key is ")[1].split(".")[0] if "The pass key is " in context else "no idea"


def test_run_retrieval_counts_by_form(tokenizer):
    cases = make_cases(tokenizer, 200, 6, seed=1)
    result = run_retrieval(_AnswersPasskeysOnly(), None, tokenizer, cases)
    assert result["correct"] == 2 and result["cases"] == 6
    assert result["by_form"] == {"passkey": [2, 2], "kv": [0, 2], "two-part": [0, 2]}
    assert [r["form"] for r in result["results"]] == [c.form for c in cases]
    assert all("context" not in r and "reply" in r for r in result["results"])


@pytest.mark.model
def test_question_aware_row_answers_as_generate_does(smol):
    import kvcompress
    from kvcompress.bench.methods import resolve

    model, tokenizer = smol
    context = "The keeper's log says the ship Aurora carried the code 4172. " + "The sea was calm all day. " * 20
    question = "What code did the Aurora carry? Answer with the number."
    spec = "snapkv:ratio=0.75,window=8"
    aware = resolve(spec + "@question-aware").answer(model, tokenizer, context, question, 8)
    assert aware == kvcompress.generate(model, tokenizer, context, question, spec, 8, question_aware=True)
    agnostic = resolve(spec).answer(model, tokenizer, context, question, 8)
    assert agnostic == kvcompress.generate(model, tokenizer, context, question, spec, 8)
    assert aware != agnostic  # the question changed which tokens were kept, so the flag reached the cache
