"""Speed and memory of one method: prefill seconds, greedy decode ms/token, peak memory.

Measured in a fresh Python process per (method, context), so the peak memory of one row is not
the high-water mark left by another:

- CPU: peak resident set size of the whole process (``getrusage(RUSAGE_SELF).ru_maxrss``): model
  weights, runtime, activations and cache included. The resident size after the model loaded is
  reported beside it, so the difference is what prefill and decode added.
- GPU: ``torch.cuda.max_memory_allocated`` from after the warm-up to the end (weights included),
  beside the memory allocated after the model loaded.

The process warms up (a short prefill and a few decode steps through the same method), then times
the prefill of the context and ``decode_tokens`` greedy decode steps, one token at a time.

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

from kvcompress.bench.methods import BenchMethod, fill_context, resolve, step

WARMUP_CONTEXT = 256
WARMUP_STEPS = 4


class MeasurementError(RuntimeError):
    """The measuring process failed; the message holds the end of its stderr."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _greedy(method: BenchMethod, model, ids: torch.Tensor, steps: int, tokenizer=None) -> tuple[object, float, list[float], int]:
    """Prefill ``(1, C)`` ids, then decode ``steps`` tokens greedily.

    Returns:
        ``(cache, prefill seconds, seconds of each decode step, cache bytes after the prefill)``.
    """
    device = model.device
    cache = method.new_cache(model)
    with method.session(model, cache):
        _sync(device)
        start = time.perf_counter()
        logits = fill_context(method, model, ids, cache, tokenizer)  # (1, 1, V)
        _sync(device)
        prefill_s = time.perf_counter() - start
        kv_after_prefill = method.nbytes(cache)
        token = logits[:, -1:].argmax(-1)  # (1, 1)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            token = step(model, cache, token, ids.shape[1] + i)[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
    return cache, prefill_s, times, kv_after_prefill


def measure(method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, tokenizer=None) -> dict:
    """Warm up, then time the prefill of ``(1, C)`` ids and ``decode_tokens`` greedy steps (the
    ``tokenizer``: see :func:`~kvcompress.bench.methods.fill_context`).

    Returns:
        ``prefill_s``, ``decode_ms_per_token`` (mean over the steps), ``decode_ms_median``,
        ``decode_step_ms`` (each step),
        ``kv_bytes_after_prefill``, ``kv_bytes_end`` and ``tokens_end``.
    """
    ids = ids.to(model.device)
    _greedy(method, model, ids[:, :WARMUP_CONTEXT], WARMUP_STEPS, tokenizer)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    cache, prefill_s, times, kv_after_prefill = _greedy(method, model, ids, decode_tokens, tokenizer)
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1000 * sum(times) / len(times),
        "decode_ms_median": 1000 * sorted(times)[len(times) // 2],
        "decode_step_ms": [1000 * t for t in times],
        "decode_tokens": decode_tokens,
        "context_tokens": ids.shape[1],
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_end": method.nbytes(cache),
        "tokens_end": ids.shape[1] + decode_tokens,
    }


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _child(request: dict) -> dict:
    """Body of the measuring process: load the model, measure, add the memory figures."""
    import psutil

    from kvcompress.models import load_model

    torch.set_num_threads(request["threads"])
    method = resolve(request["spec"])
    model, tokenizer = load_model(request["model"], dtype=getattr(torch, request["dtype"]), device=request["device"])
    if model.device.type == "cuda":
        loaded, kind = torch.cuda.memory_allocated(model.device), "torch.cuda.max_memory_allocated"
    else:
        loaded, kind = psutil.Process().memory_info().rss, "peak RSS of the process (ru_maxrss)"
    result = measure(method, model, torch.tensor([request["ids"]]), request["decode_tokens"], tokenizer)
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else _peak_rss_bytes()
    result.update(peak_memory_bytes=peak, memory_after_load_bytes=loaded, memory_kind=kind)
    return result


def measure_in_subprocess(request: dict) -> dict:
    """Run :func:`measure` in a fresh process (see the module docstring for what the memory means).

    Args:
        request: ``spec``, ``model``, ``dtype`` (e.g. ``"float32"``), ``device``, ``threads``,
            ``ids`` (the context, a list of ``C`` ids) and ``decode_tokens``.

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
