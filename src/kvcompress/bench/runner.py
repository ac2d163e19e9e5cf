"""Run the benchmark: every method at every context length, on the same footing.

For each context length ``C`` and each method: speed and memory in a fresh process
(:mod:`kvcompress.bench.speed`), perplexity of the text after ``C`` compressed tokens
(:mod:`kvcompress.bench.perplexity`), and retrieval of facts planted in ``C`` tokens
(:mod:`kvcompress.bench.retrieval`). ``none`` is always measured and is the baseline of every
ratio.

Results are kept per (method, context, part) in a folder named after the conditions, and reused
by later runs with the same conditions unless ``force``. Speed ratios compare measurements of one
run: when any method's speed at ``C`` is measured, so is the baseline's.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kvcompress
from kvcompress.bench import report
from kvcompress.bench.methods import ALL_PARTS, BASELINE, BenchMethod, resolve
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.retrieval import FORMS, make_cases, run_retrieval
from kvcompress.bench.speed import measure_in_subprocess
from kvcompress.bench.texts import load_text, spread_offsets
from kvcompress.models import BUILTIN_MODELS, DEFAULT_MODEL

PARTS = ALL_PARTS
QUESTION_ROOM = 160  # positions a retrieval prompt needs beyond its context: template, question, answer


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
    text: str = "prose"
    ppl_tokens: int = 64
    ppl_windows: int = 3
    cases: int = 9
    seed: int = 0
    decode_tokens: int = 32

    def folder_name(self, text_name: str) -> str:
        """Name of the results folder: every condition a measurement depends on, methods aside."""
        model = model_folder_name(self.model)
        device = f"{self.device}-{self.threads}t" if self.device == "cpu" else self.device
        return (
            f"{model}_{self.dtype}_{device}_{text_name}_ppl{self.ppl_tokens}x{self.ppl_windows}"
            f"_ret{self.cases}-seed{self.seed}_dec{self.decode_tokens}"
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


class PartStore:
    """Measured parts on disk: ``parts/C<context>/<spec>.<part>.json``; pure bookkeeping."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, spec: str, context: int, part: str) -> Path:
        return self.folder / "parts" / f"C{context}" / f"{_slug(spec)}.{part}.json"

    def load(self, spec: str, context: int, part: str) -> dict | None:
        path = self.path(spec, context, part)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored["data"] if stored.get("spec") == spec else None

    def save(self, spec: str, context: int, part: str, data: dict, versions: dict) -> None:
        path = self.path(spec, context, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"spec": spec, "context": context, "part": part, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "versions": versions, "data": data}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)


def plan(
    store: PartStore, specs: list[str], contexts: tuple[int, ...], force: bool, parts: dict[str, tuple[str, ...]] | None = None
) -> dict[tuple[str, int], list[str]]:
    """Which parts each (spec, context) must measure: missing ones, or all with ``force``.

    ``parts`` limits a spec to some parts (a question-aware row measures retrieval only); by
    default every spec measures all. The baseline's speed at ``C`` is remeasured whenever another
    method's speed at ``C`` is, so that speed and memory ratios never compare two runs.
    """
    parts = parts or {}
    todo = {}
    for context in contexts:
        for spec in specs:
            wanted = parts.get(spec, PARTS)
            todo[spec, context] = [p for p in PARTS if p in wanted and (force or store.load(spec, context, p) is None)]
        if any("speed" in todo[s, context] for s in specs if s != BASELINE) and "speed" not in todo[BASELINE, context]:
            todo[BASELINE, context].insert(0, "speed")
    return todo


def versions(methods: list[BenchMethod]) -> dict:
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvcompress": kvcompress.__version__,
    }
    if any(m.source == "kvpress" for m in methods):
        from importlib.metadata import version

        found["kvpress"] = version("kvpress")
    return found


def device_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def conditions_of(config: BenchConfig, text_name: str, found_versions: dict) -> dict:
    """The conditions stated with every figure (copied into every row)."""
    return {
        "model": config.model,
        "dtype": config.dtype,
        "device": device_label(config.device),
        "threads": config.threads,
        "batch": 1,
        "text": text_name,
        "ppl_tokens": config.ppl_tokens,
        "ppl_windows": config.ppl_windows,
        "ppl_scoring": "token by token at true positions, after the compressed context",
        "retrieval_cases": config.cases,
        "retrieval_seed": config.seed,
        "retrieval_haystack": "generated plain sentences",
        "decode_tokens": config.decode_tokens,
        "decode": "greedy, one token per step, after a warm-up; prompt: the first C tokens of the text",
        "peak_memory": "CPU: peak RSS of a fresh process per row, weights included; GPU: max_memory_allocated",
        **found_versions,
    }


@dataclass
class BenchResult:
    folder: Path
    rows: list[dict]
    table: str
    retrieval_table: str
    header: str
    paths: dict[str, Path]


class _Inputs:
    """The model, the text's ids and the retrieval cases, loaded only when something must be measured."""

    def __init__(self, config: BenchConfig, text):
        self.config, self.text = config, text
        self._loaded = None
        self._ids = None
        self._cases = {}

    def model(self):
        if self._loaded is None:
            torch.set_num_threads(self.config.threads)
            self._loaded = kvcompress.load_model(
                self.config.model, dtype=getattr(torch, self.config.dtype), device=self.config.device
            )
        return self._loaded

    def ids(self) -> torch.Tensor:
        if self._ids is None:
            _, tokenizer = self.model()
            self._ids = torch.tensor(tokenizer(self.text.body, add_special_tokens=False)["input_ids"])  # (L,)
        return self._ids

    def cases(self, context: int):
        if context not in self._cases:
            _, tokenizer = self.model()
            self._cases[context] = make_cases(tokenizer, context, self.config.cases, self.config.seed)
        return self._cases[context]

    def check_lengths(self) -> None:
        """Every context fits the model's positions, and the text holds a perplexity window of each.

        Raises:
            BenchError: naming the longest context that would fit.
        """
        config = self.config
        limit = self.model()[0].config.get_text_config().max_position_embeddings
        room = max(config.ppl_tokens + 1, QUESTION_ROOM)
        tokens = len(self.ids())
        for context in config.contexts:
            if context + room > limit:
                raise BenchError(
                    f"--contexts {context} needs {context + room} positions but {config.model} has {limit}; "
                    f"use contexts up to {limit - room}"
                )
            if context + config.ppl_tokens + 1 > tokens:
                raise BenchError(
                    f"the text {self.text.name!r} has {tokens} tokens, too few for --contexts {context} plus "
                    f"{config.ppl_tokens} scored tokens; pass a longer --text"
                )


def run(config: BenchConfig, out: Path, force: bool = False, only: tuple[str, ...] = PARTS) -> BenchResult:
    """Measure what is missing, reuse the rest, and write the table, ``results.json`` and ``results.csv``.

    ``only`` limits what is measured (and, with ``force``, remeasured) to some parts; the table
    shows every part stored.

    Raises:
        BenchError: bad contexts or text, or a context longer than the model accepts.
        SpecError, KVPressUnavailable: a method that cannot run (raised before anything is measured).
    """
    specs = list(dict.fromkeys([BASELINE, *config.methods]))
    methods = {spec: resolve(spec) for spec in specs}
    if not config.contexts or any(c < 1 for c in config.contexts):
        raise BenchError("--contexts needs positive token counts, e.g. --contexts 1024,4096")
    text = load_text(config.text)
    folder = out / config.folder_name(text.name)
    store = PartStore(folder)
    found_versions = versions(list(methods.values()))
    conditions = conditions_of(config, text.name, found_versions)
    wanted = {spec: tuple(p for p in m.parts if p in only) for spec, m in methods.items()}
    todo = plan(store, specs, config.contexts, force, wanted)
    inputs = _Inputs(config, text)
    total = sum(len(parts) for parts in todo.values())
    if total:
        inputs.check_lengths()  # before anything runs
    with tqdm(total=total, desc="bench", unit="part", file=sys.stderr) as bar:
        for (spec, context), parts in todo.items():
            for part in parts:
                bar.set_postfix_str(f"{spec} C={context} {part}")
                data = _measure(part, methods[spec], context, config, inputs)
                store.save(spec, context, part, data, found_versions)
                bar.update()
    results = []
    for context in config.contexts:
        for spec in specs:
            parts = {p: store.load(spec, context, p) for p in PARTS}
            results.append({"spec": spec, "source": methods[spec].source, "context": context, **parts})
    rows = report.build_rows(results, conditions)
    table = report.format_table(rows)
    retrieval_table = report.format_retrieval(rows, FORMS)
    header = describe(conditions)
    paths = report.write_outputs(folder, rows, results, conditions, "\n\n".join([header, table, retrieval_table]))
    return BenchResult(folder, rows, table, retrieval_table, header, paths)


def _measure(part: str, method: BenchMethod, context: int, config: BenchConfig, inputs: _Inputs) -> dict:
    label = f"{part} {method.spec} C={context}"
    if part == "speed":
        request = {
            "spec": method.spec,
            "model": config.model,
            "dtype": config.dtype,
            "device": config.device,
            "threads": config.threads,
            "ids": inputs.ids()[:context].tolist(),
            "decode_tokens": config.decode_tokens,
        }
        return measure_in_subprocess(request)
    model, tokenizer = inputs.model()
    if part == "perplexity":
        ids = inputs.ids()
        offsets = spread_offsets(len(ids), context + config.ppl_tokens + 1, config.ppl_windows)
        return perplexity(method, model, ids, context, config.ppl_tokens, offsets, desc=label)
    return run_retrieval(method, model, tokenizer, inputs.cases(context), desc=label)


def describe(conditions: dict) -> str:
    """One paragraph stating the conditions of every figure in the table."""
    c = conditions
    return (
        f"model {c['model']}, {c['dtype']}, {c['device']}, threads {c['threads']}, batch {c['batch']}; "
        f"torch {c['torch']}, transformers {c['transformers']}, kvcompress {c['kvcompress']}, python {c['python']}\n"
        f"perplexity: text '{c['text']}', {c['ppl_tokens']} tokens scored token by token after the C compressed "
        f"tokens, at {c['ppl_windows']} windows spread over the text\n"
        f"retrieval: {c['retrieval_cases']} cases (forms {', '.join(FORMS)}; depths 0.1-0.9), seed "
        f"{c['retrieval_seed']}, haystack of {c['retrieval_haystack']}, exact match on numbers\n"
        f"speed: prefill of the first C tokens of the text, then {c['decode_tokens']} greedy decode steps, after a "
        f"warm-up; × none: ratio to none measured in the same run\npeak memory: {c['peak_memory']}"
    )
