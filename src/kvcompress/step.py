"""The step contract: what one forward step hands between the model, a cache layer and attention.

Everything a compressed layer needs for one step, and everything it gives back, is one of the
typed values below, passed as an argument or returned, never left on an object for another
module to read. One forward of the model with a kvcompress cache attached
(:func:`kvcompress.attach`), for each compressed layer::

    forward pre-hook (attach.py)     reads the forward's padding mask and positions -> StepInputs
    transformers                     forwards StepInputs to every attention call (as a keyword)
    kvcompress attention (attach.py) CompressedLayer.attend(query, new keys/values, StepInputs):
        layer.append(...)                  -> Operands  (segments [stored | window], validity, what to observe)
        attention.attend(query, Operands)  -> Attended  (output, attention received by observed queries)
        layer.compress(Attended, ...)      evicts (Selection) and settles tokens into the store

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads, ``q`` tokens of this step, ``S`` slots a
layer holds after appending them (the new ones last), ``D`` head dim, ``G = Hq / H * q`` the
queries that read one KV head (the query heads of a KV head are consecutive, so grouping them is
a reshape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

ATTENTION = "kvcompress"  # the attention implementation that runs the step (registered by kvcompress.attach)


@dataclass(frozen=True)
class Replayed:
    """Which chunk of the held context a replay step replays (KVzip, :func:`kvcompress.methods.kvzip.replay`).

    Each row's step is its prompt followed by the chunk (left-padded). Their queries score the chunk's
    held slots alone, in a softmax over the ``sink`` oldest held tokens, the chunk's held slots and the
    step's tokens (Kim et al., 2025, Algorithm 1).

    Attributes:
        start, stop: ``(B,)`` the chunk is each row's real context tokens ``start .. stop - 1``
            (0 = its oldest); ``start == stop`` for a row with no chunk in this step.
        sink: oldest held tokens every chunk's scoring softmax also reads (attention sinks).
    """

    start: torch.Tensor
    stop: torch.Tensor
    sink: int = 0


@dataclass(frozen=True)
class StepInputs:
    """Per-forward inputs that every compressed layer needs, built once per forward.

    Attributes:
        cache: the :class:`~kvcompress.cache.CompressedCache` this forward reads and fills.
        valid: ``(B, q)`` bool, False for padding tokens among the new ones; None when all are real.
        positions: ``(B, q)`` or ``(1, q)`` positions the model gives the new tokens; None when they
            are ``seen .. seen + q - 1``.
        hold: compress after a later step, not this one (question-aware compression: the question
            that follows is scored with the context).
        expected: ``(B,)`` tokens of the context being prefilled in chunks, per row, so that budgets
            given as a ratio are a ratio of the whole context, not of the first chunk; else None.
        replay: the tokens replay a chunk of the held context (see :attr:`kvcompress.protocols.Selection.replay`):
            queries only, attending to the held slots and to each other, never stored; None otherwise.
        hidden_norm: ``(B, q)`` norm of the attention's input at each new token, and
        output_weight: ``(hidden, Hq * D)`` the layer's output projection: given to a replay step
            whose selection asks for ``replay_norms`` (per layer, by :func:`kvcompress.methods.kvzip.replay`).
    """

    cache: Any
    valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    hold: bool = False
    expected: torch.Tensor | None = None
    replay: Replayed | None = None
    hidden_norm: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None


class Segment(Protocol):
    """A run of slots attention reads in one representation (full precision, quantized, latent).

    A segment computes its part of ``softmax(q Kᵀ) V`` without the caller rebuilding its keys or
    values: :meth:`logits` before the softmax, :meth:`mix` after it. :meth:`dense` gives the same
    keys and values in full precision, for the reference path and for scorers.
    """

    dense_only: bool  # its logits/mix are plain matmuls on dense(): sdpa may read it directly

    def __len__(self) -> int: ...

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient ``(B, H, S_i, D)`` keys and values."""

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(B, H, G, D)`` grouped queries -> ``(B, H, G, S_i)`` unscaled dot products with the keys."""

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """``(B, H, G, S_i)`` attention weights -> ``(B, H, G, D)`` weighted sum of the values."""


@dataclass(frozen=True)
class DenseSegment:
    """Full-precision ``(B, H, S_i, D)`` keys and values (a view of a buffer, never a copy)."""

    keys: torch.Tensor
    values: torch.Tensor
    dense_only = True

    def __len__(self) -> int:
        return self.keys.shape[2]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return query @ self.keys.transpose(-1, -2)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return weights @ self.values


class GatheredSegment:
    """A segment held where a kernel reads it in place (pages), whose ``(B, H, S, D)`` keys and values other
    paths (a prompt, the reference, scorers) read gathered: once per segment, which lives for one step.
    A subclass says how to gather them (:meth:`gather`)."""

    dense_only = True
    _dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dense is None:
            self._dense = self.gather()
        return self._dense

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return query @ self.dense()[0].transpose(-1, -2)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return weights @ self.dense()[1]


@dataclass(frozen=True)
class Operands:
    """What a layer hands attention for one step.

    Attributes:
        segments: the slots in order, ``[stored | window]``; the step's new tokens are the last
            ``q`` slots of the last segment.
        valid: ``(B, H, S)`` bool, False for padding and evicted-but-held slots; None when every
            slot is a real token.
        heads: ``H``.
        observe: how many of the step's latest queries the layer's scorer needs the attention
            weights of (0: none, -1: all).
        observed: ``(B, H, S)`` float32, the attention the slots received in the layer's earlier
            steps (0 for the step's new slots), which attention adds this step's to in place; None:
            start from zeros.
    """

    segments: tuple[Segment, ...]
    valid: torch.Tensor | None
    heads: int
    observe: int = 0
    observed: torch.Tensor | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass(frozen=True)
class Attended:
    """What attention gives back for one step.

    Attributes:
        output: ``(B, Hq, q, D)``.
        observed: ``(B, H, S)`` float32, the attention each slot received from the observed queries
            (summed over them, averaged over the query heads of its KV head; padding queries count
            zero), added to ``Operands.observed`` when given (then that same tensor); None when
            ``Operands.observe`` is 0.
    """

    output: torch.Tensor
    observed: torch.Tensor | None = None
