"""Full-precision K/V storage that grows in place, and stores whose heads hold different tokens.

transformers' ``DynamicCache`` concatenates at every step (a full copy of the layer per token).
:class:`FullPrecisionBuffer` instead reserves capacity in chunks of ``chunk`` tokens and writes new
tokens in place, so attention reads a view with no copy. What it reports as its size is the
capacity it holds, since that is the memory it occupies.

:class:`RaggedStore` holds each KV head of each row in its own inner store (full precision or
quantized), so heads that keep different numbers of tokens (adaptive budgets) hold no padding.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch

from kvcompress.kernels import dense_attend, dense_one_pass_applies, kernel_pair, mask_bytes
from kvcompress.state import state_of
from kvcompress.step import DenseSegment

CHUNK = 64  # default tokens of capacity reserved at a time
RAGGED_CHUNK = 16  # per head of a RaggedStore (a head holds a share of a layer's tokens: less spare room)


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
        tensors = [t for t in (self.k, self.v, self._valid) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

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
            capacity = self.n + new if exact else max(_round_up(self.n + new, self.chunk), reserve)
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
        capacity = _round_up(n + room, self.chunk)
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
        if _round_up(kept + headroom, self.chunk) < capacity or self.n + room > capacity:
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


class RaggedStore:
    """Tokens of one layer whose heads hold different numbers of them, each head in its own store.

    One inner store per row and KV head (``(1, 1, n_bh, D)``, made by ``new_store``: a
    :class:`FullPrecisionBuffer`, or a quantized store for ``adakv+kivi``), so nothing is held for
    the heads that keep fewer tokens than the longest. Attention reads one :class:`RaggedSegment`
    (per-head logits and mixing; no padded copy of the keys or values). Implements the
    :class:`kvcompress.protocols.Store` protocol, except that :meth:`append` takes, per head, the
    tokens its ``valid`` marks: a multiple of ``block`` in every head.
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
        joined = self._valid.numel() if isinstance(self._valid, torch.Tensor) else 0  # the heads' validity, once worked out
        return sum(s.nbytes for row in self.rows for s in row) + joined

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
                inner = self.rows[b][h]
                if not k.shape[2]:
                    continue
                if isinstance(inner, FullPrecisionBuffer):  # a head's first tokens (a prompt's cut) get no spare room
                    inner.append(k, v, None, None, exact=not len(inner))
                else:
                    inner.append(k, v, None, None)
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
        (padded with 0 past a head's length). A full-precision head only masks what it drops while
        that frees no chunk of its capacity (:meth:`FullPrecisionBuffer.drop`): a decode step that
        evicts a token then moves nothing, where compacting would copy every head it holds."""
        self._changed()
        indices = []
        for b, row in enumerate(self.rows):
            for h, s in enumerate(row):
                if not len(s):
                    indices.append(keep.new_zeros(0, dtype=torch.long))
                    continue
                mine = keep[b, h, : len(s)][None, None]
                if isinstance(s, FullPrecisionBuffer):
                    indices.append(s.drop_index(mine, room=self.block, headroom=self.block)[0, 0])
                else:
                    indices.append(s.compact(mine)[0, 0])
        n = max((len(i) for i in indices), default=0)
        index = torch.zeros(len(indices), n, dtype=torch.long, device=keep.device)
        for i, kept in enumerate(indices):
            index[i, : len(kept)] = kept
        return index.view(keep.shape[0], keep.shape[1], n)

    def map_batch(self, fn) -> None:
        if not self.rows:
            return
        order = fn(torch.arange(len(self.rows))).tolist()  # the old row of every new row
        seen, rows = set(), []
        for i in order:  # a row used twice (repeat_interleave) gets its own copy
            rows.append(self.rows[i] if i not in seen else copy.deepcopy(self.rows[i]))
            seen.add(i)
        self.rows = rows
        self._changed()


class RaggedSegment:
    """Per-head segments of a :class:`RaggedStore` (None for an empty head): logits and mixing one head
    at a time, padded to the longest head only in the ``(B, H, G, S)`` weights (the padding is masked
    by the store's validity)."""

    dense_only = False

    def __init__(self, rows: list[list], length: int):
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.length

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
        """One decode query per row over ``[these heads | window]`` in one kernel call
        (``kvcompress::dense_attend``), each head read where it is held: ``(B, H, G, D)`` grouped queries ->
        ``(B, H, G, D)`` output; the attention each slot received is added to ``observed`` ``(B, H, S)``
        unless it is empty (see :func:`kvcompress.attention.attend_one_pass`). Heads of a kind with its own
        ragged kernel (``adakv+kivi``: KIVI codes, ``attend_heads``) take that kernel instead, again one call.
        None unless the window (which holds the step's token) and the heads are float32 on the CPU or all
        of such a kind, and no head is empty: the caller then takes the segment path."""
        heads = self._heads
        if window is None:
            return None  # the step's own token is the window's last slot
        kind = type(heads[0]) if heads else None
        if hasattr(kind, "attend_heads") and all(type(s) is kind for s in heads):
            return kind.attend_heads(heads, query, window, valid, self.length, scaling, observed)
        held = self._dense_heads
        if held is None or not dense_one_pass_applies(query, window) or held[2] not in (None, query.shape[-1]):
            return None
        keys, values, _ = held
        if any(t is None for t in keys):  # an empty head
            empty = query.new_empty(0, query.shape[-1])
            keys, values = ([t if t is not None else empty for t in ts] for ts in (keys, values))
        window_keys, window_values = kernel_pair(window.keys, window.values)
        return dense_attend(
            query.contiguous(), keys, values, self.length, window_keys, window_values, mask_bytes(valid), scaling, observed
        )

    @functools.cached_property
    def _heads(self) -> list:
        return [s for row in self.rows for s in row]

    @functools.cached_property
    def _dense_heads(self) -> tuple[list, list, int | None] | None:
        """Each head's ``(n, D)`` keys and values as ``dense_attend`` reads them (None for an empty head), and
        their ``D``; None unless every head is float32 full precision on the CPU. Worked out once: a segment
        lives until its store changes, and a decode step that evicts nothing changes nothing."""
        held = [s for s in self._heads if s is not None]
        if not all(isinstance(s, DenseSegment) for s in held):
            return None
        for s in held:
            if s.keys.dtype != torch.float32 or s.values.dtype != torch.float32 or s.keys.device.type != "cpu":
                return None
            if s.values.shape[-1] != s.keys.shape[-1]:
                return None
        keys = [s.keys[0, 0] if s is not None else None for s in self._heads]
        values = [s.values[0, 0] if s is not None else None for s in self._heads]
        return keys, values, held[0].keys.shape[-1] if held else None

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
