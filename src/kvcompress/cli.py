"""The ``kvcompress`` command: ``info``, ``demo``, ``generate``, ``compress``, ``ask``, ``bench``, ``calibrate`` and ``serve``.

Bad input ends with one line on stderr that names the fix, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

USAGE_ERROR = 2


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024


def _load(name: str | None):
    from kvcompress.models import ModelNotAvailableError, load_model

    try:
        return load_model(name)
    except ModelNotAvailableError as err:
        raise UsageError(str(err)) from None


def _read_utf8(name: str, what: str, missing_fix: str) -> str:
    """The text of file ``name``, or a UsageError naming ``what`` it is and how to fix it."""
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} does not exist; {missing_fix}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {str(path)!r} is not UTF-8 text; convert it with iconv -t UTF-8") from None


def _check_writable(path: Path, what: str) -> None:
    """Raise a UsageError unless a file can be written at ``path``: creates its folder, writes and
    deletes a temporary file beside it (so a bad path fails before minutes of work, not after)."""
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a folder; pass a file path such as {str(path / 'calibration.safetensors')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.") as probe:
            probe.write(b"kvcompress")
    except OSError as err:
        raise UsageError(f"cannot write {what} {str(path)!r} ({err.strerror or err}); pass a path in a writable folder") from None


def _check_out(args) -> Path:
    """``compress --out`` as a path to write: refuse what writing would replace that the user did not ask
    to replace (the context file, anything but a regular file such as a FIFO or a device, or an existing
    file without ``--force``), then check the folder is writable (see :func:`_check_writable`)."""
    out = Path(args.out)
    context = args.context_file
    if context is not None and out.exists() and Path(context).exists() and os.path.samefile(out, context):
        raise UsageError(f"--out {args.out!r} is the context file; pass another path for the compressed cache")
    if os.path.lexists(out) and not out.is_file() and not out.is_dir():  # a folder: _check_writable says so
        raise UsageError(f"--out {args.out!r} exists and is not a regular file (a FIFO, a device, a broken link); pass a new path")
    if out.is_file() and not args.force:
        raise UsageError(f"--out {args.out!r} exists; pass --force to overwrite it, or a new path")
    _check_writable(out, "--out")
    return out


def _read_context(args) -> str:
    if args.context is not None:
        text = args.context
    else:
        text = _read_utf8(args.context_file, "context file", "pass an existing text file")
    if not text.strip():
        raise UsageError("the context is empty; pass some text with --context or --context-file")
    return text


def cmd_info(args) -> None:
    from kvcompress.models import model_summary

    model, _ = _load(args.model)
    for key, value in model_summary(model).items():
        print(f"{key:>20}: {value}")


def _check_spec(spec: str) -> None:
    """Refuse a bad method spec before the model loads, so a typo fails fast."""
    from kvcompress.registry import SpecError, parse_spec

    try:
        parse_spec(spec)
    except SpecError as err:
        raise UsageError(str(err)) from None


def _check_generation_flags(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")


def _check_chunk(args) -> None:
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UsageError("--prefill-chunk must be at least 1 (or omitted: the context in one forward)")


def _memory_line(cache, model) -> str:
    """One line: bytes held, tokens stored of those seen, bytes per token seen, compression factor."""
    from kvcompress.models import model_summary

    seen, stored, nbytes = cache.get_seq_length(), cache.stored_tokens, cache.nbytes
    per_token = model_summary(model)["kv_bytes_per_token"]
    return (
        f"[kvcompress] {cache.spec}: KV cache holds {_human(nbytes)}: {stored:,} of {seen:,} tokens stored "
        f"({nbytes / seen:,.0f} B per token seen; uncompressed {per_token:,} B/token; "
        f"{per_token * seen / nbytes:.1f}x smaller)"
    )


def _print_answers(questions: list[str | None], answers: list[str]) -> None:
    """One question: its answer alone (as ``generate`` prints it); several: each under its question."""
    if len(answers) == 1:
        print(answers[0])
        return
    for question, text in zip(questions, answers):
        print(f"Q: {question}\nA: {text}\n")


def cmd_generate(args) -> None:
    from kvcompress.cache import make_cache
    from kvcompress.calibration import CalibrationError
    from kvcompress.generation import ContextTooLongError, answer
    from kvcompress.registry import SpecError

    _check_spec(args.method)
    _check_generation_flags(args)
    _check_chunk(args)
    context = _read_context(args)
    model, tokenizer = _load(args.model)
    try:
        cache = make_cache(args.method, model)
        text = answer(model, tokenizer, context, args.question, cache, args.max_new_tokens, prefill_chunk=args.prefill_chunk)[0]
    except (SpecError, CalibrationError, ContextTooLongError) as err:  # what make_cache and answer raise for bad input
        raise UsageError(str(err)) from None
    print(text)
    print(_memory_line(cache, model), file=sys.stderr)


def cmd_compress(args) -> None:
    from kvcompress.calibration import CalibrationError
    from kvcompress.generation import ContextTooLongError, compress
    from kvcompress.registry import SpecError

    _check_spec(args.method)
    _check_chunk(args)
    context = _read_context(args)
    out = _check_out(args)
    model, tokenizer = _load(args.model)
    try:
        cache = compress(model, tokenizer, context, args.method, prefill_chunk=args.prefill_chunk)
    except (SpecError, CalibrationError, ContextTooLongError) as err:
        raise UsageError(str(err)) from None
    _check_out(args)  # again: something may have appeared at --out while the context was compressed
    cache.save(out, tokenizer)
    print(_memory_line(cache, model), file=sys.stderr)
    print(f"[kvcompress] saved to {out} ({_human(out.stat().st_size)} on disk)", file=sys.stderr)


def cmd_ask(args) -> None:
    from kvcompress.cache import load_cache
    from kvcompress.persist import CacheFileError, read_header
    from kvcompress.generation import ContextTooLongError, ask

    _check_generation_flags(args)
    try:
        header = read_header(args.cache)
        model, tokenizer = _load(args.model or header.get("model") or None)
        cache = load_cache(args.cache, model, tokenizer)
    except CacheFileError as err:
        raise UsageError(str(err)) from None
    questions = args.question or [None]
    try:
        answers = ask(model, tokenizer, cache, questions, args.max_new_tokens)
    except (ContextTooLongError, ValueError) as err:
        raise UsageError(str(err)) from None
    _print_answers(questions, answers)
    print(_memory_line(cache, model), file=sys.stderr)


def cmd_demo(args) -> None:
    from kvcompress.calibration import CalibrationError
    from kvcompress.demo import DEFAULT_METHODS, FACT, QUESTION, format_rows, planted_context, run_demo
    from kvcompress.registry import SpecError

    methods = list(DEFAULT_METHODS) if args.methods is None else [m.strip() for m in args.methods.split(";") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty; pass specs separated by ';', e.g. 'none;kivi:bits=4'")
    for spec in methods:
        _check_spec(spec)
    if not 64 <= args.tokens <= 7000:
        raise UsageError("--tokens must be between 64 and 7000 (the default model reads 8,192 positions)")
    if not 0 <= args.depth <= 1:
        raise UsageError("--depth must be between 0 (the start of the text) and 1 (its end)")
    model, tokenizer = _load(args.model)
    _, text_name = planted_context(tokenizer, args.tokens, args.depth)
    try:
        rows = run_demo(model, tokenizer, methods, args.tokens, args.depth)
    except (SpecError, CalibrationError) as err:
        raise UsageError(str(err)) from None
    print(f"A fact planted at {args.depth:.0%} of {args.tokens:,} tokens of {text_name}: \"{FACT}\"")
    print(f"Question, asked after the context was compressed: \"{QUESTION}\"\n")
    print(format_rows(rows))


def cmd_bench(args) -> None:
    from kvcompress.bench.cli import run_from_args

    run_from_args(args, UsageError)


def cmd_calibrate(args) -> None:
    from kvcompress.calibration import MIN_TOKENS, CalibrationError, calibrate, default_path, retrieval_heads

    if args.tokens < MIN_TOKENS:
        raise UsageError(f"--tokens must be at least {MIN_TOKENS}")
    text = None
    if args.text is not None:
        text = _read_utf8(args.text, "--text", "pass a UTF-8 text file, or omit it for the default text")
    if args.out:
        _check_writable(Path(args.out), "--out")
    model, tokenizer = _load(args.model)
    out = Path(args.out) if args.out else default_path(model)
    try:
        calibration = calibrate(model, tokenizer, text, tokens=args.tokens, text_name=Path(args.text).name if args.text else None)
    except CalibrationError as err:
        raise UsageError(str(err)) from None
    if args.retrieval_heads:
        calibration.retrieval = retrieval_heads(model, tokenizer)
    calibration.save(out)
    also = " and the retrieval heads" if args.retrieval_heads else ""
    print(f"[kvcompress] calibrated on {calibration.tokens} tokens of {calibration.text}{also} -> {out}", file=sys.stderr)


def cmd_serve(args) -> None:
    from kvcompress.registry import SpecError, parse_spec

    try:  # check the spec before the model loads, so a typo fails fast
        parse_spec(args.method)
    except SpecError as err:
        raise UsageError(str(err)) from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}; pass a free TCP port such as 8000")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("kvcompress serve needs fastapi and uvicorn: pip install 'kvcompress[serve]'") from None
    for flag in ("max_batch", "max_queue", "memory_budget", "max_body_bytes", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.store_budget is not None and args.store_budget < 1:
        raise UsageError("--store-budget must be at least 1 byte; omit it for no limit")
    if args.store:
        store = Path(args.store)
        if store.exists() and not store.is_dir():
            raise UsageError(f"--store {args.store!r} is a file; pass a folder (it is created if missing)")
        _check_writable(store / "probe", "--store")
    from kvcompress.serve import run

    run(args)


def _size(text: str) -> int:
    from kvcompress.serve import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_method_and_context(parser: argparse.ArgumentParser, method_help: str) -> None:
    """``--method`` and the context (``--context`` or ``--context-file``, one required): read by :func:`_read_context`."""
    parser.add_argument("--method", default="none", help=method_help)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="context text")
    source.add_argument("--context-file", help="file with the context (UTF-8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description="Compress the KV cache of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "model: smollm2-135m (default), gemma3-270m, a local folder, or a hub id"

    info = sub.add_parser("info", help="model shape and uncompressed KV bytes per token")
    info.add_argument("--model", default=None, help=model_help)
    info.set_defaults(run=cmd_info)

    method_help = "compression spec, e.g. 'streaming:window=1024+kivi:bits=4' (default none)"
    chunk_help = "feed the context this many tokens at a time, compressing between chunks (bounds peak memory; e.g. 512)"
    gen = sub.add_parser("generate", help="compress a context, ask a question, print the answer")
    _add_method_and_context(gen, method_help)
    gen.add_argument("--question", default=None, help="asked after the compressed context (not compressed)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    gen.add_argument("--prefill-chunk", type=int, default=None, help=chunk_help)
    gen.add_argument("--model", default=None, help=model_help)
    gen.set_defaults(run=cmd_generate)

    comp = sub.add_parser("compress", help="compress a context once and save it, to ask it questions later (`ask`)")
    _add_method_and_context(comp, method_help)
    comp.add_argument("--out", required=True, help="file to write the compressed cache to (safetensors), e.g. doc.kvc")
    comp.add_argument("--force", action="store_true", help="overwrite --out if it exists (its permissions are kept)")
    comp.add_argument("--prefill-chunk", type=int, default=None, help=chunk_help)
    comp.add_argument("--model", default=None, help=model_help)
    comp.set_defaults(run=cmd_compress)

    ask = sub.add_parser(
        "ask", help="answer questions from a saved compressed context, as `generate` would, without compressing it again"
    )
    ask.add_argument("cache", help="a file written by `kvcompress compress --out`")
    ask.add_argument(
        "--question", action="append", default=None,
        help="asked after the context; repeat the flag to ask several (answered as one batch); omit to continue the text",
    )
    ask.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    ask.add_argument("--model", default=None, help="the model the cache was saved with (default: the name in the file)")
    ask.set_defaults(run=cmd_ask)

    demo = sub.add_parser(
        "demo", help="plant a fact deep in a long text, ask for it under each method, show answers and memory"
    )
    demo.add_argument(
        "--methods", default=None,
        help="method specs separated by ';' (default: none, kivi:bits=4, snapkv:ratio=0.75+kivi:bits=4, "
        "streaming:window=256 and snapkv:ratio=0.75,allocation=retrieval,window=256)",
    )
    demo.add_argument("--tokens", type=int, default=1500, help="context length in tokens (default 1500)")
    demo.add_argument("--depth", type=float, default=0.3, help="where the fact sits, 0 = start to 1 = end (default 0.3)")
    demo.add_argument("--model", default=None, help=model_help)
    demo.set_defaults(run=cmd_demo)

    from kvcompress.bench.cli import add_arguments

    bench = sub.add_parser("bench", help="measure methods: KV bytes, perplexity, retrieval, speed, peak memory")
    add_arguments(bench, model_help)
    bench.set_defaults(run=cmd_bench)

    cal = sub.add_parser("calibrate", help="measure a model's K/V statistics for lowrank and share_heads")
    cal.add_argument("--model", default=None, help=model_help)
    cal.add_argument("--text", default=None, help="UTF-8 text file (default: standard-library code the benchmarks never score)")
    cal.add_argument("--tokens", type=int, default=4096, help="tokens measured, in one sequence (default 4096)")
    cal.add_argument("--out", default=None, help="safetensors file to write (default: the model's default calibration, used by make_cache)")
    cal.add_argument("--retrieval-heads", action="store_true",
                     help="also measure which KV heads retrieve from far context (for allocation=retrieval; about a minute on CPU)")
    cal.set_defaults(run=cmd_calibrate)

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server that keeps compressed contexts and reuses them",
        description="Serve one model with one compression method over an OpenAI-compatible API (/v1/completions, "
        "/v1/chat/completions with streaming, /v1/models, /health, /metrics in Prometheus' format). A completion's "
        "prompt, or a chat conversation before its last user message (system, user and assistant turns), is the "
        "context: it is compressed once and kept, keyed by its tokens, so sending it again skips the prefill; the "
        "question (a completion's `question` field, or the last user message) is not compressed. Greedy by default; "
        "temperature, top_p, top_k, seed, stop, n and (chat) logprobs are served. SIGINT/SIGTERM finish queued "
        "requests, save kept contexts to --store, and exit.",
    )
    serve.add_argument("--model", default=None, help=model_help)
    serve.add_argument("--method", default="none", help="compression spec for every context, e.g. 'snapkv:ratio=0.5+kivi:bits=4' (default none)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--name", default=None, help="the model's name in the API, which requests must send as `model` (default: --model's name)")
    serve.add_argument(
        "--memory-budget", type=_size, default="1GiB",
        help="bytes of KV memory, e.g. 512MiB or 2GiB: the contexts running requests read and their own tokens, then idle "
        "kept contexts in what is left (the least recently used beyond go to --store); a request waits until it fits (default 1GiB)",
    )
    serve.add_argument(
        "--store", default=None,
        help="folder for contexts moved out of memory, in the saved-cache format; contexts found there are reused and "
        "those in memory are saved there at shutdown (default: a temporary folder, removed at exit)",
    )
    serve.add_argument(
        "--store-budget", type=_size, default=None,
        help="bytes of files kept in --store, e.g. 20GiB; the least recently used beyond it are deleted and compressed "
        "again when next asked for (default: no limit)",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="most answers decoded together in one model step, whatever their contexts, and the most choices (n) a request may ask (default 16)")
    serve.add_argument(
        "--prefill-chunk", type=int, default=512,
        help="a new context is compressed this many tokens per model step, between the running answers' steps (default 512)",
    )
    serve.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait; more get HTTP 429 (default 256)")
    serve.add_argument("--max-body-bytes", type=_size, default="4MiB", help="larger request bodies get HTTP 413 (default 4MiB)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logging level (default info)")
    serve.set_defaults(run=cmd_serve)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Inside this block SIGTERM unwinds as Ctrl-C does (``CompressedCache.save`` removes its temporary
    file; one line, exit 2) instead of killing the process mid-write; the handler before is put back."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        with _sigterm_as_interrupt():
            args = build_parser().parse_args(argv)  # argparse itself exits 2 with a one-line usage error
            command = args.command
            args.run(args)
    except UsageError as err:
        print(f"kvcompress: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if command == "bench":  # each measured part is saved as it finishes
            then = f"finished parts are kept under {args.out}/ and running the same command again (without --force) continues"
        else:
            then = "run the command again to start over"
        print(f"kvcompress: interrupted; {then}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
