"""Stores whose heads hold different numbers of tokens (adaptive budgets: AdaKV, retrieval heads, KVzip),
each (row, KV head) in its own pages.

:class:`RaggedStore` holds one inner store per row and KV head: a :class:`~kvcompress.paged.PagedBuffer`
of one row and one head (full-precision pages of :data:`~kvcompress.pages.PAGE` slots in the layer's
pool) or a quantized store of its own pages (``adakv+kivi``: :class:`~kvcompress.methods.kivi.KIVIStore`).
A head that keeps fewer tokens holds fewer pages, and a head's evicted tokens free whole pages::

    (row 0, head 0) table: [ 3 | 8 | 11 ]       120 slots
    (row 0, head 1) table: [ 5 ]                 20 slots   (padding to 120 never held, never read)
    (row 0, head 2) table: [ 6 | 9 ]             64 slots

Attention reads each head's pages in place through these tables, one kernel call per layer
(:meth:`RaggedSegment.attend_one`: ``kvcompress::paged_attend`` for full precision, the store's own
ragged kernel for codes); other paths read per-head logits and mixes (:class:`RaggedSegment`).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch

from kvcompress.buffer import tensor_bytes
from kvcompress.kernels import dense_one_pass_applies, kernel_pair, page_mask, paged_attend
from kvcompress.paged import PagedSegment, page_addresses
from kvcompress.state import state_of
from kvcompress.step import DenseSegment

RAGGED_CHUNK = 16  # decode tokens a ragged layer's window collects before its heads take theirs


class RaggedStore:
    """Tokens of one layer whose heads hold different numbers of them, each head in its own store (see the
    module docstring).

    One inner store per row and KV head (``(1, 1, n_bh, D)``, made by ``new_store``), so nothing is held
    for the heads that keep fewer tokens than the longest. Implements the
    :class:`kvcompress.protocols.Store` protocol, except that :meth:`append` takes, per head, the tokens its
    ``valid`` marks: a multiple of ``block`` in every head.
    """

    STATE = ("shape",)  # see kvcompress.state; the inner stores are entries "stores.<i>."

    def __init__(self, new_store: Callable[[], object]):
        self.new_store = new_store
        self.block = new_store().block
        self.rows: list[list] = []  # [B][H] inner stores
        self.device = None
        self._changed()

    def _changed(self) -> None:
        """Forget the length, validity and segment worked out from the inner stores (they changed)."""
        self._length: int | None = None
        self._valid: torch.Tensor | None | bool = False  # False: not worked out
        self._segment: RaggedSegment | None = None

    def trim(self) -> None:
        """The inner stores are about to release their spare capacity: forget the segment viewing it."""
        self._changed()

    def __len__(self) -> int:
        if self._length is None:
            self._length = max((len(s) for row in self.rows for s in row), default=0)
        return self._length

    @property
    def nbytes(self) -> int:
        """The heads' stores, and the heads' validity and page tables joined for the layer, once worked out."""
        joined = self._valid.numel() if isinstance(self._valid, torch.Tensor) else 0
        tables = self._segment.nbytes if self._segment is not None else 0
        return sum(s.nbytes for row in self.rows for s in row) + joined + tables

    @property
    def moved(self) -> int:
        """Bytes the heads' stores copied so far (compactions, copy-on-write, split runs)."""
        return sum(getattr(s, "moved", 0) for row in self.rows for s in row)

    @property
    def shape(self) -> str:
        """``"BxH"``: rows and heads held (``"0x0"`` before the first append)."""
        return f"{len(self.rows)}x{len(self.rows[0]) if self.rows else 0}"

    @shape.setter
    def shape(self, value: str) -> None:  # restoring: build the inner stores the entries fill
        batch, heads = map(int, value.split("x"))
        self.rows = [[self.new_store() for _ in range(heads)] for _ in range(batch)]
        self._changed()

    def state(self, prefix: str) -> dict:
        """The inner stores' entries, ``stores.<b * H + h>.``-prefixed (see :mod:`kvcompress.state`)."""
        return {k: v for i, s in enumerate(s for row in self.rows for s in row) for k, v in state_of(s, f"{prefix}stores.{i}.").items()}

    def lengths(self) -> torch.Tensor:
        """``(B, H)`` slots held per head."""
        return torch.tensor([[len(s) for s in row] for row in self.rows], dtype=torch.long)

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None) -> None:
        batch, heads = keys.shape[:2]
        if not self.rows:
            self.rows = [[self.new_store() for _ in range(heads)] for _ in range(batch)]
            self.device = keys.device
        if hasattr(self.rows[0][0], "encode"):  # quantized heads: one quantization per count of tokens taken
            self._encode_by_count(keys, values, valid)
            return
        for b in range(batch):
            for h in range(heads):
                take = slice(None) if valid is None else valid[b, h]
                k, v = keys[b, h, take][None, None], values[b, h, take][None, None]  # (1, 1, n_bh, D)
                if k.shape[2]:
                    self.rows[b][h].append(k, v, None, None)
        self._changed()

    def _encode_by_count(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Append to quantized heads (``encode``/``extend``): the heads that take as many tokens (and hold none
        yet, or some) are encoded together (a decode step's settling has two or three such counts, not a
        quantization per head)."""
        batch, heads, n, dim = keys.shape
        if valid is None:
            valid = torch.ones(batch, heads, n, dtype=torch.bool, device=keys.device)
        counts = valid.sum(-1)  # (B, H)
        empty = torch.tensor([[not len(s) for s in row] for row in self.rows], device=counts.device)  # (B, H) first tokens
        for count in counts.unique().tolist():
            for first in (False, True):
                mine = (counts == count) & (empty == first)  # (B, H) the heads that take `count` tokens
                if not count or not bool(mine.any()):
                    continue
                take = valid & mine[..., None]
                k, v = (t[take].view(1, -1, count, t.shape[-1]) for t in (keys, values))  # (1, heads taking, count, D)
                new = self.rows[0][0].encode(k, v, first=first)
                for i, (b, h) in enumerate(mine.nonzero().tolist()):  # row-major, as the boolean index took them
                    self.rows[b][h].extend({name: t[:, i : i + 1] for name, t in new.items()})
        self._changed()

    def segment(self) -> RaggedSegment:
        """The heads' segments, worked out once per change (a decode step that evicts nothing changes nothing)."""
        if self._segment is None:
            self._segment = RaggedSegment([[s.segment() if len(s) else None for s in row] for row in self.rows], len(self))
        return self._segment

    def valid(self) -> torch.Tensor | None:
        """``(B, H, S)`` validity (the padding of shorter heads is invalid), or None when every slot is
        real; worked out once per change (a decode step reads it twice per layer)."""
        if self._valid is False:
            valid = torch.zeros(len(self.rows), len(self.rows[0]), len(self), dtype=torch.bool, device=self.device)
            for b, row in enumerate(self.rows):
                for h, s in enumerate(row):
                    own = s.valid()
                    valid[b, h, : len(s)] = True if own is None else own[0, 0]
            self._valid = None if bool(valid.all()) else valid
        return self._valid

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the slots where ``keep`` ``(B, H, S)`` is False; return the ``(B, H, n)`` old slot of each
        (padded with 0 past a head's length). A head in pages masks what it drops, frees the pages left
        with no kept slot, and gathers its kept slots into new pages only once masked slots add up to
        :data:`~kvcompress.paged.HOLES` pages (:meth:`~kvcompress.paged.PagedBuffer.drop`): a decode step
        that evicts a token moves nothing."""
        self._changed()
        indices = []
        for b, row in enumerate(self.rows):
            for h, s in enumerate(row):
                if not len(s):
                    indices.append(keep.new_zeros(0, dtype=torch.long))
                    continue
                mine = keep[b, h, : len(s)][None, None]
                if hasattr(s, "drop"):
                    moved = s.drop(mine)
                    indices.append(moved[0, 0] if moved is not None else torch.arange(len(s), device=keep.device))
                else:
                    indices.append(s.compact(mine)[0, 0])
        n = max((len(i) for i in indices), default=0)
        index = torch.zeros(len(indices), n, dtype=torch.long, device=keep.device)
        for i, kept in enumerate(indices):
            index[i, : len(kept)] = kept
        return index.view(keep.shape[0], keep.shape[1], n)

    def map_batch(self, fn) -> None:
        """Reorder, repeat or select rows; a row used twice reads the same pages (a fork of its heads' stores,
        copy-on-write) or, for a store with no pages to share, gets its own copy."""
        if not self.rows:
            return
        order = fn(torch.arange(len(self.rows))).tolist()  # the old row of every new row
        seen, rows = set(), []
        for i in order:
            if i not in seen:
                rows.append(self.rows[i])
            else:
                rows.append([s.fork() if hasattr(s, "fork") else copy.deepcopy(s) for s in self.rows[i]])
            seen.add(i)
        self.rows = rows
        self._changed()

    def unshare(self) -> None:
        """Give every head its own copy of the pages it shares (see ``PagedBuffer.unshare``)."""
        for row in self.rows:
            for s in row:
                if hasattr(s, "unshare"):
                    s.unshare()
        self._changed()


class RaggedSegment:
    """Per-head segments of a :class:`RaggedStore` (None for an empty head): one kernel call per layer
    over every head's pages (:meth:`attend_one`), or logits and mixing one head at a time, padded to the
    longest head only in the ``(B, H, G, S)`` weights (the padding is masked by the store's validity)."""

    dense_only = False

    def __init__(self, rows: list[list], length: int):
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes of the heads' page tables (:attr:`tables`), once worked out (16 per page and head, and 16 per head)."""
        tables = self.__dict__.get("tables")
        return tensor_bytes(*tables[:4]) if tables else 0

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [[s.dense() if s is not None else None for s in row] for row in self.rows]
        k0, v0 = next(kv for row in parts for kv in row if kv is not None)
        keys = k0.new_zeros(len(parts), len(parts[0]), self.length, k0.shape[-1])
        values = v0.new_zeros(len(parts), len(parts[0]), self.length, v0.shape[-1])
        for b, row in enumerate(parts):
            for h, kv in enumerate(row):
                if kv is not None:
                    keys[b, h, : kv[0].shape[2]], values[b, h, : kv[1].shape[2]] = kv[0][0, 0], kv[1][0, 0]
        return keys, values

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        out = query.new_zeros(*query.shape[:3], self.length)  # (B, H, G, S)
        for b, row in enumerate(self.rows):
            for h, s in enumerate(row):
                if s is not None:
                    out[b, h, :, : len(s)] = s.logits(query[b, h][None, None])[0, 0]
        return out

    def attend_one(self, query: torch.Tensor, window: DenseSegment | None, valid: torch.Tensor | None, scaling: float,
                   observed: torch.Tensor) -> torch.Tensor | None:
        """One decode query per row over ``[these heads | window]`` in one kernel call, each head read in
        its pages through its page table (``kvcompress::paged_attend``): ``(B, H, G, D)`` grouped queries ->
        ``(B, H, G, D)`` output; the attention each slot received is added to ``observed`` ``(B, H, S)``
        unless it is empty (see :func:`kvcompress.attention.attend_one_pass`). Heads of a kind with its own
        ragged kernel (``adakv+kivi``: KIVI codes, ``attend_heads``) take that kernel instead, again one call.
        None unless the window (which holds the step's token) and the heads are float32 on the CPU, or all
        of such a kind: the caller then takes the segment path."""
        heads = self._heads
        if window is None:
            return None  # the step's own token is the window's last slot
        kind = type(heads[0]) if heads else None
        if hasattr(kind, "attend_heads") and all(type(s) is kind for s in heads):
            return kind.attend_heads(heads, query, window, valid, self.length, scaling, observed)
        tables = self.tables
        if tables is None or not dense_one_pass_applies(query, window):
            return None
        window_keys, window_values = kernel_pair(window.keys, window.values)
        return paged_attend(
            query.contiguous(), *tables, self.length, window_keys, window_values, page_mask(valid), scaling, observed
        )

    @functools.cached_property
    def _heads(self) -> list:
        return [s for row in self.rows for s in row]

    @functools.cached_property
    def tables(self) -> tuple | None:
        """The heads' page tables as ``kvcompress::paged_attend`` reads them: ``(B * H, J)`` key and value
        page addresses (each head's own, padded to the longest with zeros, never read), ``(B * H,)`` pages
        and slots in the last page per head, and the page size; None unless every held head is float32
        pages on the CPU with keys and values of one head dim. Worked out once, for every head at once: a
        segment lives until its store changes, and a decode step that evicts nothing changes nothing."""
        held = [s for s in self._heads if s is not None]
        if not held or not all(isinstance(s, PagedSegment) for s in held):
            return None
        for s in held:
            _, dim, vdim, _ = s.buffer.shape
            if s.buffer.dtype != torch.float32 or s.buffer.device.type != "cpu" or dim != vdim:
                return None
        tables = [s.buffer.tables[0] if s is not None else [] for s in self._heads]
        keys, values = page_addresses(held[0].buffer.pool, tables, 1)  # (B * H, J) each
        pages = torch.tensor([len(table) for table in tables], dtype=torch.int64)
        fills = torch.tensor([s.fill if s is not None else 0 for s in self._heads], dtype=torch.int64)
        return keys, values, pages, fills, held[0].page

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for b, row in enumerate(self.rows):
            for h, s in enumerate(row):
                if s is not None:
                    mixed = s.mix(weights[b, h, :, : len(s)][None, None])[0, 0]  # (G, D)
                    if out is None:
                        out = mixed.new_zeros(*weights.shape[:3], mixed.shape[-1])
                    out[b, h] = mixed
        return out
