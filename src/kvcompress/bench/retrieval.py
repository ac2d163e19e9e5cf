"""Retrieval from long contexts: facts planted at known depths in a haystack, asked after it.

Every case is generated from ``(seed, index)``: a haystack of ``C`` tokens of plain, varied,
number-free sentences ("The old farmer crossed the wooden bridge at dusk."), facts planted on line
boundaries at stated depths, and a question asked after the context (through
:func:`kvcompress.generation.split_prompt`, so the question is not compressed). Cases come from a
task set (:data:`TASK_SETS`): ``default`` (:data:`FORMS`, the harness's set) or ``ruler``
(:data:`RULER_TASKS`). Within a set the tasks take turns, each visiting evenly spaced depths.

The ``default`` set:

- ``passkey``: one number, stated twice (the classic passkey test).
- ``kv``: ``KV_FACTS`` ``name -> number`` facts at different depths, each stated twice; one is asked.
- ``two-part``: a pass key whose two halves sit in two sentences, the second deeper by
  ``SECOND_PART_AFTER``; the answer needs both.

The ``ruler`` set, after the task families of RULER (Hsieh et al., 2024,
https://arxiv.org/abs/2404.06654), in our own wording; every needle is stated twice:

- ``single-number``, ``single-word``, ``single-uuid``: one needle ``name -> value``, the value a
  7-digit number, a word of :data:`WORDS` or a random UUID.
- ``multikey``: ``MULTI`` needles ``name -> number`` with different names; one is asked.
- ``multivalue``: ``MULTI`` numbers for one name; all are asked.
- ``multiquery``: ``MULTI`` needles ``name -> number``; all are asked in one question.
- ``vt`` (variable tracking): a chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... of
  ``VT_HOPS`` hops, and a second chain with another value as distractor; the answer is every
  variable of the asked value's chain.
- ``cwe`` (common-word extraction): no haystack and no depth (``depth`` is None); the context is
  lines of words of :data:`WORDS`, each line holding the ``CWE_COMMON`` common words once and
  ``CWE_OTHERS`` others taken in turn from the rest of :data:`WORDS`, so a common word appears
  about ``(len(WORDS) - CWE_COMMON) / CWE_OTHERS`` (15) times as often as any other; the answer is
  the common words.

Departures from RULER: needles are stated twice and asked by a name ("the special number of
Chen") rather than a random word; the haystack is generated sentences (RULER: repeated noise or
essays); ``multikey`` has distractors of the same kind only (RULER's variants 2 and 3, a haystack
of needles and UUID keys, are left out); ``vt`` has one distractor chain; ``cwe`` asks for 3 words
(RULER: 10) among lines of comma-separated words (RULER: a numbered list).

Scoring is exact on the items of a reply: a case says what kind of item it wants, and the reply's
items of that kind are its maximal digit runs (``number``), canonical ``8-4-4-4-12`` hex UUIDs,
any case (``uuid``), words of :data:`WORDS`, any case (``word``) or whole runs of 5 capital
letters (``variable``), distinct, in order of appearance. A case with one answer (and
``two-part``) is correct when the reply's first items are the expected ones, in order: a reply
that echoes the planted sentence ("The special number of Chen is 4172093. Remember it.") is
correct, one that names a distractor first is not. A case with a list answer (``multivalue``,
``multiquery``, ``vt``, ``cwe``) is correct when every expected item is among the reply's items, in
any order, and none of the case's distractors is (the other chain's variables for ``vt``, the
uncommon words for ``cwe``), so a reply that lists everything it read scores nothing. Partial
credit (``recall``): the fraction of the expected items among the reply's items, distractors or
not.

The wording and the haystack were chosen so that the uncompressed SmolLM2-135M-Instruct solves
most cases at 1k-4k tokens (default set, seed 0: 3/3 at 1k, 8/9 at 2k, 7/9 at 4k; the misses are
facts at depth 0.1). A 135M model echoes the planted sentence ("The first half of the pass
key is 42. Remember it."), which the scoring accepts. With Python documentation as the haystack it
solved about half the cases at 2k tokens (its numbers and code distract it), so the haystack is
generated; chains (``A -> B``, ``B -> number``) failed even uncompressed, so the two halves of a
``two-part`` answer are combined by listing, not by reasoning.

The ``ruler`` set, uncompressed SmolLM2-135M-Instruct, correct of 10 at 1,024 / 4,096 tokens
(``experiments/ruler_baseline.md``: ``python experiments/ruler_baseline.py --contexts 1024
--per-task 10``, and ``--contexts 4096 --per-task 5`` with ``--seed 0`` and ``--seed 1``):
single-number 10 / 10, single-word 10 / 10, single-uuid 10 / 7, multikey 8 / 7, multivalue 2 / 2
(recall 0.70 / 0.53), multiquery 1 / 0 (recall 0.57 / 0.43), vt 0 / 0 (recall 0.20 / 0.06), cwe
0 / 0 (recall 0.33 / 0.30). Single needles and multikey are solved; of four values or four keys
the model returns two or three (compare methods on recall there); variable tracking and
common-word extraction are beyond a 135M model. Quoting the word of a ``single-word`` needle
took it from 5 to 10 of 10 at 4,096 tokens (unquoted, the model answered with the key's name);
numbering the values of ``multivalue`` or asking for one line per name in ``multiquery`` did not
help clearly (5 cases each); three needles instead of four helped ``multiquery`` a little (2 of
5) and hurt ``multivalue`` (0 of 5), so RULER's four stay.

Depth is the fraction of the context's tokens that precede the asked fact (the first sentence of
a two-part fact, the first assignment of the asked ``vt`` chain; for ``multivalue`` and
``multiquery``, the first planted needle, the others sitting at random depths as distractors do).
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from kvcompress.bench.methods import BenchMethod

FORMS = ("passkey", "kv", "two-part")
RULER_TASKS = ("single-number", "single-word", "single-uuid", "multikey", "multivalue", "multiquery", "vt", "cwe")
TASK_SETS = {"default": FORMS, "ruler": RULER_TASKS}
LIST_TASKS = ("multivalue", "multiquery", "vt", "cwe")  # answers that are lists (``match="all"``): recall informs
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Gustav", "Hana", "Ivan", "Julia", "Kofi", "Lena")
KV_FACTS = 3  # facts planted in a kv case; one is asked
MULTI = 4  # needles of multikey, values of multivalue, keys of multiquery (RULER's 4)
VT_HOPS = 4  # assignments after the first in a vt chain (RULER's 4): 5 variables
CWE_COMMON, CWE_OTHERS = 3, 7  # words of a cwe line: the common ones, then others in turn
MAX_NEW_TOKENS = 48  # small models echo the whole planted sentence before the second number
LIST_NEW_TOKENS = 96  # list answers and UUIDs (a UUID is 36 tokens for SmolLM2)
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

# Values of single-word needles and the words of cwe lists: concrete nouns, none of them a word of
# the haystack or of a question.
WORDS = (
    "acorn", "anchor", "anvil", "apricot", "balloon", "barrel", "basket", "blanket", "bottle", "bucket",
    "button", "cabbage", "cactus", "camel", "candle", "carpet", "cherry", "coconut", "compass", "cookie",
    "crayon", "diamond", "dolphin", "donkey", "dragon", "eagle", "emerald", "engine", "envelope", "falcon",
    "feather", "fiddle", "fountain", "giraffe", "glove", "goblet", "guitar", "hammer", "hammock", "harp",
    "hawk", "helmet", "honey", "igloo", "jacket", "jelly", "kettle", "kite", "kitten", "koala",
    "ladder", "lamp", "lantern", "lemon", "lizard", "lobster", "magnet", "mango", "marble", "mirror",
    "mitten", "muffin", "needle", "noodle", "octopus", "orange", "oven", "oyster", "parrot", "peanut",
    "pebble", "pencil", "pepper", "piano", "pillow", "pumpkin", "puzzle", "quartz", "quilt", "rabbit",
    "radish", "raven", "ribbon", "robot", "rocket", "saddle", "salmon", "scarf", "spoon", "sponge",
    "teapot", "tiger", "tomato", "tractor", "trumpet", "tulip", "umbrella", "vase", "velvet", "violin",
    "volcano", "wagon", "wallet", "walnut", "walrus", "whistle", "yogurt", "zebra",
)
_WORD_SET = frozenset(WORDS)
_ITEMS = {
    "number": lambda reply: re.findall(r"\d+", reply),
    "uuid": lambda reply: re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", reply.lower()),
    "word": lambda reply: [w for w in re.findall(r"[a-z]+", reply.lower()) if w in _WORD_SET],
    "variable": lambda reply: re.findall(r"\b[A-Z]{5}\b", reply),
}


@dataclass(frozen=True)
class Case:
    """One retrieval question.

    ``form`` is the task; ``planted`` holds ``(depth, sentence)`` pairs, the asked fact first (empty
    for ``cwe``); ``expected`` the items of the answer separated by spaces, of kind ``kind``
    (``number``, ``uuid``, ``word``, ``variable``); ``match`` is ``first`` (the reply's first items
    are the expected ones, in order) or ``all`` (every expected item, none of ``distractors``).
    """

    form: str
    depth: float | None
    context: str
    question: str
    expected: str
    planted: tuple[tuple[float, str], ...]
    kind: str = "number"
    match: str = "first"
    distractors: tuple[str, ...] = ()
    max_new_tokens: int = MAX_NEW_TOKENS


@dataclass(frozen=True)
class _Facts:
    """What a task plants and asks, before the haystack is laid around it (fields as in :class:`Case`)."""

    planted: list[tuple[float, str]]
    question: str
    expected: tuple[str, ...]
    kind: str = "number"
    match: str = "first"
    distractors: tuple[str, ...] = ()
    max_new_tokens: int = MAX_NEW_TOKENS


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


def _numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct numbers of ``digits`` digits, so that the scoring can tell them apart."""
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), count)]


def _other_depths(rng: random.Random, count: int) -> list[float]:
    return [rng.uniform(FIRST_DEPTH, LAST_DEPTH) for _ in range(count)]


def _needle(what: str, name: str, value: str) -> str:
    return f"Fact: the special {what} of {name} is {value}. Remember it. {value} is the special {what} of {name}."


def _single(what: str, value: str, depth: float, rng: random.Random, kind: str = "number") -> _Facts:
    name = rng.choice(NAMES)
    budget = LIST_NEW_TOKENS if kind == "uuid" else MAX_NEW_TOKENS
    question = f"What is the special {what} of {name}? Reply with the {what}."
    shown = f'"{value}"' if kind == "word" else value  # quoted, the word reads as a value, not as prose
    return _Facts([(depth, _needle(what, name, shown))], question, (value,), kind, max_new_tokens=budget)


def _vt(depth: float, rng: random.Random) -> _Facts:
    """Two chains of ``VT_HOPS`` hops, the asked one from ``depth``, the other from a random depth; each
    chain's assignments are in text order, spread evenly from its start towards the end."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = set()
    while len(names) < 2 * (VT_HOPS + 1):
        names.add("".join(rng.choices(letters, k=5)))
    names = sorted(names)
    rng.shuffle(names)
    asked, other = names[: VT_HOPS + 1], names[VT_HOPS + 1 :]
    value, other_value = _numbers(rng, 2, 5)
    planted = []
    for chain, start, first in ((asked, depth, value), (other, _other_depths(rng, 1)[0], other_value)):
        step = (1.0 - start) / (VT_HOPS + 1)
        planted += [(start + i * step, f"VAR {v} = {first if i == 0 else 'VAR ' + chain[i - 1]}.") for i, v in enumerate(chain)]
    question = f"Which variables hold the value {value}, directly or through other variables? Reply with the variable names."
    return _Facts(planted, question, tuple(asked), "variable", "all", tuple(other), LIST_NEW_TOKENS)


def _facts(form: str, depth: float | None, rng: random.Random) -> _Facts:
    """What one case plants and asks; the asked fact is planted first, at ``depth``."""
    if form == "passkey":
        key = _number(rng, 5)
        planted = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        return _Facts(planted, "What is the pass key? Reply with the number.", (str(key),))
    if form == "kv":
        names = rng.sample(NAMES, KV_FACTS)
        values = [_number(rng, 4) for _ in names]
        depths = [depth] + _other_depths(rng, len(names) - 1)
        fact = "Fact: the phone extension of {0} is {1}. Remember it. {1} is the phone extension of {0}."
        planted = [(d, fact.format(n, v)) for d, n, v in zip(depths, names, values)]
        return _Facts(planted, f"What is the phone extension of {names[0]}? Reply with the number.", (str(values[0]),))
    if form == "two-part":
        first, second = rng.sample(range(10, 100), 2)  # distinct, so the scoring can tell them apart
        half = "{} is the {} half of the pass key"
        planted = [
            (depth, f"The first half of the pass key is {first}. Remember it. {half.format(first, 'first')}."),
            (depth + SECOND_PART_AFTER, f"The second half of the pass key is {second}. Remember it. {half.format(second, 'second')}."),
        ]
        question = "What is the first half of the pass key, and what is the second half? Reply with the two numbers."
        return _Facts(planted, question, (str(first), str(second)))
    if form == "single-number":
        return _single("number", _numbers(rng, 1, 7)[0], depth, rng)
    if form == "single-word":
        return _single("word", rng.choice(WORDS), depth, rng, "word")
    if form == "single-uuid":
        return _single("code", str(uuid.UUID(int=rng.getrandbits(128), version=4)), depth, rng, "uuid")
    if form in ("multikey", "multiquery"):
        names, values = rng.sample(NAMES, MULTI), _numbers(rng, MULTI, 7)
        planted = [(d, _needle("number", n, v)) for d, n, v in zip([depth] + _other_depths(rng, MULTI - 1), names, values)]
        if form == "multikey":
            return _Facts(planted, f"What is the special number of {names[0]}? Reply with the number.", (values[0],))
        asked = ", ".join(names[:-1]) + f" and {names[-1]}"
        question = f"What are the special numbers of {asked}? Reply with the {MULTI} numbers."
        return _Facts(planted, question, tuple(values), match="all", max_new_tokens=LIST_NEW_TOKENS)
    if form == "multivalue":
        name, values = rng.choice(NAMES), _numbers(rng, MULTI, 7)
        fact = "Fact: one of the special numbers of {0} is {1}. Remember it. {1} is a special number of {0}."
        planted = [(d, fact.format(name, v)) for d, v in zip([depth] + _other_depths(rng, MULTI - 1), values)]
        question = f"What are all the special numbers of {name}? Reply with the {MULTI} numbers."
        return _Facts(planted, question, tuple(values), match="all", max_new_tokens=LIST_NEW_TOKENS)
    if form == "vt":
        return _vt(depth, rng)
    if form == "cwe":
        common = rng.sample(WORDS, CWE_COMMON)
        others = tuple(w for w in WORDS if w not in common)
        question = (f"In the list above, {CWE_COMMON} words appear much more often than all the others. "
                    f"Which {CWE_COMMON} words are they? Reply with the {CWE_COMMON} words.")
        return _Facts([], question, tuple(common), "word", "all", others, LIST_NEW_TOKENS)
    raise ValueError(f"unknown retrieval task {form!r}; tasks: {', '.join(FORMS + RULER_TASKS)}")


def task_names(tasks: str | tuple[str, ...]) -> tuple[str, ...]:
    """The tasks of a set name of :data:`TASK_SETS` (``default``, ``ruler``), of comma-separated task
    names (``single-number,multikey``), or of a tuple of task names, checked.

    Raises:
        ValueError: an unknown set or task, naming the valid ones.
    """
    if isinstance(tasks, str):
        if tasks in TASK_SETS:
            return TASK_SETS[tasks]
        if "," not in tasks and tasks not in FORMS + RULER_TASKS:
            raise ValueError(f"unknown retrieval task set {tasks!r}; sets: {', '.join(TASK_SETS)}, or task names")
        tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in FORMS + RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown retrieval tasks {unknown or tasks!r}; tasks: {', '.join(FORMS + RULER_TASKS)}")
    return tuple(tasks)


def case_depths(count: int, tasks: tuple[str, ...] = FORMS) -> list[tuple[str, float]]:
    """``(task, depth)`` of ``count`` cases: tasks in turn, each task visiting evenly spaced depths.

    With ``T`` tasks, cases ``Tr .. Tr + T - 1`` form round ``r``; within a round the tasks sit at
    different depths, so every task meets every depth over ``R = ceil(count / T)`` rounds.
    """
    rounds = -(-count // len(tasks))
    out = []
    for i in range(count):
        r, f = divmod(i, len(tasks))
        slot = (r + f) % rounds
        depth = FIRST_DEPTH + (LAST_DEPTH - FIRST_DEPTH) * slot / (rounds - 1) if rounds > 1 else 0.5
        out.append((tasks[f], round(depth, 4)))
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


def _lines_to_ids(tokenizer, tokens: int, next_line) -> list[int]:
    """``tokens`` ids of lines ``next_line()`` makes, as many as it takes."""
    lines, count = [], 0
    while count < tokens:
        lines.append(next_line())
        count += len(tokenizer.encode(lines[-1] + "\n", add_special_tokens=False))
    return tokenizer.encode("\n".join(lines) + "\n", add_special_tokens=False)[:tokens]


def haystack(tokenizer, tokens: int, rng: random.Random) -> list[int]:
    """``tokens`` ids of generated sentences, two or three to a line."""
    def line():
        return " ".join(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
            for _ in range(rng.choice((2, 3)))
        )

    return _lines_to_ids(tokenizer, tokens, line)


def word_lines(tokenizer, tokens: int, rng: random.Random, common: tuple[str, ...], others: tuple[str, ...]) -> list[int]:
    """``tokens`` ids of lines of comma-separated words: every ``common`` word once a line, with
    ``CWE_OTHERS`` of ``others`` taken in turn (reshuffled after each pass), in shuffled order."""
    queue: list[str] = []

    def line():
        words = list(common)
        for _ in range(CWE_OTHERS):
            if not queue:
                queue.extend(rng.sample(others, len(others)))
            words.append(queue.pop())
        rng.shuffle(words)
        return ", ".join(words)

    return _lines_to_ids(tokenizer, tokens, line)


def make_cases(tokenizer, context_tokens: int, count: int, seed: int, tasks: str | tuple[str, ...] = "default") -> list[Case]:
    """Generate ``count`` cases of about ``context_tokens`` context tokens each, deterministically from ``seed``.

    Args:
        tasks: a task set of :data:`TASK_SETS` (``default``: :data:`FORMS`; ``ruler``:
            :data:`RULER_TASKS`) or a tuple of task names; the tasks take turns.

    Raises:
        ValueError: an unknown task set or task.
    """
    cases = []
    for i, (form, depth) in enumerate(case_depths(count, task_names(tasks))):
        rng = random.Random(f"kvcompress-retrieval-{seed}-{i}")
        if form == "cwe":  # the word list is the whole context: no haystack, no depth
            depth = None
            facts = _facts(form, depth, rng)
            context = tokenizer.decode(word_lines(tokenizer, context_tokens, rng, facts.expected, facts.distractors))
        else:
            facts = _facts(form, depth, rng)
            need = context_tokens - sum(len(tokenizer.encode(s, add_special_tokens=False)) + 1 for _, s in facts.planted)
            context = _plant(tokenizer, haystack(tokenizer, need, rng), facts.planted)
        cases.append(Case(form, depth, context, facts.question, " ".join(facts.expected), tuple(facts.planted),
                          facts.kind, facts.match, facts.distractors, facts.max_new_tokens))
    return cases


def items(reply: str, kind: str) -> list[str]:
    """The distinct items of kind ``kind`` in ``reply``, in order of appearance (see the module docstring)."""
    return list(dict.fromkeys(_ITEMS[kind](reply)))


def score(reply: str, expected: str, kind: str = "number", match: str = "first", distractors: tuple[str, ...] = ()) -> bool:
    """Exact match on the reply's items of kind ``kind`` (``expected``: items separated by spaces).

    ``first``: the reply's first ``k`` distinct items are the ``k`` expected ones, in order.
    ``all``: every expected item is in the reply, and none of ``distractors`` is.
    """
    want, got = expected.split(), items(reply, kind)
    if match == "first":
        return got[: len(want)] == want
    return set(want) <= set(got) and not set(distractors) & set(got)


def recall(reply: str, expected: str, kind: str = "number") -> float:
    """Partial credit: the fraction of the expected items found among the reply's items."""
    want, got = expected.split(), set(items(reply, kind))
    return sum(w in got for w in want) / len(want)


def run_retrieval(method: BenchMethod, model, tokenizer, cases: list[Case], desc: str = "", prefill_chunk: int | None = None) -> dict:
    """Ask every case through ``method`` (one compressed context per question); score the replies.

    Returns:
        ``{"correct", "cases", "by_task": {task: [correct, total]}, "recall_by_task": {task: mean
        recall}, "results": [...]}`` where each result holds the case (without its context), the
        reply, whether it is correct and its recall.
    """
    results = []
    for case in tqdm(cases, desc=desc or f"retrieval {method.spec}", leave=False):
        reply = method.answer(model, tokenizer, case.context, case.question, case.max_new_tokens, prefill_chunk)
        record = {k: v for k, v in asdict(case).items() if k != "context"}
        results.append({
            **record,
            "context_tokens": len(tokenizer.encode(case.context)),
            "reply": reply,
            "correct": score(reply, case.expected, case.kind, case.match, case.distractors),
            "recall": recall(reply, case.expected, case.kind),
        })
    correct, total, found = Counter(), Counter(), Counter()
    for r in results:
        total[r["form"]] += 1
        correct[r["form"]] += r["correct"]
        found[r["form"]] += r["recall"]
    by_task = {f: [correct[f], total[f]] for f in total}  # in the order the tasks first appear
    return {
        "correct": sum(correct.values()),
        "cases": len(results),
        "by_task": by_task,
        "recall_by_task": {f: found[f] / total[f] for f in total},
        "results": results,
    }
