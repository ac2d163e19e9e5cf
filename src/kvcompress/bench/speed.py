"""Speed and memory of one method: prefill seconds, greedy decode ms/token, peak memory; and
throughput: tokens/s of batched greedy decode at the largest batch whose cache fits a memory budget.

Measured in a fresh Python process per (method, context), so the peak memory of one row is not
the high-water mark left by another:

- CPU: peak resident set size of the whole process (``getrusage(RUSAGE_SELF).ru_maxrss``): model
  weights, runtime, activations and cache included. The resident size after the model loaded is
  reported beside it, so the difference is what prefill and decode added.
- GPU: ``torch.cuda.max_memory_allocated`` from after the warm-up to the end (weights included),
  beside the memory allocated after the model loaded.

The peak memory of the prefill alone is read right after it (before any decode step), the same way.

The process warms up (a short prefill and a few decode steps through the same method), then times
the prefill of the context and ``decode_tokens`` greedy decode steps, one token at a time.

Throughput (:func:`throughput`): the bytes one sequence's cache holds at most, measured on a real
sequence (prefill, then the decode steps; the cache's ``fixed_nbytes``, held once whatever the
batch, apart), give the largest batch whose cache fits the budget; the same context repeated that
many times is then decoded greedily in one batch, its cache's bytes read after every step (and
checked against the budget), and tokens/s timed.

Run as ``python -m kvcompress.bench.speed`` with a JSON request on stdin; it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from kvcompress.bench.feed import fill_context, step
from kvcompress.bench.methods import BenchMethod, resolve
from kvcompress.cache import CompressedCache

WARMUP_CONTEXT = 256
WARMUP_STEPS = 4


class MeasurementError(RuntimeError):
    """The measuring process failed; the message holds the end of its stderr."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    """Peak memory so far: ``max_memory_allocated`` on a GPU, the process's peak RSS on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()


@torch.no_grad()
def _greedy(method: BenchMethod, model, ids: torch.Tensor, steps: int, chunk: int | None = None, tokenizer=None) -> dict:
    """Prefill ``(1, C)`` ids (``chunk`` tokens at a time, when given), then decode ``steps`` tokens greedily.

    Returns:
        ``cache``, ``prefill_s``, ``step_s`` (seconds of each decode step), ``kv_after_prefill``
        (cache bytes after the prefill), ``kv_max`` (the most bytes it held after any step) and
        ``prefill_peak`` (:func:`_peak_memory` right after the prefill).
    """
    device = model.device
    cache = method.new_cache(model)
    with method.session(model, cache):
        _sync(device)
        start = time.perf_counter()
        logits = fill_context(method, model, ids, cache, chunk, tokenizer)  # (1, 1, V)
        _sync(device)
        prefill_s = time.perf_counter() - start
        prefill_peak = _peak_memory(device)
        kv_after_prefill = kv_max = method.nbytes(cache)
        token = logits[:, -1:].argmax(-1)  # (1, 1)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            token = step(model, cache, token, ids.shape[1] + i)[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
            kv_max = max(kv_max, method.nbytes(cache))
    return {"cache": cache, "prefill_s": prefill_s, "step_s": times, "kv_after_prefill": kv_after_prefill,
            "kv_max": kv_max, "prefill_peak": prefill_peak}


def measure(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, chunk: int | None = None, tokenizer=None
) -> dict:
    """Warm up, then time the prefill of ``(1, C)`` ids and ``decode_tokens`` greedy steps (the
    ``tokenizer``: see :func:`~kvcompress.bench.feed.fill_context`).

    Returns:
        ``prefill_s``, ``prefill_peak_memory_bytes``, ``decode_ms_per_token`` (mean over the steps),
        ``decode_ms_median``, ``decode_step_ms`` (each step),
        ``kv_bytes_after_prefill``, ``kv_bytes_end`` and ``tokens_end``.
    """
    ids = ids.to(model.device)
    _greedy(method, model, ids[:, :WARMUP_CONTEXT], WARMUP_STEPS, chunk, tokenizer)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    run = _greedy(method, model, ids, decode_tokens, chunk, tokenizer)
    times = run["step_s"]
    return {
        "prefill_s": run["prefill_s"],
        "prefill_peak_memory_bytes": run["prefill_peak"],
        "decode_ms_per_token": 1000 * sum(times) / len(times),
        "decode_ms_median": 1000 * sorted(times)[len(times) // 2],
        "decode_step_ms": [1000 * t for t in times],
        "decode_tokens": decode_tokens,
        "context_tokens": ids.shape[1],
        "kv_bytes_after_prefill": run["kv_after_prefill"],
        "kv_bytes_end": method.nbytes(run["cache"]),
        "tokens_end": ids.shape[1] + decode_tokens,
    }


def fixed_nbytes(cache) -> int:
    """Bytes a cache holds once whatever its batch (low-rank bases, rotary tables); 0 for caches without any."""
    return getattr(cache, "fixed_nbytes", 0)


def sequence_nbytes(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, chunk: int | None = None, tokenizer=None
) -> tuple[int, int]:
    """``(most bytes one sequence's cache holds over its prefill and decode steps, fixed bytes)``, measured
    on ``(1, C)`` ids; ``nbytes`` counts no fixed bytes (see :attr:`kvcompress.cache.CompressedCache.fixed_nbytes`)."""
    run = _greedy(method, model, ids.to(model.device), decode_tokens, chunk, tokenizer)
    return run["kv_max"], fixed_nbytes(run["cache"])


@torch.no_grad()
def _fill_batch(method: BenchMethod, model, ids: torch.Tensor, batch: int, chunk: int | None, tokenizer=None):
    """A cache holding ``(1, C)`` ids repeated ``batch`` times, and its ``(batch, 1, V)`` logits. A kvcompress
    cache prefills one copy and repeats its rows (the copies are identical); others prefill the batch."""
    cache = method.new_cache(model)
    with method.session(model, cache):
        if isinstance(cache, CompressedCache):
            logits = fill_context(method, model, ids, cache, chunk, tokenizer).repeat_interleave(batch, 0)
            cache.batch_repeat_interleave(batch)
        else:
            logits = fill_context(method, model, ids.expand(batch, -1), cache, chunk, tokenizer)
    return cache, logits


@torch.no_grad()
def throughput(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, budget: int, chunk: int | None = None,
    tokenizer=None,
) -> dict:
    """Tokens/s of greedy decode at the largest batch whose cache fits ``budget`` bytes.

    Args:
        ids: ``(1, C)`` context ids, repeated for every sequence of the batch.
        budget: bytes the batch's cache may hold (its fixed bytes included).

    Returns:
        ``budget_bytes``, ``bytes_per_sequence``, ``fixed_bytes``, ``batch``, ``cache_bytes`` (the most
        the batch's cache held after any step, fixed bytes included), ``tokens_per_s`` (batch x steps
        / decode seconds), ``decode_ms_per_step`` and ``decode_tokens``.

    Raises:
        MeasurementError: not even one sequence fits, or the batch's cache outgrew the budget.
    """
    ids = ids.to(model.device)
    per_sequence, fixed = sequence_nbytes(method, model, ids, decode_tokens, chunk, tokenizer)
    batch = (budget - fixed) // per_sequence
    if batch < 1:
        raise MeasurementError(
            f"{method.spec!r}: one sequence's cache takes {per_sequence + fixed:,} bytes, more than the budget of "
            f"{budget:,}; raise --memory-budget"
        )
    warm_cache, warm_logits = _fill_batch(method, model, ids[:, :WARMUP_CONTEXT], batch, chunk, tokenizer)
    with method.session(model, warm_cache):
        step(model, warm_cache, warm_logits.argmax(-1), min(WARMUP_CONTEXT, ids.shape[1]))
    del warm_cache, warm_logits
    cache, logits = _fill_batch(method, model, ids, batch, chunk, tokenizer)
    held = method.nbytes(cache)
    token = logits[:, -1:].argmax(-1)  # (batch, 1)
    times = []
    with method.session(model, cache):
        for i in range(decode_tokens):
            _sync(model.device)
            start = time.perf_counter()
            token = step(model, cache, token, ids.shape[1] + i)[:, -1:].argmax(-1)
            _sync(model.device)
            times.append(time.perf_counter() - start)
            held = max(held, method.nbytes(cache))
    if held + fixed > budget:
        raise MeasurementError(
            f"{method.spec!r}: at batch {batch} the cache held {held + fixed:,} bytes, over the budget of {budget:,} "
            f"({per_sequence:,} bytes per sequence measured alone)"
        )
    return {
        "budget_bytes": budget,
        "bytes_per_sequence": per_sequence,
        "fixed_bytes": fixed,
        "batch": batch,
        "cache_bytes": held + fixed,
        "tokens_per_s": batch * decode_tokens / sum(times),
        "decode_ms_per_step": 1000 * sum(times) / len(times),
        "decode_tokens": decode_tokens,
        "context_tokens": ids.shape[1],
    }


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _child(request: dict) -> dict:
    """Body of the measuring process: load the model, measure speed or throughput, add the memory figures."""
    import psutil

    from kvcompress.models import load_model

    torch.set_num_threads(request["threads"])
    method = resolve(request["spec"])
    model, tokenizer = load_model(request["model"], dtype=getattr(torch, request["dtype"]), device=request["device"])
    if model.device.type == "cuda":
        loaded, kind = torch.cuda.memory_allocated(model.device), "torch.cuda.max_memory_allocated"
    else:
        loaded, kind = psutil.Process().memory_info().rss, "peak RSS of the process (ru_maxrss)"
    ids, chunk = torch.tensor([request["ids"]]), request.get("prefill_chunk")
    if request.get("part") == "throughput":
        result = throughput(method, model, ids, request["decode_tokens"], request["budget"], chunk, tokenizer)
    else:
        result = measure(method, model, ids, request["decode_tokens"], chunk, tokenizer)
    result.update(peak_memory_bytes=_peak_memory(model.device), memory_after_load_bytes=loaded, memory_kind=kind)
    return result


def measure_in_subprocess(request: dict) -> dict:
    """Run :func:`measure` (or :func:`throughput`) in a fresh process (see the module docstring for what the memory means).

    Args:
        request: ``spec``, ``model``, ``dtype`` (e.g. ``"float32"``), ``device``, ``threads``,
            ``ids`` (the context, a list of ``C`` ids), ``decode_tokens``, optionally ``prefill_chunk``;
            with ``"part": "throughput"`` and ``budget`` (bytes), :func:`throughput` instead of :func:`measure`.

    Raises:
        MeasurementError: the process failed.
    """
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kvcompress.bench.speed"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise MeasurementError(f"measuring {request['spec']!r} failed: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.stdin.read()))))
