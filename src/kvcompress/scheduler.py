"""Which sequences run: continuous batching's waiting, running and preempted queues, under a byte budget.

Pure bookkeeping, no tensors (as nano-vllm's block manager and transformers' continuous-batching
scheduler keep it): the server's worker (:class:`kvcompress.serve.Engine`) tells it what each sequence
holds and would need, in bytes of KV memory, and does what it decides.

- **Admission**: first come, first served (a preempted sequence goes back to the head of the queue).
  A waiting sequence starts when its rows fit beside the running ones (``max_rows``: rows decoded in
  one model step) and its bytes fit the budget beside the bytes already held, or when nothing runs (a
  sequence alone always runs: a wait would not give it more memory).
- **Preemption**: when the running sequences outgrow the budget (their answers grow), the most
  recently started one stops and waits at the head of the queue, until all fit again. Its own tokens
  (the question and the answer so far) are dropped and recomputed when it resumes, in one forward; its
  context is not, it stays kept (and may go to disk with the other idle contexts). Recompute, not a
  swap of its pages, because those tokens are few next to the context (a question and up to
  ``max_tokens``), uncompressed, and one forward recomputes them faster than the disk returns them
  (vLLM's V1 scheduler makes the same choice).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it.

    Attributes:
        request: the server's job (opaque here).
        rows: rows it decodes in each model step (its answers).
        need: bytes it would add to the memory held if it started now (its estimate, set by the engine).
        held: bytes it holds while running (set by the engine after each step).
        state: ``"waiting"``, ``"running"``, ``"preempted"`` (waiting to resume) or ``"finished"``.
    """

    request: object
    rows: int = 1
    need: int = 0
    held: int = 0
    state: str = "waiting"
    preemptions: int = 0


class Scheduler:
    """Waiting and running sequences, admitted and preempted by bytes (see the module docstring).

    Args:
        budget: bytes of KV memory the running sequences (with their contexts) may hold; None: no limit.
        max_rows: rows one model step decodes at most.
    """

    def __init__(self, budget: int | None, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"a step decodes at least one row, got max_rows={max_rows}")
        self.budget, self.max_rows = budget, max_rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def rows(self) -> int:
        return sum(seq.rows for seq in self.running)

    def add(self, seq: Sequence) -> None:
        seq.state = "waiting"
        self.waiting.append(seq)

    def can_start(self, seq: Sequence, used: int) -> bool:
        """Whether ``seq`` may start now, with ``used`` bytes held."""
        if not self.running:
            return True
        fits = self.budget is None or used + seq.need <= self.budget
        return fits and self.rows + seq.rows <= self.max_rows

    def next(self, used: int) -> Sequence | None:
        """The sequence to start now (the head of the queue, if it may), else None."""
        if self.waiting and self.can_start(self.waiting[0], used):
            return self.waiting[0]
        return None

    def start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.state = "running"
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done, or cancelled: it leaves whichever queue holds it."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.state = "finished"

    def to_preempt(self, used: int) -> list[Sequence]:
        """The running sequences to stop, newest first, until ``used`` bytes (less what each frees, its
        ``held``) fit the budget; the oldest always keeps running. They wait at the head of the queue,
        oldest first."""
        victims = []
        while self.budget is not None and used > self.budget and len(self.running) > 1:
            seq = self.running.pop()
            used -= seq.held
            seq.state, seq.held = "preempted", 0
            seq.preemptions += 1
            victims.append(seq)
        self.waiting.extendleft(victims)  # extendleft reverses: the oldest victim ends up first
        self.preemptions += len(victims)
        return victims
