"""Run the benchmark: every method at every context length, on the same footing.

For each context length ``C`` and each method: speed and memory in a fresh process
(:mod:`kvcompress.bench.speed`, on the first ``C`` tokens of the first text), perplexity of each
text after ``C`` compressed tokens
(:mod:`kvcompress.bench.perplexity`), retrieval of facts planted in ``C`` tokens
(:mod:`kvcompress.bench.retrieval`) and, when asked, throughput: batched decode at the largest batch
whose cache fits a KV memory budget (by default what ``none``'s cache holds at batch
:data:`BUDGET_BATCH`), in a fresh process too. ``none`` is always measured and is the baseline of
every ratio.

Results are kept per (method, context, part) in a folder named after the conditions, each with the
:func:`fingerprint` of the code that measured it, and reused by later runs with the same conditions
unless ``force``; a part measured by other code is measured again unless ``reuse_stale``. Speed ratios
compare measurements of one run: when any method's speed at ``C`` is measured, so is the baseline's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kvcompress
from kvcompress.bench import report
from kvcompress.bench.methods import (
    ALL_PARTS,
    BASELINE,
    DEFAULT_PARTS,
    BenchMethod,
    part_kind,
    perplexity_parts,
    resolve,
)
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.retrieval import LIST_TASKS, make_cases, run_retrieval, task_names
from kvcompress.bench.speed import ROUND_STEPS, measure_interleaved, sequence_nbytes
from kvcompress.bench.texts import load_text, spread_offsets
from kvcompress.calibration import CalibrationError
from kvcompress.models import BUILTIN_MODELS, DEFAULT_MODEL
from kvcompress.registry import SpecError

PARTS = DEFAULT_PARTS  # what a run measures unless told (throughput: --parts throughput)
QUESTION_ROOM = 192  # positions a retrieval prompt needs beyond its context: template, question, answer
TIMED = ("speed", "throughput")  # the parts whose rows decode in turns, the baseline's with them
BUDGET_BATCH = 4  # the default KV memory budget of throughput: none's cache at this batch


class BenchError(ValueError):
    """A benchmark cannot run as asked; the message names the fix."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and under which conditions (see ``kvcompress bench --help``)."""

    methods: tuple[str, ...]
    contexts: tuple[int, ...]
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    threads: int = field(default_factory=torch.get_num_threads)
    texts: tuple[str, ...] = ("prose", "kjv")  # perplexity texts (built-in names or paths); speed reads the first
    ppl_tokens: int = 256
    ppl_windows: int = 4
    cases: int = 9
    tasks: str = "default"  # the retrieval task set, one of retrieval.TASK_SETS
    seed: int = 0
    decode_tokens: int = 32
    prefill_chunk: int | None = None  # feed contexts this many tokens at a time (kvcompress compresses between)
    memory_budget: int | None = None  # bytes of KV cache for throughput; None: none's at batch BUDGET_BATCH

    def folder_name(self, text_name: str) -> str:
        """Name of the results folder: every condition a measurement depends on, methods aside.

        ``text_name``: the texts' names joined by ``+`` (one text: its name).
        """
        model = model_folder_name(self.model)
        device = f"{self.device}-{self.threads}t" if self.device == "cpu" else self.device
        tasks = "" if self.tasks == "default" else f"-{self.tasks}"  # default: the names folders had before sets
        # Conditions added later are named only when set, so earlier results keep their folder.
        chunk = f"_chunk{self.prefill_chunk}" if self.prefill_chunk else ""
        budget = f"_budget{self.memory_budget}" if self.memory_budget else ""
        return (
            f"{model}_{self.dtype}_{device}_{text_name}_ppl{self.ppl_tokens}x{self.ppl_windows}"
            f"_ret{self.cases}{tasks}-seed{self.seed}_dec{self.decode_tokens}{chunk}{budget}"
        )


def model_folder_name(model: str) -> str:
    """A folder name unique to ``model``, read the way :func:`kvcompress.load_model` reads it.

    A built-in name stays as it is (``smollm2-135m``); a local folder is its name plus 8 hex of the
    sha256 of its absolute path (``ckpt-1a2b3c4d``), so ``m1/ckpt`` and ``m2/ckpt`` differ; a hub id
    keeps its owner (``orgA/llama`` -> ``orgA--llama``).
    """
    path = Path(model).expanduser()
    if model in BUILTIN_MODELS:
        name = model
    elif path.is_dir():
        path = path.resolve()
        name = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    else:
        name = model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", spec)


@functools.cache
def source_hash() -> str:
    """16 hex of a sha256 over every ``.py`` file of the installed kvcompress package (relative path and
    content, in sorted order, so the filesystem's listing order does not matter)."""
    root = Path(kvcompress.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())  # fixed length: no ambiguous boundaries
    return digest.hexdigest()[:16]


def fingerprint(method: BenchMethod) -> dict[str, str]:
    """What produced a measurement of ``method``, beyond the conditions the results folder is named after.

    The kvcompress source, torch, transformers, python (the built-in texts come from its standard
    library) and, for a kvpress row, kvpress. A stored part measured under another fingerprint is
    stale: measured again unless ``--reuse-stale``.
    """
    import transformers

    found = {
        "kvcompress_source": source_hash(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if method.source == "kvpress":
        found["kvpress"] = metadata.version("kvpress")
    found.update(getattr(method, "versions", dict)())  # a peer row: its backend's version
    return found


def _differences(stored: dict | None, current: dict[str, str]) -> str:
    """What differs from ``current`` in the fingerprint a part was measured under, e.g.
    ``"torch 2.12.0 (now 2.13.0)"``; ``""`` when nothing does."""
    if stored is None:
        return "fingerprint not recorded"
    return ", ".join(f"{key} {stored.get(key)} (now {value})" for key, value in current.items() if stored.get(key) != value)


@dataclass(frozen=True)
class StoredPart:
    """A measured part read back: its data, and what differed in the code that measured it (``""``: nothing)."""

    data: dict
    stale: str


class PartStore:
    """Measured parts on disk, ``parts/C<context>/<spec>.<part>.json``, each saved with the fingerprint of
    what measured it; pure bookkeeping.

    Args:
        folder: the results folder.
        fingerprints: this run's :func:`fingerprint` of each spec, saved with its parts and compared
            with the one a stored part was measured under.
    """

    def __init__(self, folder: Path, fingerprints: dict[str, dict[str, str]]):
        self.folder, self.fingerprints = folder, fingerprints

    def path(self, spec: str, context: int, part: str) -> Path:
        return self.folder / "parts" / f"C{context}" / f"{_slug(spec)}.{part}.json"

    def load(self, spec: str, context: int, part: str) -> StoredPart | None:
        """The stored part, or None when there is none (or the file holds another spec of the same slug).

        Raises:
            BenchError: the file is truncated or corrupt; the message names it.
        """
        path = self.path(spec, context, part)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            data = stored["data"]
        except (ValueError, KeyError, TypeError) as err:
            raise BenchError(
                f"stored result {path} is truncated or corrupt ({err}); delete it (the next run measures it "
                f"again) or rerun with --force"
            ) from None
        if stored.get("spec") != spec:
            return None
        return StoredPart(data, _differences(stored.get("fingerprint"), self.fingerprints[spec]))

    def save(self, spec: str, context: int, part: str, data: dict) -> None:
        """Write one part atomically (a temporary file, then a rename): an interrupted run leaves no half file."""
        path = self.path(spec, context, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"spec": spec, "context": context, "part": part, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "fingerprint": self.fingerprints[spec], "data": data}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)


def plan(
    store: PartStore,
    specs: list[str],
    contexts: tuple[int, ...],
    force: bool,
    parts: dict[str, tuple[str, ...]] | None = None,
    reuse_stale: bool = False,
    shown: tuple[str, ...] = PARTS,
) -> dict[tuple[str, int], list[str]]:
    """Which parts each (spec, context) must measure: missing or stale ones, or all with ``force``.

    ``shown`` names every part a row can show (one perplexity part per text, see
    :func:`~kvcompress.bench.methods.perplexity_parts`); ``parts`` limits a spec to some of them (a
    question-aware row measures retrieval only); by default every spec measures all. A stale part (measured under another :func:`fingerprint`) is
    measured again unless ``reuse_stale``. When any speed at ``C`` is measured, every row's speed at
    ``C`` is (the baseline's too), so that speed and memory ratios never compare two runs; the same
    for throughput.
    Every stored part that will be shown is read here, so a corrupt one fails before anything runs.

    Raises:
        BenchError: a stored part is truncated or corrupt.
    """
    parts = parts or {}
    todo = {}
    for context in contexts:
        for spec in specs:
            wanted = parts.get(spec, shown)
            todo[spec, context] = []
            for part in shown:
                if force and part in wanted:
                    todo[spec, context].append(part)
                    continue
                stored = store.load(spec, context, part)
                if part in wanted and (stored is None or (stored.stale and not reuse_stale)):
                    todo[spec, context].append(part)
        for timed in TIMED:  # timings at C are measured together
            if any(timed in todo[s, context] for s in specs):
                for spec in specs:
                    if timed in parts.get(spec, shown) and timed not in todo[spec, context]:
                        todo[spec, context].insert(0, timed)
    return todo


def versions(methods: list[BenchMethod]) -> dict:
    """The versions stated with every figure: kvcompress's and every method's :func:`fingerprint`."""
    found = {"kvcompress": kvcompress.__version__}
    for method in methods:
        found.update(fingerprint(method))
    return found


def device_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def conditions_of(config: BenchConfig, text_names: list[str], found_versions: dict) -> dict:
    """The conditions stated with every figure (copied into every row)."""
    return {
        "model": config.model,
        "dtype": config.dtype,
        "device": device_label(config.device),
        "threads": config.threads,
        "batch": 1,
        "text": ",".join(text_names),
        "ppl_tokens": config.ppl_tokens,
        "ppl_windows": config.ppl_windows,
        "ppl_scoring": "token by token at true positions, after the compressed context",
        "retrieval_cases": config.cases,
        "retrieval_tasks": config.tasks,
        "retrieval_seed": config.seed,
        "retrieval_haystack": "generated plain sentences",
        "decode_tokens": config.decode_tokens,
        "decode_rounds_of": ROUND_STEPS,
        "prefill_chunk": config.prefill_chunk,
        "memory_budget": config.memory_budget,
        "decode": f"greedy, one token per step, after a warm-up; prompt: the first C tokens of the text '{text_names[0]}'",
        "peak_memory": "CPU: peak RSS of a process per row from after its warm-up, weights included; GPU: "
        "max_memory_allocated; prefill added: the same peak read right after the prefill, less the memory held just "
        "before it",
        **found_versions,
    }


@dataclass
class BenchResult:
    folder: Path
    rows: list[dict]
    table: str
    retrieval_table: str
    throughput_table: str
    header: str
    paths: dict[str, Path]


class _Inputs:
    """The model, the texts' ids and the retrieval cases, loaded only when something must be measured."""

    def __init__(self, config: BenchConfig, texts: list):
        self.config, self.texts = config, {text.name: text for text in texts}
        self._loaded = None
        self._ids = {}
        self._cases = {}
        self._budgets = {}

    def model(self):
        if self._loaded is None:
            torch.set_num_threads(self.config.threads)
            self._loaded = kvcompress.load_model(
                self.config.model, dtype=getattr(torch, self.config.dtype), device=self.config.device
            )
        return self._loaded

    def ids(self, name: str | None = None) -> torch.Tensor:
        """``(L,)`` token ids of the text ``name`` (default: the first text)."""
        name = name or next(iter(self.texts))
        if name not in self._ids:
            _, tokenizer = self.model()
            self._ids[name] = torch.tensor(tokenizer(self.texts[name].body, add_special_tokens=False)["input_ids"])
        return self._ids[name]

    def budget(self, context: int) -> int:
        """The KV memory budget of throughput at ``context``: ``--memory-budget``, or the most bytes
        ``none``'s cache holds at batch :data:`BUDGET_BATCH` (prefill, then the decode steps)."""
        if self.config.memory_budget:
            return self.config.memory_budget
        if context not in self._budgets:
            per_sequence, fixed = sequence_nbytes(
                resolve(BASELINE), self.model()[0], self.ids()[:context][None], self.config.decode_tokens, self.config.prefill_chunk
            )
            self._budgets[context] = BUDGET_BATCH * per_sequence + fixed
        return self._budgets[context]

    def cases(self, context: int):
        if context not in self._cases:
            _, tokenizer = self.model()
            self._cases[context] = make_cases(tokenizer, context, self.config.cases, self.config.seed, self.config.tasks)
        return self._cases[context]

    def check(self, methods: list[BenchMethod]) -> None:
        """Before anything is measured: the lengths fit (:meth:`check_lengths`) and the model can take
        every method, whose cache is built once (a kivi group that does not divide the head dim, a
        missing calibration file).

        Raises:
            BenchError: naming the fix.
        """
        self.check_lengths()
        model, _ = self.model()
        for method in methods:
            try:
                method.new_cache(model)
            except (SpecError, CalibrationError) as err:
                raise BenchError(str(err)) from None

    def check_lengths(self) -> None:
        """Every context fits the model's positions, and every text holds a perplexity window of each.

        Raises:
            BenchError: naming the longest context that would fit.
        """
        config = self.config
        limit = self.model()[0].config.get_text_config().max_position_embeddings
        room = max(config.ppl_tokens + 1, QUESTION_ROOM)
        for context in config.contexts:
            if context + room > limit:
                raise BenchError(
                    f"--contexts {context} needs {context + room} positions but {config.model} has {limit}; "
                    f"use contexts up to {limit - room}"
                )
            for name in self.texts:
                tokens = len(self.ids(name))
                if context + config.ppl_tokens + 1 > tokens:
                    raise BenchError(
                        f"the text {name!r} has {tokens} tokens, too few for --contexts {context} plus "
                        f"{config.ppl_tokens} scored tokens; pass a longer --text"
                    )


def run(
    config: BenchConfig, out: Path, force: bool = False, only: tuple[str, ...] = PARTS, reuse_stale: bool = False
) -> BenchResult:
    """Measure what is missing or stale, reuse the rest, and write the table, ``results.json`` and ``results.csv``.

    ``only`` limits what is measured (and, with ``force``, remeasured) to some parts (by default all
    but throughput); the tables show every part stored. ``reuse_stale`` reuses parts measured by other code (see
    :func:`fingerprint`) instead of measuring them again. A row showing a stale part (reused, or
    outside ``only``) is marked as such in the table and in its ``stale`` column.

    Raises:
        BenchError: bad contexts or text, a results folder that cannot be written, a corrupt stored
            part, a context longer than the model accepts, or a method the model cannot take
            (all raised before anything is measured).
        SpecError, KVPressUnavailable: a method that cannot run (raised before the model loads).
    """
    specs = list(dict.fromkeys([BASELINE, *config.methods]))
    methods = {spec: resolve(spec) for spec in specs}
    if not config.contexts or any(c < 1 for c in config.contexts):
        raise BenchError("--contexts needs positive token counts, e.g. --contexts 1024,4096")
    texts = [load_text(source) for source in config.texts]
    names = [text.name for text in texts]
    if not names or len(set(names)) < len(names):
        raise BenchError(f"--texts {','.join(config.texts)!r} must name each text once, e.g. --texts prose,kjv")
    chunked = [spec for spec, m in methods.items() if config.prefill_chunk and m.source == "kvpress"]
    if chunked:
        raise BenchError(
            f"--prefill-chunk: kvpress compresses in one prefill forward, so {', '.join(chunked)} cannot be chunked; "
            "run kvpress rows without --prefill-chunk"
        )
    folder = out / config.folder_name("+".join(names))
    _check_writable(folder)
    store = PartStore(folder, {spec: fingerprint(m) for spec, m in methods.items()})
    conditions = conditions_of(config, names, versions(list(methods.values())))
    shown = tuple(p for kind in ALL_PARTS for p in (perplexity_parts(names) if kind == "perplexity" else (kind,)))
    wanted = {spec: tuple(p for p in shown if part_kind(p) in m.parts and part_kind(p) in only) for spec, m in methods.items()}
    todo = plan(store, specs, config.contexts, force, wanted, reuse_stale, shown)
    inputs = _Inputs(config, texts)
    total = sum(len(parts) for parts in todo.values())
    if total:
        inputs.check([methods[spec] for spec in dict.fromkeys(spec for (spec, _), parts in todo.items() if parts)])
    with tqdm(total=total, desc="bench", unit="part", file=sys.stderr) as bar:
        for context in config.contexts:  # timings first, every row's decode steps in turns (see measure_interleaved)
            for part in TIMED:
                timed = [spec for spec in specs if part in todo[spec, context]]
                if timed:
                    bar.set_postfix_str(f"{part} of {len(timed)} rows in turns, C={context}")
                    requests = [_speed_request(part, methods[spec], context, config, inputs) for spec in timed]
                    for spec, data in zip(timed, measure_interleaved(requests)):
                        store.save(spec, context, part, data)
                    bar.update(len(timed))
        for (spec, context), parts in todo.items():
            for part in parts:
                if part in TIMED:
                    continue
                bar.set_postfix_str(f"{spec} C={context} {part}")
                data = _measure(part, methods[spec], context, config, inputs)
                store.save(spec, context, part, data)
                bar.update()
    results = []
    for context in config.contexts:
        for spec in specs:
            stored = {p: store.load(spec, context, p) for p in shown}
            stale = "; ".join(dict.fromkeys(s.stale for s in stored.values() if s is not None and s.stale))
            parts = {p: s.data if s is not None else None for p, s in stored.items()}
            results.append({"spec": spec, "source": methods[spec].source, "context": context, "stale": stale, **parts})
    rows = report.build_rows(results, conditions)
    table = report.format_table(rows)
    retrieval_table = report.format_retrieval(rows, task_names(config.tasks), LIST_TASKS)
    throughput_table = report.format_throughput(rows)
    header = describe(conditions)
    text = "\n\n".join(t for t in [header, table, retrieval_table, throughput_table] if t)
    paths = report.write_outputs(folder, rows, results, conditions, text)
    return BenchResult(folder, rows, table, retrieval_table, throughput_table, header, paths)


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, or raise :class:`BenchError` saying so."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise BenchError(
            f"cannot write the results into {folder} ({err.strerror or err}); pass --out a folder you can write to"
        ) from None


def _speed_request(part: str, method: BenchMethod, context: int, config: BenchConfig, inputs: _Inputs) -> dict:
    """What a measuring process of :mod:`kvcompress.bench.speed` needs for one row's speed or throughput."""
    request = {
        "spec": method.spec,
        "part": part,
        "model": config.model,
        "dtype": config.dtype,
        "device": config.device,
        "threads": config.threads,
        "ids": inputs.ids()[:context].tolist(),
        "decode_tokens": config.decode_tokens,
        "prefill_chunk": config.prefill_chunk,
    }
    if part == "throughput":
        request["budget"] = inputs.budget(context)
    return request


def _measure(part: str, method: BenchMethod, context: int, config: BenchConfig, inputs: _Inputs) -> dict:
    label = f"{part} {method.spec} C={context}"
    model, tokenizer = inputs.model()
    if part_kind(part) == "perplexity":
        ids = inputs.ids(part.partition("[")[2].rstrip("]") or None)  # perplexity[kjv] -> kjv; perplexity: the only text
        offsets = spread_offsets(len(ids), context + config.ppl_tokens + 1, config.ppl_windows)
        return perplexity(
            method, model, ids, context, config.ppl_tokens, offsets, desc=label, chunk=config.prefill_chunk,
            tokenizer=tokenizer,
        )
    return run_retrieval(method, model, tokenizer, inputs.cases(context), desc=label, prefill_chunk=config.prefill_chunk)


def describe(conditions: dict) -> str:
    """One paragraph stating the conditions of every figure in the table."""
    c = conditions
    speed_turns = _turns(
        c, "decode ms: the mean step; × none: the median over rounds of the row's time over none's in the same round"
    )
    throughput_turns = _turns(c, "tok/s × none: ratio to none's tokens/s in the same rounds")
    return (
        f"model {c['model']}, {c['dtype']}, {c['device']}, threads {c['threads']}, batch {c['batch']}; "
        f"torch {c['torch']}, transformers {c['transformers']}, kvcompress {c['kvcompress']} (source "
        f"{c['kvcompress_source']}), python {c['python']}\n"
        f"perplexity: text {', '.join(repr(t) for t in c['text'].split(','))}, {c['ppl_tokens']} tokens scored token "
        f"by token after the C compressed tokens, at {c['ppl_windows']} windows spread over each text\n"
        f"KV bytes/token: the cache's bytes after the speed part's prefill, or, in a row without speed, after "
        f"perplexity's contexts (mean over windows and texts), over C\n"
        f"retrieval: {_retrieval_conditions(c)}\n"
        f"speed: prefill of the first C tokens of the text {c['text'].split(',')[0]!r}{_chunked(c)}, then {c['decode_tokens']} greedy decode "
        f"steps, after a warm-up{speed_turns}; {'every other ' if speed_turns else ''}× none: ratio to none measured in the same run\npeak memory: {c['peak_memory']}\n"
        f"throughput (when measured): the largest batch whose KV cache fits "
        f"{_budget(c)}, bytes per sequence measured on the context and its decode steps; the context repeated "
        f"at that batch, {c['decode_tokens']} greedy steps timed"
        f"{throughput_turns or '; × none: the ratio to none at its batch'}"
    )


def _turns(c: dict, ratios: str) -> str:
    """How the rows took their decode steps in turns, and what ``ratios`` says of the figures; empty when not in turns."""
    if not c.get("decode_rounds_of"):
        return ""
    return f", every row's process taking {c['decode_rounds_of']} steps in turn ({ratios})"


def _chunked(c: dict) -> str:
    return f", fed {c['prefill_chunk']} tokens at a time (compressing between chunks)" if c.get("prefill_chunk") else ""


def _budget(c: dict) -> str:
    if c.get("memory_budget"):
        return f"--memory-budget {c['memory_budget']:,} bytes"
    return f"the budget of none's cache at batch {BUDGET_BATCH} (the bytes it holds at C plus the decode steps)"


def _retrieval_conditions(c: dict) -> str:
    """The retrieval line of :func:`describe`: the task set and how replies are scored."""
    tasks = c["retrieval_tasks"]
    which = f"tasks {', '.join(task_names(tasks))}" if tasks == "default" else f"task set '{tasks}': {', '.join(task_names(tasks))}"
    cases = f"{c['retrieval_cases']} cases ({which}; depths 0.1-0.9), seed {c['retrieval_seed']}, haystack of {c['retrieval_haystack']}"
    if tasks == "default":
        return f"{cases}, exact match on numbers"
    return (
        f"{cases}; exact match on the reply's numbers, words, UUIDs or variable names; a list answer "
        f"({', '.join(LIST_TASKS)}) needs every item and no distractor, its recall (in parentheses) is the fraction found"
    )
