"""Full-precision K/V storage that grows in place: the window of recent tokens of a layer with a store.

transformers' ``DynamicCache`` concatenates at every step (a full copy of the layer per token).
:class:`FullPrecisionBuffer` instead reserves capacity in chunks of ``chunk`` tokens and writes new
tokens in place, so attention reads a view with no copy. What it reports as its size is the
capacity it holds, since that is the memory it occupies. A window is bounded (a store's residual plus a
block), so what it copies when it grows or settles is too; what a layer holds for long is in pages
(:mod:`kvcompress.paged`, :mod:`kvcompress.ragged`, KIVI's pages).
"""

from __future__ import annotations

import torch

from kvcompress.step import DenseSegment

CHUNK = 64  # default tokens of capacity reserved at a time


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (room reserved a chunk at a time)."""
    return -(-n // multiple) * multiple


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors' elements (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compaction_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (and per-head) gather index that moves kept slots to the front, preserving order.

    Args:
        keep: ``(..., S)`` bool, e.g. ``(B, H, S)``.

    Returns:
        ``index`` ``(..., n)`` with ``n`` the largest kept count of any row, and ``valid``
        ``(..., n)``: rows that keep fewer than ``n`` slots are filled with dropped slots marked
        invalid.
    """
    n = int(keep.sum(-1).max()) if keep.numel() else 0
    # A stable sort of ~keep lists kept slots first, each group in its original order.
    index = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :n]  # (..., n)
    return index, keep.gather(-1, index)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, H, n, D)`` slots ``index`` ``(B, H, n)`` of ``x`` ``(B, H, S, D)``."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[3]))


class FullPrecisionBuffer:
    """Keys and values ``(B, H, capacity, D)`` in the model dtype, plus a ``(B, H, capacity)``
    validity mask while some slot is padding or evicted.

    Implements the :class:`kvcompress.methods.base.Store` protocol with ``block = 1``.
    """

    block = 1
    STATE = ("k", "v", "_valid", "n")  # see kvcompress.state

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.k: torch.Tensor | None = None  # (B, H, capacity, D)
        self.v: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # (B, H, capacity) bool, None: all valid
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.k.shape[:2])

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self._valid)

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None, exact: bool = False,
        reserve: int = 0,
    ) -> None:
        """Write ``(B, H, n, D)`` tokens after the held ones; ``valid`` is ``(B, H, n)`` or None.

        ``exact`` reserves no spare capacity; when the tokens do not fit, the capacity grows to at least
        ``reserve`` slots. ``positions`` is not needed (see the Store protocol).
        """
        batch, heads, new, dim = keys.shape
        if self.k is None or self.n + new > self.k.shape[2]:
            capacity = self.n + new if exact else max(round_up(self.n + new, self.chunk), reserve)
            self._reserve(batch, heads, (dim, values.shape[3]), keys.dtype, keys.device, capacity)
        self.k[:, :, self.n : self.n + new] = keys
        self.v[:, :, self.n : self.n + new] = values
        if valid is not None and not bool(valid.all()):
            if self._valid is None:
                self._valid = torch.ones(batch, heads, self.k.shape[2], dtype=torch.bool, device=keys.device)
            self._valid[:, :, self.n : self.n + new] = valid
        elif self._valid is not None:
            self._valid[:, :, self.n : self.n + new] = True
        self.n += new

    def _reserve(self, batch, heads, dims, dtype, device, capacity) -> None:
        k = torch.empty(batch, heads, capacity, dims[0], dtype=dtype, device=device)
        v = torch.empty(batch, heads, capacity, dims[1], dtype=dtype, device=device)  # values may be narrower
        if self.n:
            k[:, :, : self.n] = self.k[:, :, : self.n]
            v[:, :, : self.n] = self.v[:, :, : self.n]
        if self._valid is not None:
            valid = torch.ones(batch, heads, capacity, dtype=torch.bool, device=device)
            valid[:, :, : self.n] = self._valid[:, :, : self.n]
            self._valid = valid
        self.k, self.v = k, v

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def trim(self) -> None:
        """Release the capacity reserved beyond the held tokens (a context at rest needs none)."""
        if self.k is not None and self.k.shape[2] > self.n:
            self.k, self.v = self.k[:, :, : self.n].clone(), self.v[:, :, : self.n].clone()
            if self._valid is not None:
                self._valid = self._valid[:, :, : self.n].clone()

    def segment(self) -> DenseSegment:
        return DenseSegment(*self.keys_values())

    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, :, : self.n]

    def compact(self, keep: torch.Tensor, in_place: bool = False, room: int = 0) -> torch.Tensor:
        """Keep the slots where ``keep`` ``(B, H, S)`` is True; return the ``(B, H, n)`` old slot of each.

        The capacity becomes the kept count plus ``room`` (tokens about to arrive), rounded up to a
        chunk: freed memory is released, and the next tokens fit without reallocating. ``in_place``
        reuses the storage when its capacity is already that, for callers that hold no view of it
        (views from :meth:`keys_values` would then see the compacted tokens): a decode loop that
        evicts about as many tokens as it adds (H2O, TOVA) then never reallocates.
        """
        index, valid = compaction_index(keep)  # (B, H, n)
        batch, heads, n = index.shape
        k, v = gather_slots(self.k[:, :, : self.n], index), gather_slots(self.v[:, :, : self.n], index)  # (B, H, n, D)
        capacity = round_up(n + room, self.chunk)
        self.n = 0
        self._valid = None
        if not in_place or self.k.shape[:2] != (batch, heads) or capacity != self.k.shape[2]:
            self._reserve(batch, heads, (k.shape[3], v.shape[3]), k.dtype, k.device, capacity)
        self.append(k, v, valid)
        return index

    def drop(self, keep: torch.Tensor, room: int, headroom: int = 0) -> torch.Tensor | None:
        """Drop the slots where ``keep`` ``(B, H, S)`` is False, moving nothing when that frees nothing.

        While the kept tokens need the capacity held anyway and ``room`` more tokens still fit, the
        dropped slots are only marked invalid (attention masks them): a decode loop that evicts a
        token per step (streaming, H2O, TOVA) then copies nothing until the buffer is full, and is
        compacted about once a chunk. A compaction leaves ``headroom`` slots free (a decode loop's next
        tokens; 0 for a prompt just cut to its budget, which then holds no more than it needs), so
        the next tokens never force a reallocation that the next eviction would undo. Returns the
        ``(B, H, n)`` old slot of each slot held afterwards, or None when slots did not move.
        """
        capacity = self.k.shape[2]
        kept = int(keep.sum(-1).max())
        if round_up(kept + headroom, self.chunk) < capacity or self.n + room > capacity:
            return self.compact(keep, in_place=True, room=headroom)
        if self._valid is None:
            self._valid = torch.ones(*self.k.shape[:3], dtype=torch.bool, device=self.k.device)
        self._valid[:, :, : self.n] = keep
        return None

    def drop_index(self, keep: torch.Tensor, room: int, headroom: int = 0) -> torch.Tensor:
        """:meth:`drop`, returning the ``(B, H, n)`` old slot of each slot held afterwards also when
        nothing moved (then ``0 .. n - 1``)."""
        moved = self.drop(keep, room, headroom)
        return moved if moved is not None else torch.arange(self.n, device=keep.device).expand(*keep.shape[:2], -1)

    def take_front(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Remove and return the oldest ``count`` slots (keys, values, valid)."""
        k, v = self.keys_values()
        valid = self.valid()
        front = (k[:, :, :count].clone(), v[:, :, :count].clone(), None if valid is None else valid[..., :count].clone())
        rest_valid = None if valid is None else valid[..., count:]
        rest_k, rest_v = k[:, :, count:], v[:, :, count:]
        self.k = self.v = self._valid = None
        self.n = 0
        if rest_k.shape[2]:
            self.append(rest_k, rest_v, rest_valid, exact=True)
        return front

    def map_batch(self, fn) -> None:
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)
        if self._valid is not None:
            self._valid = fn(self._valid)
