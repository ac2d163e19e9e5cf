"""The axes of a compression pipeline, as the protocols their methods implement.

A pipeline is at most one :class:`Selection` (which tokens a layer keeps: eviction) and a
:class:`Representation` (how tokens that left the full-precision window are stored: quantized,
low-rank, shared), each a frozen dataclass of its parameters, registered by name
(:func:`kvcompress.registry.register`). Neither knows the other; the cache layer
(:class:`kvcompress.cache.CompressedLayer`) combines them, and the data of one step moves between
them as the values of :mod:`kvcompress.step`.

Score-based selections split further into a scorer (``score``: how much each token matters) and an
allocation (how many tokens each layer and head keeps: :mod:`kvcompress.methods.budgets`), chosen
independently in the spec (``knorm:ratio=0.75,allocation=adaptive``).

A representation holds no model state: :meth:`Representation.prepare` builds, for one model, the
:class:`Storage` that the cache owns (calibration bases, head groups, rotary tables, pairs of
layers), and the storage makes one :class:`Store` per layer.

Shapes: ``B`` batch, ``H`` KV heads (never the query heads: storage is GQA-native), ``S`` slots held
by a layer, ``D`` head dim, ``Hq`` query heads, ``m`` queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar, Protocol

import torch

from kvcompress.step import Segment


class Store(Protocol):
    """Tokens of one layer in a compressed representation, in position order per row and head.

    A store frees memory in units of ``block`` tokens: eviction inside a block that still holds a
    kept token only marks the evicted token invalid (masked from attention) until the whole block
    goes.
    """

    block: int

    def __len__(self) -> int: ...  # slots held

    @property
    def nbytes(self) -> int: ...  # bytes of every tensor held

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        """Add ``(B, H, n, D)`` tokens, ``n`` a multiple of ``block``; ``valid`` is ``(B, H, n)`` or None
        (all real); ``positions`` ``(B, H, n)`` int32 when the storage ``needs_positions``, else None."""

    def segment(self) -> Segment:
        """What attention reads of the held slots (see :class:`kvcompress.step.Segment`)."""

    def valid(self) -> torch.Tensor | None:
        """``(B, H, S)`` bool, False for padding or evicted slots; None when every slot is valid."""

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the slots where the ``(B, H, S)`` bool ``keep`` is False, freeing whole blocks.

        Returns the ``(B, H, n)`` old slot index of every slot held afterwards.
        """

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch dimension of every held tensor (beam reorder, batch select)."""


class Storage(Protocol):
    """A representation prepared for one model: makes the stores of its layers, owned by one cache."""

    residual: int  # most recent tokens kept in full precision (the layer's window)
    needs_positions: bool  # its stores' ``append`` takes the tokens' positions

    @property
    def fixed_nbytes(self) -> int: ...  # bytes held once per cache whatever its length (bases, tables)

    def fixed_state(self) -> dict[str, torch.Tensor]:
        """What it derived from the model (bases, head groups): a reloaded cache must derive the same."""

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> Store: ...


@dataclass(frozen=True)
class Representation:
    """Base of storage formats for tokens older than the full-precision window (frozen parameters).

    Subclasses have a ``residual`` field: the most recent tokens always kept in full precision.

    Class attributes a representation sets:
        takes_inner: it transforms tokens (e.g. into low-rank latents) and can hand them to a second,
            plain representation that stores them, as in ``lowrank+kivi``.
        standalone: its stores are shared between layers (``share_layers``), so it combines with
            no other method.
    """

    name: ClassVar[str]
    takes_inner: ClassVar[bool] = False
    standalone: ClassVar[bool] = False

    def prepare(self, model, inner: Storage | None = None) -> Storage:
        """The storage of this representation for ``model``; ``inner`` stores its output (``takes_inner``).

        Raises:
            SpecError: the parameters do not fit the model (e.g. a group that does not divide its head dim).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class LayerView:
    """What a selection sees of one layer when it decides what to keep.

    Attributes:
        valid: ``(B, H, S)`` bool, True for real tokens, in position order per row and head.
        attention: ``(B, H, S)`` float32 attention the layer's slots received from the queries the
            selection observes (see :attr:`Selection.observe`), or None.
        queries: ``(B, Hq, m, D)`` the queries (after rotary) of the tokens seen since the last
            compression, when :attr:`Selection.queries` asks for them; else None.
        query_positions: ``(B, m)`` their positions.
        budget: ``(B, H, 1)`` tokens kept per head, set at the first compression; None before it.
        layer_idx: index of the layer in the model.
        num_layers: layers in the model.
        dense: rebuilds the slots' full-precision ``(B, H, S, D)`` keys and values (read through
            :attr:`keys` and :attr:`values`, built once and only if a scorer asks).
        rotary: the model's :class:`kvcompress.calibration.Rotary`, for scorers that undo or extrapolate
            rotary embeddings; None for a model without one.
        expected: ``(B,)`` tokens of the context being prefilled in chunks (see
            :attr:`kvcompress.step.StepInputs.expected`), or None.
        head_scores: ``(L, H)`` the model's retrieval-head scores, when the selection asks for them
            (:attr:`Selection.retrieval_heads`); else None.
        allotted: ``(B, H, 1)`` tokens each head keeps at the first compression, from a model-wide
            allocation (:meth:`Selection.allot`); None when the selection sets the layer's budget itself.
    """

    valid: torch.Tensor
    attention: torch.Tensor | None
    queries: torch.Tensor | None
    query_positions: torch.Tensor | None
    budget: torch.Tensor | None
    layer_idx: int
    num_layers: int
    dense: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    rotary: object | None = None
    expected: torch.Tensor | None = None
    head_scores: torch.Tensor | None = None
    allotted: torch.Tensor | None = None

    @cached_property
    def _dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dense()

    @property
    def keys(self) -> torch.Tensor:
        return self._dense[0]

    @property
    def values(self) -> torch.Tensor:
        return self._dense[1]


@dataclass(frozen=True)
class Selected:
    """A selection's decision: ``keep`` ``(B, H, S)`` bool (None: keep all), the layer's ``budget``, and
    ``quiet``: how many more tokens the layer may take before the selection could evict anything; until
    then the layer does not ask (None: ask at the next step)."""

    keep: torch.Tensor | None
    budget: torch.Tensor | None = None
    quiet: int | None = None


@dataclass(frozen=True)
class Selection:
    """Base of eviction policies (frozen parameters): return the slots a layer keeps.

    Properties a selection overrides:
        observe: how many of each step's latest queries the layer turns into attention weights for
            :attr:`LayerView.attention` (0: none, -1: all).
        queries: whether :attr:`LayerView.queries` must hold the queries seen since the last compression.
        accumulate: keep the observed attention across compressions (H2O), instead of restarting it.
        ragged: the heads of a layer keep different numbers of tokens; the layer then stores each
            head's tokens apart, so no padding slot is held.
        block: new tokens that may collect before the selection evicts again (1: at every step).
        replay: tokens of the context per chunk of a replay (KVzip), 0 for none: after the context is
            prefilled, it is fed again in chunks, each after :meth:`replay_prompt`, as queries only
            (:attr:`LayerView.attention` is then the most attention each slot received from them),
            and only then is the context compressed; the replayed tokens are never kept.
        retrieval_heads: it needs the model's retrieval-head scores (:attr:`LayerView.head_scores`),
            from the model's calibration.
        replay_norms: weigh the replay's attention by the norm of what each slot adds to the output
            (``|W_O v|``) over the norm of the replayed token's attention input (KVzip+).
    """

    name: ClassVar[str]
    accumulate: ClassVar[bool] = False

    @property
    def observe(self) -> int:
        return 0

    @property
    def queries(self) -> bool:
        return False

    @property
    def ragged(self) -> bool:
        return False

    @property
    def block(self) -> int:
        return 1

    @property
    def replay(self) -> int:
        return 0

    @property
    def replay_norms(self) -> bool:
        return False

    @property
    def retrieval_heads(self) -> bool:
        return False

    def replay_prompt(self, first: bool) -> str:
        """The instruction fed before a chunk of the replayed context (``first``: before the first chunk;
        later ones are followed by the end of the chunk before, to say where to resume)."""
        raise NotImplementedError

    def replay_context(self, model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> None:
        """Replay the context ``cache`` holds uncompressed, ``(B, T)`` ``input_ids`` left-padded, through
        ``model`` (inside :func:`kvcompress.attach`), then compress it: called by
        :func:`kvcompress.generation.prefill` when :attr:`replay` is not 0 (see :func:`kvcompress.methods.kvzip.replay`)."""
        raise NotImplementedError

    def replay_step(self, layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs, scaling: float) -> torch.Tensor:
        """One layer's step of a replay (``inputs.replay`` set, see :meth:`replay_context`): the ``(B, Hq, q, D)``
        attention output of the step's tokens over the ``layer``'s held slots, which it scores
        (``layer.scoring``) without storing the tokens (see :func:`kvcompress.methods.kvzip.replay_step`)."""
        raise NotImplementedError

    def allot(self, views: list[LayerView]) -> list[torch.Tensor | None]:
        """After a replay, before the first compression: the ``(B, H, 1)`` tokens each head of each
        layer keeps (:attr:`LayerView.allotted`), when the budget is spread over the whole model from
        every layer's scores; None per layer (the default) lets each layer set its own."""
        return [None] * len(views)

    def select(self, view: LayerView) -> Selected:
        """Choose the slots to keep: a ``(B, H, S)`` bool subset of ``view.valid``, or None for all."""
        raise NotImplementedError
