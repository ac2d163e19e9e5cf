"""The two axes of a compression pipeline: which tokens to keep, and how the kept ones are stored.

A :class:`Selection` decides, per layer, which cached tokens survive (eviction). A
:class:`Representation` decides how tokens that have left the full-precision window are stored
(quantized, low-rank, ...). Neither knows about the other; :class:`kvcompress.cache.CompressedLayer`
combines them.

Shapes: ``B`` batch, ``H`` KV heads (never the query heads: storage is GQA-native), ``S`` slots held
by a layer, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


class Store(Protocol):
    """Tokens of one layer in a compressed representation, in position order per row.

    A store frees memory in units of ``block`` tokens: eviction inside a block that still holds a
    kept token only marks the evicted token invalid (masked from attention) until the whole block
    goes.
    """

    block: int

    def __len__(self) -> int: ...  # slots held

    @property
    def nbytes(self) -> int: ...  # bytes of every tensor held

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Add ``(B, H, n, D)`` tokens, ``n`` a multiple of ``block``; ``valid`` is ``(B, H, n)`` or None (all)."""

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient ``(B, H, S, D)`` keys and values for attention; never kept."""

    def valid(self) -> torch.Tensor | None:
        """``(B, H, S)`` bool, False for padding or evicted slots; None when every slot is valid."""

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the slots where the ``(B, H, S)`` bool ``keep`` is False, freeing whole blocks.

        Returns the ``(B, H, n)`` old slot index of every slot held afterwards.
        """

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every held tensor (beam reorder, batch select)."""


@dataclass
class LayerView:
    """What a selection sees of one layer when it decides what to keep.

    Attributes:
        valid: ``(B, H, S)`` bool, True for real tokens, in position order per row and head.
        keys: ``(B, H, S, D)`` full-precision keys (transient: dequantized for this decision).
        scores: ``(B, H, S)`` float32 attention the layer accumulated for the selection (see
            :attr:`Selection.observe`), or None.
        layer_idx: index of the layer in the model.
        num_layers: layers in the model.
        state: per-layer dict the selection may keep things in (e.g. its token budget).
    """

    valid: torch.Tensor
    keys: torch.Tensor
    scores: torch.Tensor | None
    layer_idx: int
    num_layers: int
    state: dict


@dataclass
class Selection:
    """Base of eviction policies: return the slots a layer keeps, or None to keep all.

    Class attributes a selection sets:
        observe: how many of each step's latest queries the layer turns into attention weights
            and adds to ``LayerView.scores`` (0: none, -1: all). Needs the ``kvcompress``
            attention implementation, which :func:`kvcompress.make_cache` installs.
        reset_scores: zero the accumulated scores after each eviction (False: accumulate over
            the whole generation, as H2O does).
        ragged: the heads of a layer keep different numbers of tokens (AdaKV); the layer then
            stores its kept tokens flattened per head, so no padding slot is held.
    """

    name: ClassVar[str]
    observe: ClassVar[int] = 0
    reset_scores: ClassVar[bool] = True
    ragged: ClassVar[bool] = False

    def select(self, view: LayerView) -> torch.Tensor | None:
        """Choose the slots to keep: a ``(B, H, S)`` bool subset of ``view.valid``, or None."""
        raise NotImplementedError


@dataclass
class Representation:
    """Base of storage formats for tokens older than the full-precision window.

    Subclasses have a ``residual`` field: the most recent tokens always kept in full precision.

    Class attributes a representation sets:
        takes_inner: it transforms tokens (e.g. into low-rank latents) and can hand them to a second,
            plain representation that stores them, as in ``lowrank+kivi`` (see :meth:`chain`).
        needs_positions: its store's ``append`` takes a ``positions`` keyword, the ``(B, H, n)``
            true sequence positions of the tokens (e.g. to undo rotary embeddings).
        standalone: its stores are shared between layers (``share_layers``), so it combines with
            no other method.
        mixes_latent_values: its store has ``latent_inputs()`` (rebuilt keys, latent values), and the
            ``kvcompress`` attention mixes the values in latent space instead of rebuilding them
            (``lowrank``).
    """

    name: ClassVar[str]
    takes_inner: ClassVar[bool] = False
    needs_positions: ClassVar[bool] = False
    standalone: ClassVar[bool] = False
    mixes_latent_values: ClassVar[bool] = False

    def prepare(self, model) -> None:
        """Called once by :func:`kvcompress.make_cache` with the model, before any store exists."""

    @property
    def fixed_nbytes(self) -> int:
        """Bytes held once per cache whatever its length (e.g. bases), apart from per-token bytes."""
        return 0

    def chain(self, inner: Representation) -> None:
        """Store this representation's output with ``inner``; only where ``takes_inner``."""
        raise ValueError(f"{self.name} stores tokens itself and cannot hand them to {inner.name}")

    def new_store(self, head_dim: int, dtype: torch.dtype, layer_idx: int) -> Store:
        raise NotImplementedError
