"""Retrieval cases: generated deterministically from the seed, facts planted at the stated depth, exact scoring."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import pytest

from kvcompress.bench.retrieval import (
    FORMS,
    LIST_TASKS,
    RULER_TASKS,
    WORDS,
    case_depths,
    make_cases,
    recall,
    run_retrieval,
    score,
    task_names,
)

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

    def answer(self, model, tokenizer, context, question, max_new_tokens, prefill_chunk=None):
        return context.split("The pass key is ")[1].split(".")[0] if "The pass key is " in context else "no idea"


def test_run_retrieval_counts_by_task(tokenizer):
    cases = make_cases(tokenizer, 200, 6, seed=1)
    result = run_retrieval(_AnswersPasskeysOnly(), None, tokenizer, cases)
    assert result["correct"] == 2 and result["cases"] == 6
    assert result["by_task"] == {"passkey": [2, 2], "kv": [0, 2], "two-part": [0, 2]} and "by_form" not in result
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


# ---- The RULER task set -------------------------------------------------------------------------

RULER_CONTEXT = 1200  # a UUID needle (stated twice) is 90 tokens: deep ones need room after them


@pytest.fixture(scope="module")
def ruler_cases(tokenizer):
    """Two rounds of every RULER task (depths 0.1 and 0.9)."""
    return make_cases(tokenizer, RULER_CONTEXT, 2 * len(RULER_TASKS), seed=0, tasks="ruler")


def test_ruler_cases_are_deterministic(tokenizer, ruler_cases):
    assert [c.form for c in ruler_cases] == list(RULER_TASKS) * 2
    assert {c.form for c in ruler_cases if c.match == "all"} == set(LIST_TASKS)  # the report shows their recall
    assert ruler_cases == make_cases(tokenizer, RULER_CONTEXT, 2 * len(RULER_TASKS), seed=0, tasks="ruler")
    other = make_cases(tokenizer, RULER_CONTEXT, 2 * len(RULER_TASKS), seed=1, tasks="ruler")
    assert all(a.expected != b.expected and a.context != b.context for a, b in zip(ruler_cases, other))


def test_default_set_is_unchanged(tokenizer):
    """The harness's default cases are the ones it made before task sets existed (seed 0)."""
    cases = make_cases(tokenizer, CONTEXT, 9, seed=0)
    assert cases == make_cases(tokenizer, CONTEXT, 9, seed=0, tasks="default")
    assert [c.expected for c in cases] == ["56765", "9892", "67 97", "48851", "7422", "92 25", "34229", "5509", "77 72"]
    assert all(c.max_new_tokens == 48 and c.kind == "number" and c.match == "first" for c in cases)


def test_task_sets_and_names():
    assert task_names("default") == FORMS and task_names("ruler") == RULER_TASKS
    assert task_names(("vt", "passkey")) == ("vt", "passkey")
    assert task_names("single-number, multikey") == ("single-number", "multikey") and task_names("vt") == ("vt",)
    with pytest.raises(ValueError, match="tasks: passkey"):
        task_names("single-number,niah")
    with pytest.raises(ValueError, match="sets: default, ruler"):
        task_names("rular")
    with pytest.raises(ValueError, match="tasks: passkey"):
        task_names(("vt", "niah"))
    cases = case_depths(2 * len(RULER_TASKS), RULER_TASKS)
    assert Counter(t for t, _ in cases) == {t: 2 for t in RULER_TASKS}
    assert all(sorted(d for t, d in cases if t == task) == [0.1, 0.9] for task in RULER_TASKS)


def test_ruler_needles_planted_at_their_depths(tokenizer, ruler_cases):
    for case in ruler_cases:
        tokens = len(tokenizer.encode(case.context, add_special_tokens=False))
        assert abs(tokens - RULER_CONTEXT) <= 0.02 * RULER_CONTEXT, case.form
        if case.form == "cwe":
            assert case.depth is None and case.planted == ()
            continue
        depths = {s: _token_depth(tokenizer, case.context, s) for _, s in case.planted}
        assert all(case.context.count(s) == 1 for s in depths)
        assert case.planted[0][0] == case.depth and depths[case.planted[0][1]] == pytest.approx(case.depth, abs=0.04)
        assert all(depths[s] == pytest.approx(d, abs=0.08) for d, s in case.planted)
        assert sorted(case.planted) == sorted(case.planted, key=lambda p: depths[p[1]])
        haystack = case.context
        for _, sentence in case.planted:
            haystack = haystack.replace(sentence, "")
        assert not any(ch.isdigit() for ch in haystack)
        assert not set(re.findall(r"[a-z]+", haystack.lower())) & set(WORDS), "no answer word in the haystack"


def _by_form(cases, form):
    return [c for c in cases if c.form == form]


def test_single_needles_answer_their_question(ruler_cases):
    patterns = {"single-number": r"\d{7}", "single-word": "|".join(WORDS), "single-uuid": r"[0-9a-f-]{36}"}
    for form, pattern in patterns.items():
        for case in _by_form(ruler_cases, form):
            (_, sentence), = case.planted
            name = case.question.split(" of ")[1].split("?")[0]
            shown = f'"{case.expected}"' if case.kind == "word" else case.expected  # a word needle is quoted
            assert f"of {name} is {shown}." in sentence and re.fullmatch(pattern, case.expected)
            assert case.expected not in case.question and score(sentence, case.expected, case.kind)


def test_multi_needle_answers(ruler_cases):
    for case in _by_form(ruler_cases, "multikey"):
        facts = dict(re.findall(r"the special number of (\w+) is (\d+)\.", " ".join(s for _, s in case.planted)))
        asked = case.question.split(" of ")[1].split("?")[0]
        assert len(facts) == len(set(facts.values())) == 4 and case.expected == facts[asked]
    for case in _by_form(ruler_cases, "multivalue"):
        values = re.findall(r"special numbers of (\w+) is (\d+)\.", " ".join(s for _, s in case.planted))
        assert len({n for n, _ in values}) == 1 and sorted(case.expected.split()) == sorted(v for _, v in values)
        assert len(set(case.expected.split())) == 4 and case.match == "all"
    for case in _by_form(ruler_cases, "multiquery"):
        facts = dict(re.findall(r"the special number of (\w+) is (\d+)\.", " ".join(s for _, s in case.planted)))
        asked = re.findall(r"[A-Z][a-z]+", case.question.split(" of ")[1].split("?")[0])
        assert case.expected.split() == [facts[n] for n in asked] and len(asked) == 4


def test_variable_tracking_answer_is_the_chain(ruler_cases):
    for case in _by_form(ruler_cases, "vt"):
        values = {}
        for name, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", case.context):  # in text order
            values[name] = values.get(source, source)
        asked = re.search(r"value (\d+)", case.question).group(1)
        assert sorted(case.expected.split()) == sorted(n for n, v in values.items() if v == asked)
        assert sorted(case.distractors) == sorted(n for n, v in values.items() if v != asked)
        assert len(case.expected.split()) == len(case.distractors) == 5


def test_common_words_answer_is_the_most_frequent(ruler_cases):
    for case in _by_form(ruler_cases, "cwe"):
        counts = Counter(re.findall(r"[a-z]+", case.context))
        common = case.expected.split()
        assert set(re.findall(r"[a-z]+", case.context.rsplit(",", 1)[0])) <= set(WORDS)  # the last may be cut
        assert sorted(common) == sorted(w for w, _ in counts.most_common(3))
        assert min(counts[w] for w in common) > 5 * max(n for w, n in counts.items() if w not in common)
        assert set(case.distractors) == set(WORDS) - set(common)


UUID = "d110a422-73e7-4115-b94e-0757b8a945a5"


@pytest.mark.parametrize(
    "reply, expected, kind, match, distractors, correct",
    [
        ("The special number of Chen is 4172093. Remember it. 4172093 is the special number.", "4172093", "number", "first", (), True),
        ("The special number of Dana is 5551234, and of Chen 4172093.", "4172093", "number", "first", (), False),
        ("The special word of Chen is Lantern.", "lantern", "word", "first", (), True),
        ("The special word of Chen is lanterns.", "lantern", "word", "first", (), False),
        ("The special word of Chen is a kite, not a kitten.", "kitten", "word", "first", (), False),
        (f"The special code of Chen is {UUID.upper()}.", UUID, "uuid", "first", (), True),
        (f"The special code of Chen is {UUID[:-1]}.", UUID, "uuid", "first", (), False),
        ("1 2 3 4", "4 3 2 1", "number", "all", (), True),
        ("1 2 3", "4 3 2 1", "number", "all", (), False),
        ("The variables are ABCDE, FGHIJ and KLMNO.", "KLMNO ABCDE FGHIJ", "variable", "all", ("PQRST",), True),
        ("VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE. VAR KLMNO", "ABCDE FGHIJ KLMNO", "variable", "all", ("PQRST",), True),
        ("ABCDE, FGHIJ, KLMNO, PQRST", "ABCDE FGHIJ KLMNO", "variable", "all", ("PQRST",), False),
        ("ABCDE, FGHIJ, Klmno", "ABCDE FGHIJ KLMNO", "variable", "all", (), False),
        ("Candle, oyster and coconut.", "coconut candle oyster", "word", "all", ("acorn", "anchor"), True),
        ("candle, oyster, coconut, anchor", "coconut candle oyster", "word", "all", ("acorn", "anchor"), False),
    ],
)
def test_score_by_kind(reply, expected, kind, match, distractors, correct):
    assert score(reply, expected, kind, match, distractors) is correct


def test_recall_is_partial_credit():
    assert recall("candle and oyster", "coconut candle oyster", "word") == pytest.approx(2 / 3)
    assert recall("ABCDE, FGHIJ, PQRST", "ABCDE FGHIJ", "variable") == 1.0
    assert recall("nothing", "1 2", "number") == 0.0


@dataclass(frozen=True)
class _EchoesPlanted:
    """A stand-in method: replies with every needle of the context (or its first line for cwe)."""

    spec: str = "echo"
    source: str = "kvcompress"

    def answer(self, model, tokenizer, context, question, max_new_tokens, prefill_chunk=None):
        lines = [line for line in context.splitlines() if line.startswith(("Fact:", "VAR"))]
        return " ".join(lines) or context.splitlines()[0]


def test_run_retrieval_reports_by_task(tokenizer):
    cases = make_cases(tokenizer, 300, len(RULER_TASKS), seed=2, tasks="ruler")
    result = run_retrieval(_EchoesPlanted(), None, tokenizer, cases)
    assert list(result["by_task"]) == list(RULER_TASKS)
    # Echoing every needle answers single needles and all-asked lists; multikey only when the asked
    # needle comes first in the text; vt names the distractor chain too; a cwe line holds every
    # common word and 7 others.
    assert {t: c for t, (c, n) in result["by_task"].items()} == {
        "single-number": 1, "single-word": 1, "single-uuid": 1, "multikey": 0, "multivalue": 1,
        "multiquery": 1, "vt": 0, "cwe": 0,
    }
    assert result["recall_by_task"]["vt"] == 1.0 and result["recall_by_task"]["cwe"] == 1.0
    assert all(r["max_new_tokens"] == c.max_new_tokens and "recall" in r for r, c in zip(result["results"], cases))
