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
        """Add ``(B, H, n, D)`` tokens, ``n`` a multiple of ``block``; ``valid`` is ``(B, n)`` or None (all)."""

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient ``(B, H, S, D)`` keys and values for attention; never kept."""

    def valid(self) -> torch.Tensor | None:
        """``(B, S)`` bool, False for padding or evicted slots; None when every slot is valid."""

    def compact(self, keep: torch.Tensor) -> None:
        """Drop the slots where the ``(B, S)`` bool ``keep`` is False, freeing whole blocks."""

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every held tensor (beam reorder, batch select)."""


@dataclass
class Selection:
    """Base of eviction policies: return the slots a layer keeps, or None to keep all."""

    name: ClassVar[str]

    def select(self, valid: torch.Tensor) -> torch.Tensor | None:
        """Choose the slots to keep.

        Args:
            valid: ``(B, S)`` bool, True for real tokens in position order per row.

        Returns:
            ``(B, S)`` bool keep mask (a subset of ``valid``), or None when nothing is evicted.
        """
        raise NotImplementedError


@dataclass
class Representation:
    """Base of storage formats for tokens older than the full-precision window.

    Subclasses have a ``residual`` field: the most recent tokens always kept in full precision.
    """

    name: ClassVar[str]

    def new_store(self, head_dim: int, dtype: torch.dtype) -> Store:
        raise NotImplementedError
