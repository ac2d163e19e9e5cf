"""Full-precision K/V storage that grows in place, the way a decode loop wants it.

transformers' ``DynamicCache`` concatenates at every step (a full copy of the layer per token). This
buffer instead reserves capacity in chunks of ``chunk`` tokens and writes new tokens in place, so
attention reads a view with no copy. Compaction (eviction) reallocates to the exact size. What it
reports as its size is the capacity it holds, since that is the memory it occupies.
"""

from __future__ import annotations

import torch

CHUNK = 64  # default tokens of capacity reserved at a time


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.k: torch.Tensor | None = None  # (B, H, capacity, D)
        self.v: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # (B, H, capacity) bool, None: all valid
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.k, self.v, self._valid) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, exact: bool = False) -> None:
        """Write ``(B, H, n, D)`` tokens after the held ones; ``valid`` is ``(B, H, n)`` or None.

        ``exact`` reserves no spare capacity.
        """
        batch, heads, new, dim = keys.shape
        if self.k is None or self.n + new > self.k.shape[2]:
            capacity = self.n + new if exact else _round_up(self.n + new, self.chunk)
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

    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, :, : self.n]

    def compact(self, keep: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Keep the slots where ``keep`` ``(B, H, S)`` is True; return the ``(B, H, n)`` old slot of each.

        The capacity becomes the kept count rounded up to a chunk: freed memory is released, and the
        next tokens fit without reallocating. ``in_place`` reuses the storage when its capacity is
        already that, for callers that hold no view of it (views from :meth:`keys_values` would
        then see the compacted tokens): a decode loop that evicts about as many tokens as it adds
        (H2O, TOVA) then never reallocates.
        """
        index, valid = compaction_index(keep)  # (B, H, n)
        batch, heads, n = index.shape
        k, v = gather_slots(self.k[:, :, : self.n], index), gather_slots(self.v[:, :, : self.n], index)  # (B, H, n, D)
        if not in_place or self.k.shape[:2] != (batch, heads) or _round_up(n, self.chunk) != self.k.shape[2]:
            self.k = self.v = None  # reallocated by append below
        self.n = 0
        self._valid = None
        self.append(k, v, valid)
        return index

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


class RaggedBuffer:
    """Full-precision K/V whose heads hold different numbers of tokens, stored without padding.

    The tokens of every (row, head) are concatenated, row-major, into ``(T, D)`` tensors, ``T``
    the total tokens held, with a ``(B, H)`` count per head; nothing is reserved for the heads that
    hold fewer tokens than the longest. Attention reads a transient padded ``(B, H, n, D)`` view,
    ``n`` the longest head, with a validity mask (as a quantized store dequantizes for attention).

    Implements the :class:`kvcompress.methods.base.Store` protocol with ``block = 1``; it is filled
    by :meth:`assign` when a layer is compressed, not by ``append``.
    """

    block = 1

    def __init__(self):
        self.k: torch.Tensor | None = None  # (T, D)
        self.v: torch.Tensor | None = None  # (T, Dv)
        self.lengths: torch.Tensor | None = None  # (B, H) int64 tokens held per head

    def __len__(self) -> int:
        return int(self.lengths.max()) if self.lengths is not None and self.lengths.numel() else 0

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.k, self.v, self.lengths) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def assign(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Hold exactly the slots of ``(B, H, S, D)`` keys/values where ``keep`` ``(B, H, S)`` is True,
        in order; return the ``(B, H, n)`` old slot index of each padded slot held afterwards."""
        index, valid = compaction_index(keep)  # (B, H, n)
        self.k, self.v = gather_slots(keys, index)[valid], gather_slots(values, index)[valid]  # (T, D)
        self.lengths = valid.sum(-1)  # (B, H)
        return index

    def _mask(self) -> torch.Tensor:
        slot = torch.arange(len(self), device=self.lengths.device)
        return slot < self.lengths[..., None]  # (B, H, n)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self._mask()
        keys = self.k.new_zeros(*mask.shape, self.k.shape[1])
        values = self.v.new_zeros(*mask.shape, self.v.shape[1])
        keys[mask], values[mask] = self.k, self.v
        return keys, values

    def valid(self) -> torch.Tensor | None:
        if self.lengths is None or bool((self.lengths == len(self)).all()):
            return None
        return self._mask()

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        return self.assign(*self.keys_values(), keep & self._mask())

    def map_batch(self, fn) -> None:
        if self.lengths is not None:
            keys, values = self.keys_values()
            self.assign(fn(keys), fn(values), fn(self._mask()))
