"""Speed and memory of one method: prefill seconds, greedy decode ms/token, peak memory; and
throughput: tokens/s of batched greedy decode at the largest batch whose cache fits a memory budget.

Measured in a fresh Python process per (method, context), so the peak memory of one row is not
the high-water mark left by another:

- CPU: peak resident set size of the whole process from after the warm-up to the end (Linux: the
  kernel's ``VmHWM``, reset after the warm-up; elsewhere ``ru_maxrss`` since the process started):
  model weights, runtime, activations and cache included. The resident size after the model loaded
  is reported beside it.
- GPU: ``torch.cuda.max_memory_allocated`` from after the warm-up to the end (weights included),
  beside the memory allocated after the model loaded.

The peak of the prefill is read right after it (before any decode step), the same way, and what
the prefill added: that peak less the memory held just before it (``prefill_added_bytes``), which is
what a long prompt costs beyond the weights (its cache, activations and transient copies).

The process warms up (a short prefill and a few decode steps through the same method), then times
the prefill of the context and ``decode_tokens`` greedy decode steps, one token at a time.
:func:`measure_interleaved` keeps the processes of all rows alive and has them take their decode
steps in turns, a few steps each, so that load from outside the benchmark that comes and goes
(other programs, a shared host) slows every row alike and ratios to ``none`` hold. A row's ratio to
``none`` is the median over those rounds of its time over ``none``'s in the same round
(:func:`round_ratio`): a stall that hits one process's turn (one step of 1.3 s among steps of 50 ms
was seen on a 2-core machine: a ratio of mean steps of 1.21x where the median over rounds reads 0.95x)
moves the mean of every step, not that median.

Throughput (:func:`throughput`): the bytes one sequence's cache holds at most, measured on a real
sequence (prefill, then the decode steps; the cache's ``fixed_nbytes``, held once whatever the
batch, apart), give the largest batch whose cache fits the budget; the same context repeated that
many times is then decoded greedily in one batch, its cache's bytes read after every step (and
checked against the budget), and tokens/s timed. The rows' batches decode in turns too, as speed's do.

A measuring process runs as ``python -m kvcompress.bench.speed``, driven by :func:`measure_interleaved`
over its stdin and stdout (the protocol of :func:`_child_in_turns`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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


def _memory_now(device: torch.device) -> int:
    """Memory held now: ``memory_allocated`` on a GPU, the process's resident set size on CPU."""
    import psutil

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss


def _reset_peak(device: torch.device) -> None:
    """Start the peak over from the memory held now: ``reset_peak_memory_stats`` on a GPU; on Linux, the
    process's resident high-water mark (``VmHWM``), reset by writing 5 to ``/proc/self/clear_refs``.
    Elsewhere the CPU peak stays the peak since the process started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int:
    """Peak memory since :func:`_reset_peak`: ``max_memory_allocated`` on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return _peak_rss_bytes()


class _Steps:
    """Greedy decode steps over an open cache, driven from outside: each :meth:`steps` call decodes more
    tokens, timing each step and reading the cache's bytes after it. The method's session stays open
    until :meth:`close` (or the end of a ``with`` block), so the steps of one decode can be spread over
    time, in turn with other processes' (:func:`measure_interleaved`).

    Attributes:
        cache, token (the ``(B, 1)`` next input), position, kv_max (the most bytes the cache held after
        its fill or any step), step_s (seconds of each decode step so far).
    """

    def _open(self, method: BenchMethod, model, cache, logits: torch.Tensor, position: int) -> None:
        self.method, self.model, self.cache, self.position = method, model, cache, position
        self.kv_max = method.nbytes(cache)
        self.token = logits[:, -1:].argmax(-1)  # (B, 1)
        self.step_s: list[float] = []

    @torch.no_grad()
    def steps(self, count: int) -> None:
        """Decode ``count`` more tokens greedily, timing each step."""
        for _ in range(count):
            _sync(self.model.device)
            start = time.perf_counter()
            self.token = step(self.model, self.cache, self.token, self.position)[:, -1:].argmax(-1)
            _sync(self.model.device)
            self.step_s.append(time.perf_counter() - start)
            self.position += 1
            self.kv_max = max(self.kv_max, self.method.nbytes(self.cache))

    def close(self) -> None:
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Decoding(_Steps):
    """One method's greedy decode of one context (:class:`_Steps`): the prefill happens on creation
    (``chunk`` tokens at a time, when given).

    Attributes:
        prefill_s, memory_before (:func:`_memory_now` before the prefill), prefill_peak
        (:func:`_peak_memory` right after the prefill), kv_after_prefill (cache bytes after the prefill).
    """

    @torch.no_grad()
    def __init__(self, method: BenchMethod, model, ids: torch.Tensor, chunk: int | None = None, tokenizer=None):
        cache = method.new_cache(model)
        self._session = contextlib.ExitStack()
        self._session.enter_context(method.session(model, cache))
        _sync(model.device)
        self.memory_before = _memory_now(model.device)
        start = time.perf_counter()
        logits = fill_context(method, model, ids, cache, chunk, tokenizer)  # (1, 1, V)
        _sync(model.device)
        self.prefill_s = time.perf_counter() - start
        self.prefill_peak = _peak_memory(model.device)
        self._open(method, model, cache, logits, ids.shape[1])
        self.kv_after_prefill = self.kv_max


def _greedy(method: BenchMethod, model, ids: torch.Tensor, steps: int, chunk: int | None = None, tokenizer=None) -> _Decoding:
    """Prefill ``(1, C)`` ids, then decode ``steps`` tokens greedily (see :class:`_Decoding`)."""
    with _Decoding(method, model, ids, chunk, tokenizer) as run:
        run.steps(steps)
    return run


def _summary(run: _Decoding, context: int) -> dict:
    """The figures of a finished :class:`_Decoding` (see :func:`measure`)."""
    times = run.step_s
    return {
        "prefill_s": run.prefill_s,
        "prefill_peak_memory_bytes": run.prefill_peak,
        "prefill_added_bytes": run.prefill_peak - run.memory_before,
        "decode_ms_per_token": 1000 * sum(times) / len(times),
        "decode_ms_median": 1000 * sorted(times)[len(times) // 2],
        "decode_step_ms": [1000 * t for t in times],
        "decode_tokens": len(times),
        "context_tokens": context,
        "kv_bytes_after_prefill": run.kv_after_prefill,
        "kv_bytes_end": run.method.nbytes(run.cache),
        "tokens_end": context + len(times),
    }


def _warm_up(method: BenchMethod, model, ids: torch.Tensor, chunk: int | None, tokenizer) -> None:
    """A short prefill and a few decode steps through the same method; then peak memory counts from here."""
    _greedy(method, model, ids[:, :WARMUP_CONTEXT], WARMUP_STEPS, chunk, tokenizer)
    _reset_peak(model.device)


def measure(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, chunk: int | None = None, tokenizer=None
) -> dict:
    """Warm up, then time the prefill of ``(1, C)`` ids and ``decode_tokens`` greedy steps (the
    ``tokenizer``: see :func:`~kvcompress.bench.feed.fill_context`).

    Returns:
        ``prefill_s``, ``prefill_peak_memory_bytes``, ``prefill_added_bytes`` (that peak less the memory held
        before the prefill), ``decode_ms_per_token`` (mean over the steps),
        ``decode_ms_median``, ``decode_step_ms`` (each step),
        ``kv_bytes_after_prefill``, ``kv_bytes_end`` and ``tokens_end``.
    """
    ids = ids.to(model.device)
    _warm_up(method, model, ids, chunk, tokenizer)
    return _summary(_greedy(method, model, ids, decode_tokens, chunk, tokenizer), ids.shape[1])


def fixed_nbytes(cache) -> int:
    """Bytes a cache holds once whatever its batch (low-rank bases, rotary tables); 0 for caches without any."""
    return getattr(cache, "fixed_nbytes", 0)


def sequence_nbytes(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, chunk: int | None = None, tokenizer=None
) -> tuple[int, int]:
    """``(most bytes one sequence's cache holds over its prefill and decode steps, fixed bytes)``, measured
    on ``(1, C)`` ids; ``nbytes`` counts no fixed bytes (see :attr:`kvcompress.cache.CompressedCache.fixed_nbytes`)."""
    run = _greedy(method, model, ids.to(model.device), decode_tokens, chunk, tokenizer)
    return run.kv_max, fixed_nbytes(run.cache)


@torch.no_grad()
def _fill_batch(method: BenchMethod, model, ids: torch.Tensor, batch: int, chunk: int | None, tokenizer=None):
    """A cache holding ``(1, C)`` ids repeated ``batch`` times, and its ``(batch, 1, V)`` logits. A kvcompress
    cache prefills one copy and repeats its rows (the copies are identical), each row with its own pages;
    others prefill the batch."""
    cache = method.new_cache(model)
    with method.session(model, cache):
        if isinstance(cache, CompressedCache):
            logits = fill_context(method, model, ids, cache, chunk, tokenizer).repeat_interleave(batch, 0)
            cache.batch_repeat_interleave(batch)
            cache.unshare()  # rows would share the context's pages: distinct sequences hold and read their own
        else:
            logits = fill_context(method, model, ids.expand(batch, -1), cache, chunk, tokenizer)
    return cache, logits


class _Batched(_Steps):
    """One method's batched greedy decode (:class:`_Steps`) at the largest batch whose cache fits ``budget``
    bytes: sizing (one sequence's most bytes over ``decode_tokens`` steps), a warm-up at that batch and the
    batch's prefill happen on creation; :meth:`summary` gives the figures of :func:`throughput`.

    Raises:
        MeasurementError: not even one sequence fits, or the batch's cache outgrew the budget.
    """

    @torch.no_grad()
    def __init__(self, method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, budget: int,
                 chunk: int | None = None, tokenizer=None):
        self.budget, self.context = budget, ids.shape[1]
        ids = ids.to(model.device)
        self.per_sequence, self.fixed = sequence_nbytes(method, model, ids, decode_tokens, chunk, tokenizer)
        self.batch = (budget - self.fixed) // self.per_sequence
        if self.batch < 1:
            raise MeasurementError(
                f"{method.spec!r}: one sequence's cache takes {self.per_sequence + self.fixed:,} bytes, more than the "
                f"budget of {budget:,}; raise --memory-budget"
            )
        warm_cache, warm_logits = _fill_batch(method, model, ids[:, :WARMUP_CONTEXT], self.batch, chunk, tokenizer)
        with method.session(model, warm_cache):
            step(model, warm_cache, warm_logits.argmax(-1), min(WARMUP_CONTEXT, ids.shape[1]))
        del warm_cache, warm_logits
        cache, logits = _fill_batch(method, model, ids, self.batch, chunk, tokenizer)
        self._session = contextlib.ExitStack()
        self._session.enter_context(method.session(model, cache))
        self._open(method, model, cache, logits, ids.shape[1])

    def summary(self) -> dict:
        if self.kv_max + self.fixed > self.budget:
            raise MeasurementError(
                f"{self.method.spec!r}: at batch {self.batch} the cache held {self.kv_max + self.fixed:,} bytes, over "
                f"the budget of {self.budget:,} ({self.per_sequence:,} bytes per sequence measured alone)"
            )
        times = self.step_s
        return {
            "budget_bytes": self.budget,
            "bytes_per_sequence": self.per_sequence,
            "fixed_bytes": self.fixed,
            "batch": self.batch,
            "cache_bytes": self.kv_max + self.fixed,
            "tokens_per_s": self.batch * len(times) / sum(times),
            "decode_ms_per_step": 1000 * sum(times) / len(times),
            "decode_tokens": len(times),
            "context_tokens": self.context,
        }


def throughput(
    method: BenchMethod, model, ids: torch.Tensor, decode_tokens: int, budget: int, chunk: int | None = None,
    tokenizer=None,
) -> dict:
    """Tokens/s of greedy decode at the largest batch whose cache fits ``budget`` bytes (see :class:`_Batched`).

    Args:
        ids: ``(1, C)`` context ids, repeated for every sequence of the batch.
        budget: bytes the batch's cache may hold (its fixed bytes included).

    Returns:
        ``budget_bytes``, ``bytes_per_sequence``, ``fixed_bytes``, ``batch``, ``cache_bytes`` (the most
        the batch's cache held after any step, fixed bytes included), ``tokens_per_s`` (batch x steps
        / decode seconds), ``decode_ms_per_step``, ``decode_tokens`` and ``context_tokens``.

    Raises:
        MeasurementError: not even one sequence fits, or the batch's cache outgrew the budget.
    """
    with _Batched(method, model, ids, decode_tokens, budget, chunk, tokenizer) as run:
        run.steps(decode_tokens)
    return run.summary()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _load(request: dict):
    """The measuring process's model, tokenizer, method, ``(1, C)`` ids, and its memory after loading the model."""
    from kvcompress.models import load_model

    torch.set_num_threads(request["threads"])
    method = resolve(request["spec"])
    model, tokenizer = load_model(request["model"], dtype=getattr(torch, request["dtype"]), device=request["device"])
    kind = ("torch.cuda.max_memory_allocated" if model.device.type == "cuda" else
            "peak RSS of the process (VmHWM; speed: from after the warm-up where Linux allows)")
    memory = {"memory_after_load_bytes": _memory_now(model.device), "memory_kind": kind}
    ids = torch.tensor([request["ids"]], device=model.device)
    return model, tokenizer, method, ids, memory


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _child_in_turns() -> None:
    """Body of a measuring process driven by :func:`measure_interleaved`, one JSON line each way.

    Reads the request; loads, warms up and prefills, then says ``{"ready": true}``; then decodes
    ``{"steps": n}`` tokens per order, answering ``{"done": n}``; on ``{"finish": true}`` prints the figures
    of :func:`measure` and ends.
    """
    request = json.loads(sys.stdin.readline())
    model, tokenizer, method, ids, memory = _load(request)
    chunk = request.get("prefill_chunk")
    if request.get("part") == "throughput":
        run = _Batched(method, model, ids, request["decode_tokens"], request["budget"], chunk, tokenizer)
        summary = run.summary
    else:
        _warm_up(method, model, ids, chunk, tokenizer)
        run = _Decoding(method, model, ids, chunk, tokenizer)
        summary = functools.partial(_summary, run, ids.shape[1])
    with run:
        _send({"ready": True})
        for line in sys.stdin:
            order = json.loads(line)
            if "finish" in order:
                break
            run.steps(order["steps"])
            _send({"done": order["steps"]})
    _send({**summary(), "peak_memory_bytes": _peak_memory(model.device), **memory})


def _failed(spec: str, stderr: str) -> MeasurementError:
    """The error of a measuring process that failed: the last lines of its stderr."""
    return MeasurementError(f"measuring {spec!r} failed: " + " | ".join(stderr.strip().splitlines()[-5:]))


ROUND_STEPS = 4  # decode steps a process takes per turn in :func:`measure_interleaved`
MEMORY_RESERVE = 1.5  # another process starts when free memory holds this many of the largest so far


class _InTurns:
    """A measuring process (:func:`_child_in_turns`): started, warmed up and prefilled on creation."""

    def __init__(self, request: dict):
        self.spec, self.left = request["spec"], request["decode_tokens"]
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks on it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvcompress.bench.speed"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
        self.ask(request)

    def ask(self, message: dict) -> dict:
        """Send one order, wait for its answer."""
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            raise _failed(self.spec, self._stderr.read())
        return json.loads(line)

    def turn(self, steps: int) -> None:
        count = min(steps, self.left)
        if count:
            self.ask({"steps": count})
            self.left -= count

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def finish(self) -> dict:
        result = self.ask({"finish": True})
        self.close()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


def round_ratio(steps: list[float], baseline: list[float], round_steps: int) -> float:
    """The median over rounds of ``round_steps`` steps of a row's time over the baseline's in the same round.

    Args:
        steps, baseline: each step's time, in order, of a row and of the baseline that took turns with it
            (the same number of steps: round ``i`` is steps ``i * round_steps`` to ``(i + 1) * round_steps``).
    """
    if len(steps) != len(baseline) or not steps:
        raise ValueError(f"a row and its baseline must time the same steps, got {len(steps)} and {len(baseline)}")
    rounds = range(0, len(steps), round_steps)
    return statistics.median(sum(steps[i : i + round_steps]) / sum(baseline[i : i + round_steps]) for i in rounds)


def _baseline_of(result: dict) -> dict:
    """What every row of a group measured in turns keeps of the baseline's figures over the same rounds."""
    if "tokens_per_s" in result:  # throughput
        return {"baseline_tokens_per_s": result["tokens_per_s"]}
    return {"baseline_decode_ms": result["decode_ms_per_token"]}


def _against(result: dict, baseline: dict, round_steps: int) -> dict:
    """A speed row's ratio to the baseline of its group over the same rounds (:func:`round_ratio`)."""
    if "decode_step_ms" not in result:  # throughput
        return {}
    return {"decode_x_rounds": round_ratio(result["decode_step_ms"], baseline["decode_step_ms"], round_steps)}


def measure_interleaved(requests: list[dict], round_steps: int = ROUND_STEPS) -> list[dict]:
    """:func:`measure` (or :func:`throughput`) for each request, each in a fresh process (see the module
    docstring for what the memory means), with the decode steps of all of them taken in turns.

    A request holds ``spec``, ``model``, ``dtype`` (e.g. ``"float32"``), ``device``, ``threads``, ``ids`` (the
    context, a list of ``C`` ids), ``decode_tokens``, optionally ``prefill_chunk``; with ``"part":
    "throughput"`` and ``budget`` (bytes), :func:`throughput` instead of :func:`measure`; the first is the
    baseline. Each request gets its own process, which loads the model, warms up and prefills while the others
    wait, so prefill time and peak memory are measured alone. Then each process in turn decodes
    ``round_steps`` tokens, round after round, until every one has decoded its ``decode_tokens``: load
    from outside that comes and goes slows every row alike, and the ratio to the first request (the
    baseline) compares the same stretch of time. Every result has ``baseline_decode_ms``: the baseline's
    mean step time over the same rounds (throughput: ``baseline_tokens_per_s``, the baseline's tokens/s
    at its batch), a speed row ``decode_x_rounds`` (:func:`round_ratio` against the baseline), and
    ``decode_group``: which group of processes it decoded with (below).

    The processes of a round stay alive together. When free memory would not hold another (under
    :data:`MEMORY_RESERVE` times the largest so far), those started finish their rounds and the next
    group starts with a fresh baseline process, whose figures serve only as that group's baseline.

    Raises:
        MeasurementError: a process failed.
    """
    import psutil

    results: list[dict | None] = [None] * len(requests)
    pending = list(range(1, len(requests)))
    first, groups = True, 0
    while first or pending:
        group: list[tuple[int | None, _InTurns]] = []
        try:
            group.append((0 if first else None, _InTurns(requests[0])))
            largest = group[0][1].rss()
            while pending and (len(group) < 2 or psutil.virtual_memory().available > MEMORY_RESERVE * largest):
                index = pending.pop(0)
                group.append((index, _InTurns(requests[index])))
                largest = max(largest, group[-1][1].rss())
            while any(proc.left for _, proc in group):
                for _, proc in group:
                    proc.turn(round_steps)
            finished = [(index, proc.finish()) for index, proc in group]
        finally:
            for _, proc in group:
                proc.close()
        baseline = _baseline_of(finished[0][1])
        for index, result in finished:
            if index is not None:
                results[index] = {
                    **result, **baseline, **_against(result, finished[0][1], round_steps),
                    "decode_rounds_of": round_steps, "decode_group": groups,
                }
        first, groups = False, groups + 1
    return results


if __name__ == "__main__":
    _child_in_turns()
