"""Full-precision keys and values held in pages: the store of a layer that evicts (or keeps) tokens as
they are, with no other representation (``none``, StreamingLLM, H2O, SnapKV, TOVA, ... with a
uniform or pyramid allocation).

Each row of the batch has a page table: the ids, in slot order, of pages of :data:`~kvcompress.pages.PAGE`
slots, each page one ``(H, P, D)`` key tensor and one value tensor of the model dtype, held in a
:class:`~kvcompress.pages.PagePool`. Slot ``s`` of a row is slot ``s % P`` of its page ``s // P``;
every row holds the same number of slots (padding and evicted slots are masked by a ``(B, H, S)``
validity mask, held only while some slot is masked)::

    row 0 table: [ 7 | 2 | 9 ]      pool.data[7] = (k (H, P, D), v (H, P, D))
    row 1 table: [ 4 | 5 | 8 ]      slots 0 .. 2P + fill - 1; the last page filled up to `fill`

What moves, and what does not:

- a new token is written into the last page; a full last page gets a new page after it: no copy;
- eviction masks slots; a page whose slots are all masked in every row (a sliding window's oldest)
  is taken out of the tables and freed: no copy (the mask, one byte per slot and head, shifts);
- when masked slots add up to two pages, the kept slots are gathered into new pages (a compaction:
  every kept token moved once, about once per ``2 P`` tokens evicted one at a time); a prompt cut to
  its budget is compacted at once, so a context at rest holds exactly its pages;
- a fork shares the pages (:meth:`PagedBuffer.fork`, one more reference each); a shared page is
  copied before it is written (copy-on-write), so a fork holds no bytes of its own until it writes.

Attention reads the pages where they are: :func:`kvcompress.kernels.paged_attend` (one C call per
layer and decode step over each row's page table) or, for the reference and for scorers, the slots
gathered into ``(B, H, S, D)`` by :meth:`PagedSegment.dense`.
"""

from __future__ import annotations

import weakref

import torch

from kvcompress import native
from kvcompress.buffer import compaction_index
from kvcompress.kernels import (
    NO_MASK,
    NO_OBSERVATION,
    NO_WINDOW,
    dense_one_pass_applies,
    kernel_pair,
    page_mask,
    paged_attend,
    paged_kernel_reads,
    paged_one_pass_applies,
)
from kvcompress.pages import PagePool
from kvcompress.step import GatheredSegment

HOLES = 2  # pages' worth of masked slots that make a layer compact its pages
TRIM_BYTES = 1 << 20  # a compaction that frees this much hands the C heap's free memory back (native.trim_heap)


class PagedBuffer:
    """Keys and values of one layer in pages (see the module docstring); the window of a layer with no
    other storage. Implements :class:`kvcompress.protocols.Store` with ``block = 1``, plus ``drop`` and
    ``fork``.

    Attributes:
        tables: ``[B]`` lists of page ids, in slot order.
        n: slots held per row (``(len(table) - 1) * P + fill``).
        moved: bytes of keys and values copied so far by compactions and copy-on-write (a decode step's
            own new token is not counted): what a test of the bytes a step moves reads.
    """

    block = 1
    STATE = ("k", "v", "_valid", "n")  # saved as FullPrecisionBuffer's entries: the file format is unchanged

    def __init__(self, pool: PagePool | None = None, extents: bool = False, addressed: bool = True):
        self.pool = pool if pool is not None else PagePool()
        self.extents = extents  # pages written together share one allocation (see _new_pages)
        self.addressed = addressed  # keeps its kernel addresses (False: a ragged head's, which its store joins)
        self.page = self.pool.page
        self._tables: list[list[list[int]]] = [[]]  # [the tables]: what the finalizer releases
        # A buffer dropped without release() (a fork whose answer is done) gives its pages back when collected:
        # the pool is shared with the context it was forked from, which may live on in a server for hours.
        weakref.finalize(self, _release_tables, self.pool, self._tables)
        self.n = 0
        self.shape: tuple[int, int, int, int] | None = None  # (H, D, Dv) and the dtype's element size
        self.dtype = self.device = None
        self._valid: torch.Tensor | None = None  # (B, H, capacity) bool, None: every slot real
        self.borrowed: set[int] = set()  # pages read from the buffer this one was forked from
        self.moved = 0
        self.pointers: tuple[torch.Tensor, torch.Tensor] | None = None  # (B * H, J) int64 page addresses (see _changed)

    @property
    def tables(self) -> list[list[int]]:
        return self._tables[0]

    @tables.setter
    def tables(self, tables: list[list[int]]) -> None:
        self._tables[0] = tables

    # ---- what is held ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    @property
    def batch_heads(self) -> tuple[int, int]:
        return len(self.tables), self.shape[0]

    @property
    def page_bytes(self) -> int:
        heads, dim, vdim, size = self.shape
        return heads * self.page * (dim + vdim) * size

    @property
    def nbytes(self) -> int:
        """Bytes of the pages this buffer holds and did not borrow, of its page tables (the kernels'
        addresses) and of its validity mask."""
        own = {page for table in self.tables for page in table if page not in self.borrowed}
        extra = sum(t.numel() * t.element_size() for t in (self._valid, *(self.pointers or ())) if t is not None)
        if not self.extents:
            return len(own) * self.page_bytes + extra
        held = {s.data_ptr(): s.nbytes() for page in own for s in (t.untyped_storage() for t in self._kv(page))}
        return sum(held.values()) + extra  # an allocation is held whole while any page of it is

    @property
    def held_pages(self) -> int:
        """Pages this buffer holds and did not borrow (a page shared by its rows counts once)."""
        return len({page for table in self.tables for page in table if page not in self.borrowed})

    def _kv(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.data[page]

    def _fill(self) -> int:
        """Slots used in the last page of each row."""
        return self.n - (len(self.tables[0]) - 1) * self.page if self.tables and self.tables[0] else 0

    def _changed(self) -> None:
        """The page tables changed: work out the addresses the kernel reads each page of each (row, head) at,
        ``(B * H, J)`` int64 for keys and for values (16 bytes per page and head, held with the tables)."""
        if not self.n or not self.addressed:
            self.pointers = None
            return
        self.pointers = page_addresses(self.pool, self.tables, self.shape[0])

    # ---- writing --------------------------------------------------------------------------------

    def _new_pages(self, count: int) -> list[int]:
        """``count`` new zeroed pages (a saved page's unwritten slots are the same in every file). With
        ``extents``, pages asked for together are one allocation, each head's pages one after the other
        (``(H, count, P, D)``, a page the slice ``[:, i]``), so the kernel reads a head's slots as one run of
        memory; the allocation is freed with its last page. Otherwise each page is its own."""
        heads, dim, vdim, _ = self.shape
        ids = self.pool.allocate(count, self.page_bytes)
        together = count if self.extents else 1
        for first in range(0, count, together):
            keys = torch.zeros(heads, together, self.page, dim, dtype=self.dtype, device=self.device)
            values = torch.zeros(heads, together, self.page, vdim, dtype=self.dtype, device=self.device)
            for i, page in enumerate(ids[first : first + together]):
                self.pool.data[page] = (keys[:, i], values[:, i])
        return ids

    def _writable_last(self, row: int) -> bool:
        """Copy the last page of ``row`` first if another buffer reads it (copy-on-write); True if it did."""
        table = self.tables[row]
        last = table[-1]
        if not self.pool.shared(last) and last not in self.borrowed:
            return False
        (page,) = self._new_pages(1)
        fill = self._fill()
        for new, old in zip(self._kv(page), self._kv(last)):
            new[:, :fill] = old[:, :fill]
        self.moved += fill * self.page_bytes // self.page
        self.pool.release([last])
        self.borrowed.discard(last)
        table[-1] = page
        return True

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None, exact=False, reserve=0) -> None:
        """Write ``(B, H, n, D)`` tokens after the held ones; ``valid`` is ``(B, H, n)`` or None. ``positions``,
        ``exact`` and ``reserve`` are the buffer's protocol; pages need none of them."""
        batch, heads, new, dim = keys.shape
        if self.shape is None:
            self.shape = (heads, dim, values.shape[3], keys.element_size())
            self.dtype, self.device = keys.dtype, keys.device
        if not self.tables:
            self.tables = [[] for _ in range(batch)]
        start, written, changed = self._fill(), 0, self.pointers is None
        room = self.page - start if self.tables[0] else 0  # slots left in the last page
        fresh = -(-max(0, new - room) // self.page)  # new pages per row, asked for together
        pages = [iter(self._new_pages(fresh)) for _ in range(batch)] if fresh else []
        while written < new:
            if not self.tables[0] or start == self.page:
                for table, row in zip(self.tables, pages):
                    table.append(next(row))
                start, changed = 0, True
            elif written == 0:
                for b in range(batch):
                    changed = self._writable_last(b) or changed
            take = min(self.page - start, new - written)
            for b, table in enumerate(self.tables):
                k, v = self._kv(table[-1])
                k[:, start : start + take] = keys[b, :, written : written + take]
                v[:, start : start + take] = values[b, :, written : written + take]
            start, written = start + take, written + take
        self.n += new
        self._mask(valid, self.n - new, new)
        if changed:
            self._changed()

    def _mask(self, valid: torch.Tensor | None, at: int, new: int) -> None:
        """Record the validity of ``new`` slots from ``at`` (None: all real)."""
        real = valid is None or bool(valid.all())
        if real and self._valid is None:
            return
        capacity = len(self.tables[0]) * self.page  # the mask spans the pages held
        if self._valid is None or self._valid.shape[-1] != capacity:
            mask = torch.ones(*self.batch_heads, capacity, dtype=torch.bool, device=self.device)
            if self._valid is not None:
                mask[..., : at] = self._valid[..., : at]
            self._valid = mask
        self._valid[..., at : at + new] = True if real else valid

    # ---- reading --------------------------------------------------------------------------------

    def segment(self) -> PagedSegment:
        return PagedSegment(self)

    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[..., : self.n]

    def keys_values(self, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's ``(B, H, n, D)`` keys and values, gathered from the pages (a copy); ``whole``: every
        page's slots, the last page's unwritten ones too."""
        heads, dim, vdim, _ = self.shape
        if not self.n:
            empty = torch.empty(len(self.tables), heads, 0, dim, dtype=self.dtype, device=self.device)
            return empty, empty.new_empty(*empty.shape[:3], vdim)
        end = None if whole else self.n
        k = torch.stack([torch.cat([self._kv(p)[0] for p in table], 1)[:, :end] for table in self.tables])
        v = torch.stack([torch.cat([self._kv(p)[1] for p in table], 1)[:, :end] for table in self.tables])
        return k, v  # (B, H, n, D)

    @property
    def k(self) -> torch.Tensor | None:  # saved entries (see STATE): whole pages, so a file holds what memory does
        return self.keys_values(whole=True)[0] if self.shape is not None else None

    @property
    def v(self) -> torch.Tensor | None:
        return self.keys_values(whole=True)[1] if self.shape is not None else None

    def restore(self, state: dict, prefix: str = "") -> None:
        """Fill an empty buffer from the entries :data:`STATE` names (as saved by this class or by
        :class:`~kvcompress.buffer.FullPrecisionBuffer`)."""
        k, v, valid, n = (state[f"{prefix}{name}"] for name in self.STATE)
        if k is None:
            return
        k, v = k[:, :, :n], v[:, :, :n]
        self.append(k, v, None if valid is None else valid[..., :n])

    # ---- evicting -------------------------------------------------------------------------------

    def drop(self, keep: torch.Tensor, compact: bool = False) -> torch.Tensor | None:
        """Drop the slots where ``keep`` ``(B, H, S)`` is False: mask them and free the pages none of whose
        slots is kept, or compact (``compact``: a prompt or a chunk cut to its budget, which then holds
        exactly its pages; or once masked slots add up to :data:`HOLES` pages). Returns the ``(B, H, n)``
        old slot of each slot held afterwards, or None when no slot moved."""
        if compact or self.n - int(keep.sum(-1).max()) >= HOLES * self.page:
            return self.compact(keep)
        if self._valid is None:
            self._mask(keep, 0, self.n)
        else:
            self._valid[..., : self.n] = keep
        return self._free_empty_pages(keep)

    def _free_empty_pages(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Take the pages with no kept slot in any row out of the tables (never the last: it takes the
        next tokens), shift the mask over them, and free them."""
        full = len(self.tables[0]) - 1
        if full < 1:
            return None
        used = keep[..., : full * self.page].unflatten(-1, (full, self.page)).any(-1).any(1).any(0)  # (full,)
        if bool(used.all()):
            return None
        empty = (~used).nonzero().flatten().tolist()
        slots = torch.arange(self.n, device=keep.device).view(-1)
        stays = torch.ones(self.n, dtype=torch.bool, device=keep.device)
        for j in empty:
            stays[j * self.page : (j + 1) * self.page] = False
        index = slots[stays]  # (n') old slot of each slot kept in place
        for table in self.tables:
            gone = [table[j] for j in empty]
            for j in reversed(empty):
                del table[j]
            self.pool.release(gone)
            self.borrowed.difference_update(gone)
        self.n = len(index)
        kept = self._valid[..., index]  # (B, H, n'): a byte per slot and head is all that moves
        self._valid = None
        self._mask(kept, 0, self.n)
        self._changed()
        return index.expand(*self.batch_heads, -1)

    def compact(self, keep: torch.Tensor, in_place: bool = False, room: int = 0) -> torch.Tensor:
        """Gather the slots where ``keep`` ``(B, H, S)`` is True into new pages, in order, and free the old
        ones; return the ``(B, H, n)`` old slot of each. ``in_place`` and ``room`` are the buffer
        protocol's (new pages are always exact)."""
        index, valid = compaction_index(keep)  # (B, H, n)
        keys, values = self.keys_values()
        dim = keys.shape[-1]
        k = keys.gather(2, index[..., None].expand(*index.shape, dim))
        v = values.gather(2, index[..., None].expand(*index.shape, values.shape[-1]))
        self.moved += k.numel() * k.element_size() + v.numel() * v.element_size()
        before = len(self.pool)
        self.clear()
        self.append(k, v, valid)
        if (before - len(self.pool)) * self.page_bytes >= TRIM_BYTES:  # a prompt cut: return what it freed
            native.trim_heap()
        return index

    def clear(self) -> None:
        """Release every page and forget the mask."""
        for table in self.tables:
            self.pool.release(table)
        self.tables = [[] for _ in self.tables]
        self.borrowed.clear()
        self.n, self._valid = 0, None
        self._changed()

    def trim(self) -> None:
        """Nothing to release: pages hold no room beyond the last page's, and the mask spans the pages."""

    # ---- rows -----------------------------------------------------------------------------------

    def fork(self, copies: int = 1) -> PagedBuffer:
        """A buffer whose row ``r`` reads this one's row ``r // copies`` from the same pages (one more
        reference each, no copy); whichever writes a shared page copies it first."""
        fork = PagedBuffer(self.pool, self.extents, self.addressed)
        fork.shape, fork.dtype, fork.device, fork.n = self.shape, self.dtype, self.device, self.n
        fork.tables = [list(table) for table in self.tables for _ in range(copies)]
        for table in fork.tables:
            self.pool.share(table)
        fork.borrowed = {page for table in fork.tables for page in table}
        if self._valid is not None:
            fork._valid = self._valid.repeat_interleave(copies, 0)
        fork._changed()
        return fork

    def unshare(self) -> None:
        """Give every row its own copy of each page it reads with another row or buffer: the pages that
        distinct sequences would hold (a benchmark's batch of one repeated context)."""
        for table in self.tables:
            slots = [i for i, page in enumerate(table) if self.pool.shared(page) or page in self.borrowed]
            for i, copy in zip(slots, self._new_pages(len(slots)) if slots else []):  # a row's copies together
                for new, old in zip(self._kv(copy), self._kv(table[i])):
                    new.copy_(old)
                self.moved += self.page_bytes
                self.pool.release([table[i]])
                table[i] = copy
        self.borrowed.clear()
        self._changed()

    def map_batch(self, fn) -> None:
        """Reorder, repeat or select rows (``fn`` on the batch dimension): rows used twice share their pages."""
        if not self.tables:
            return
        order = fn(torch.arange(len(self.tables))).tolist()  # the old row of every new row
        tables = [list(self.tables[i]) for i in order]
        for table in tables:
            self.pool.share(table)
        for table in self.tables:
            self.pool.release(table)
        self.tables = tables
        if self._valid is not None:
            self._valid = fn(self._valid)
        self._changed()

    def release(self) -> None:
        """Give every page back to the pool (the buffer is done)."""
        self.clear()


def _release_tables(pool: PagePool, held: list[list[list[int]]]) -> None:
    for table in held[0]:
        pool.release(table)


class PagedSegment(GatheredSegment):
    """What attention reads of a :class:`PagedBuffer`: its pages through the rows' page tables
    (:meth:`pointers`, for :func:`kvcompress.kernels.paged_attend`) or gathered (:meth:`dense`, once per
    segment: a segment lives for one step)."""

    def __init__(self, buffer: PagedBuffer):
        self.buffer = buffer

    def __len__(self) -> int:
        return self.buffer.n

    @property
    def page(self) -> int:
        return self.buffer.page

    @property
    def fill(self) -> int:
        """Slots used in each row's last page."""
        return self.buffer._fill()

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer.keys_values()

    def attend_one(self, query: torch.Tensor, window, valid: torch.Tensor | None, scaling: float,
                   observed: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor | None:
        """One decode query per row over ``[these pages | window]`` (a store in pages, then a layer's
        full-precision window) in one ``kvcompress::paged_attend`` call: ``(B, H, G, D)`` grouped queries ->
        ``(B, H, G, D)`` output; adds the attention each slot received to ``observed`` unless it is empty.
        ``heads``: the ``(H,)`` stored head each of the query's KV heads reads (``share_heads``' groups), or
        None for its own. None where the kernel does not read them (the caller then takes the segment path)."""
        if window is None or not paged_one_pass_applies(query, self) or not dense_one_pass_applies(query, window):
            return None
        tables = (*self.pointers(), *self.page_counts())  # (B * stored heads, ...) each
        if heads is not None:
            tables = tuple(t.unflatten(0, (query.shape[0], -1))[:, heads].flatten(0, 1) for t in tables)
        window_keys, window_values = kernel_pair(window.keys, window.values)
        return paged_attend(
            query.contiguous(), *tables, self.page, len(self), window_keys, window_values, page_mask(valid), scaling, observed,
        )

    def page_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * H,)`` int64 pages and slots in the last page of each (row, head), as the C kernel reads
        them: every row of a buffer holds the same slots."""
        count, pages = self.buffer.pointers[0].shape
        return torch.full((count,), pages, dtype=torch.int64), torch.full((count,), self.fill, dtype=torch.int64)

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * H, J)`` int64 addresses of each (row, head)'s ``(P, D)`` keys and values in each of its ``J``
        pages, as the C kernel reads them (the buffer's page tables)."""
        return self.buffer.pointers


def page_addresses(pool: PagePool, tables: list[list[int]], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N * H, J)`` int64 addresses of each (row, head)'s ``(P, D)`` keys and values in each page of its
    table, as :func:`kvcompress.kernels.paged_attend` reads them (``J`` the longest table; shorter ones end
    in zeros, which the kernel never reads). 16 bytes per page and head."""
    longest = max((len(table) for table in tables), default=0)
    rows = []  # per page: head 0's key and value addresses, and the bytes from one head to the next of each
    for table in tables:
        for page in table:
            k, v = pool.data[page]
            rows.append((k.data_ptr(), v.data_ptr(), k.stride(0) * k.element_size(), v.stride(0) * v.element_size()))
        rows.extend([(0, 0, 0, 0)] * (longest - len(table)))
    at = torch.tensor(rows, dtype=torch.int64).view(len(tables), longest, 2, 2)  # (N, J, base or step, key or value)
    per_head = at[:, None, :, 0] + torch.arange(heads, dtype=torch.int64)[None, :, None, None] * at[:, None, :, 1]  # (N, H, J, 2)
    return per_head[..., 0].flatten(0, 1).contiguous(), per_head[..., 1].flatten(0, 1).contiguous()


def attend_pages(
    query: torch.Tensor, pool: PagePool, tables: list[list[int]], lengths: list[int], scaling: float
) -> torch.Tensor:
    """One decode step of ``N`` sequences of different lengths, each reading its own pages (varlen): what
    a batch of requests over different contexts calls (continuous batching). Pages may be shared between
    tables (a common prefix, a fork); nothing is gathered or copied.

    Args:
        query: ``(N, H, G, D)``: each sequence's ``G`` queries per KV head (the query heads of a group).
        pool: the pool whose pages the tables name; each page ``(k, v)``, each ``(H, P, D)``.
        tables: ``N`` lists of page ids, in slot order.
        lengths: slots each sequence reads, from the start of its first page (at most its pages' slots).

    Returns:
        ``(N, H, G, D)``: softmax attention of each query over its sequence's slots (zeros where a
        sequence holds no slot). Float32 on the CPU runs the C kernel; anything else
        :func:`attend_pages_reference`.

    Raises:
        ValueError: ``tables`` and ``lengths`` differ in count from the queries, or a length is negative or
            beyond its table's pages.
    """
    count, heads = query.shape[0], query.shape[1]
    page = pool.page
    if len(tables) != count or len(lengths) != count:
        raise ValueError(f"{count} queries need as many tables and lengths, got {len(tables)} and {len(lengths)}")
    for table, length in zip(tables, lengths):
        if not 0 <= length <= len(table) * page:
            raise ValueError(f"a length of {length} slots does not fit a table of {len(table)} pages of {page}")
    if not any(lengths):
        return torch.zeros_like(query)
    first = next(pool.data[table[0]][0] for table, length in zip(tables, lengths) if length)
    if not paged_kernel_reads(query, first.dtype, first.device):
        return attend_pages_reference(query, pool, tables, lengths, scaling)
    npages = [-(-length // page) for length in lengths]  # pages each sequence reads
    fills = [length - (n - 1) * page if n else 0 for length, n in zip(lengths, npages)]  # slots of its last
    keys, values = page_addresses(pool, [table[:n] for table, n in zip(tables, npages)], heads)  # (N * H, J) each
    per_head = lambda counts: torch.tensor(counts, dtype=torch.int64).repeat_interleave(heads)  # noqa: E731  (N * H,)
    return paged_attend(
        query.contiguous(), keys, values, per_head(npages), per_head(fills), page, max(lengths), NO_WINDOW, NO_WINDOW, NO_MASK,
        scaling, NO_OBSERVATION
    )


def attend_pages_reference(
    query: torch.Tensor, pool: PagePool, tables: list[list[int]], lengths: list[int], scaling: float
) -> torch.Tensor:
    """:func:`attend_pages` in plain PyTorch: each sequence's slots gathered from its pages, then softmax
    attention; what the kernel is tested against, and what runs where it does not apply."""
    out = torch.zeros_like(query)  # (N, H, G, D)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        if not length:
            continue
        keys = torch.cat([pool.data[page][0] for page in table], dim=1)[:, :length]  # (H, n, D)
        values = torch.cat([pool.data[page][1] for page in table], dim=1)[:, :length]
        weights = (query[row].float() @ keys.float().transpose(-1, -2) * scaling).softmax(-1)  # (H, G, n)
        out[row] = (weights @ values.float()).to(query.dtype)
    return out
