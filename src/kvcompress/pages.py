"""Pages: the unit of KV memory, as in PagedAttention (Kwon et al., SOSP 2023, https://arxiv.org/abs/2309.06180).

A page holds :data:`PAGE` consecutive token slots of one sequence (all KV heads of one layer), in the
stored form of its representation. A :class:`PagePool` does the bookkeeping, with no tensor code:
page ids, a free list of ids to reuse, a reference count per page (a fork shares its context's pages
instead of copying them; a page written while shared is copied first), and the bytes in use against
an optional budget. What a page holds (its tensors) sits beside its id in :attr:`PagePool.data` and
is dropped, so its memory is freed, when the last reference goes.

Page size: 32 tokens. The last page of a sequence is partly empty, and a page that still holds one
kept token is held whole, so a layer holds at most about one page per row beyond what it keeps (an
evicting layer up to two: its sink page and its oldest window page); 32 tokens of the default model
are 48 KiB of float32 K and V per layer, 1.5 % of a 2,048-token context. Smaller pages waste less
but make the kernels' pointer tables longer and their runs of contiguous keys shorter; 16-32 is the
range vLLM and transformers' continuous batching use on the CPU.
"""

from __future__ import annotations

PAGE = 32  # tokens per page


class PoolExhausted(MemoryError):
    """The pool's byte budget has no room for the pages asked for."""


class PagePool:
    """Ids, reference counts, a free list and a byte budget for pages; pure Python.

    ``can_allocate`` / ``allocate`` are a pair (ask, then take), so a scheduler can decide without
    side effects. ``data[id]`` is whatever the page's owner keeps there (its tensors); it is deleted
    with the page's last reference.

    Args:
        page: tokens per page.
        budget: bytes the pages in use may take at most; None for no limit.
    """

    def __init__(self, page: int = PAGE, budget: int | None = None):
        if page < 1:
            raise ValueError(f"a page holds at least 1 token, got {page}")
        self.page, self.budget = page, budget
        self.refs: dict[int, int] = {}  # id -> references, for the pages in use
        self.sizes: dict[int, int] = {}  # id -> bytes
        self.data: dict[int, object] = {}  # id -> what the page holds
        self.free: list[int] = []  # ids of released pages, reused first
        self.next_id = 0
        self.used = 0  # bytes of the pages in use

    def __len__(self) -> int:
        return len(self.refs)  # pages in use

    def can_allocate(self, count: int, nbytes: int) -> bool:
        """Whether ``count`` pages of ``nbytes`` each fit the budget now."""
        return self.budget is None or self.used + count * nbytes <= self.budget

    def allocate(self, count: int, nbytes: int) -> list[int]:
        """``count`` new pages of ``nbytes`` each, one reference each.

        Raises:
            PoolExhausted: they do not fit the budget (nothing is taken).
        """
        if not self.can_allocate(count, nbytes):
            raise PoolExhausted(
                f"{count} page(s) of {nbytes:,} B do not fit: {self.used:,} of {self.budget:,} B in use; "
                "free pages (finish or preempt a sequence) or give the pool a larger budget"
            )
        ids = []
        for _ in range(count):
            page = self.free.pop() if self.free else self._new_id()
            self.refs[page], self.sizes[page] = 1, nbytes
            ids.append(page)
        self.used += count * nbytes
        return ids

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def share(self, ids) -> None:
        """One more reference to each page of ``ids`` (a fork reads them)."""
        for page in ids:
            self.refs[page] += 1

    def release(self, ids) -> list[int]:
        """One reference fewer to each page of ``ids``; returns the pages freed (no reference left)."""
        freed = []
        for page in ids:
            self.refs[page] -= 1
            if not self.refs[page]:
                del self.refs[page]
                self.used -= self.sizes.pop(page)
                self.data.pop(page, None)
                self.free.append(page)
                freed.append(page)
        return freed

    def shared(self, page: int) -> bool:
        """Whether another reader holds ``page`` too (then it is copied before it is written)."""
        return self.refs[page] > 1
