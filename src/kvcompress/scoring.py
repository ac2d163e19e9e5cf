"""What a selection scores with, kept for one layer between its compressions.

A :class:`~kvcompress.cache.CompressedLayer` coordinates a step (store the tokens, attend, compress); its
:class:`Scoring` holds the selection's running state and follows the slots when they move:

- ``attention``: the ``(B, H, S)`` attention each slot received from the observed queries (H2O, TOVA,
  SnapKV's window; a replay's peak scores for KVzip), a view of ``room``, which keeps zeros a chunk of
  slots ahead so a decode step adds to it in place instead of padding a copy;
- ``queries`` and ``query_positions``: the queries seen since the last compression, when the selection
  asks for them (:attr:`~kvcompress.protocols.Selection.queries`);
- ``held``: the last queries of held steps (question-aware compression: the question's window is observed
  once the step that compresses has come);
- ``budget``: the ``(B, H, 1)`` budget the first compression set; ``quiet_until``: tokens seen before the
  selection may evict again (:attr:`~kvcompress.protocols.Selected.quiet`).

Its entries are saved with the layer's own, unprefixed (:data:`Scoring.STATE`: the names a saved cache
has always used).
"""

from __future__ import annotations

import torch

from kvcompress.buffer import CHUNK, compaction_index, round_up, tensor_bytes


class Scoring:
    """The running state of one layer's selection (see the module docstring)."""

    STATE = ("attention", "queries", "query_positions", "held", "budget")  # see kvcompress.state

    def __init__(self, accumulate: bool = False):
        self.accumulate = accumulate  # the observation outlives a compression (H2O), else it restarts
        self.attention: torch.Tensor | None = None  # (B, H, S) float32
        self.room: torch.Tensor | None = None  # (B, H, >= S) zeros past S, `attention` its view (see observation)
        self.queries: torch.Tensor | None = None  # (B, Hq, m, D)
        self.query_positions: torch.Tensor | None = None  # (B, m)
        self.held: torch.Tensor | None = None  # (B, Hq, k, D)
        self.budget: torch.Tensor | None = None  # (B, H, 1)
        self.quiet_until: int | None = None

    # ---- the observed attention ---------------------------------------------------------------

    def observation(self, batch: int, heads: int, slots: int, device) -> torch.Tensor:
        """The ``(B, H, slots)`` observation a step adds to in place: the attention observed so far, then
        zeros for the step's new slots. It is a view of :attr:`room`, which holds zeros past the view and
        grows ``CHUNK`` slots at a time, so a decode step neither pads nor copies it."""
        held, room = self.attention, self.room
        if (
            room is None or held is None or held.data_ptr() != room.data_ptr() or room.shape[:2] != (batch, heads)
            or not held.shape[-1] <= slots <= room.shape[-1]
        ):
            room = torch.zeros(batch, heads, round_up(slots, CHUNK), dtype=torch.float32, device=device)
            if held is not None:
                room[..., : held.shape[-1]] = held
            self.room = room
        return room[..., :slots]

    def set_attention(self, attention: torch.Tensor | None) -> None:
        """Keep ``attention`` as the observed attention; the room goes with the attention it held, unless
        ``attention`` is its view (released now, not when the next step would replace it)."""
        self.attention = attention
        if self.room is not None and not self.in_room():
            self.room = None

    def in_room(self) -> bool:
        """Whether :attr:`attention` is a view of :attr:`room` (then the room is what it occupies)."""
        return self.room is not None and self.attention is not None and self.attention.data_ptr() == self.room.data_ptr()

    def observe(self, observed: torch.Tensor) -> None:
        """Add a step's ``(B, H, S)`` observed attention (its new slots start at zero)."""
        if self.attention is None:
            self.set_attention(observed)
            return
        grow = observed.shape[-1] - self.attention.shape[-1]
        self.set_attention(torch.nn.functional.pad(self.attention, (0, grow)) + observed)

    # ---- queries ------------------------------------------------------------------------------

    def add_queries(self, query: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep a step's ``(B, Hq, q, D)`` queries and their ``(B, q)`` positions until the next compression."""
        self.queries = query if self.queries is None else torch.cat([self.queries, query], 2)
        self.query_positions = positions if self.query_positions is None else torch.cat([self.query_positions, positions], -1)

    def hold(self, query: torch.Tensor, window: int) -> None:
        """A held step: carry its last queries, up to ``window`` with the earlier held ones, to the next step."""
        held = query if self.held is None else torch.cat([self.held, query], 2)
        self.held = held[:, :, -window:]

    def take_held(self) -> torch.Tensor | None:
        """The held steps' queries, forgotten here (the step that compresses has come)."""
        held, self.held = self.held, None
        return held

    # ---- a compression ------------------------------------------------------------------------

    def quiet(self, seen: int) -> bool:
        """Whether the selection said it would not evict before more than ``seen`` tokens."""
        return self.quiet_until is not None and seen <= self.quiet_until

    def selected(self, budget: torch.Tensor | None, quiet: int | None, seen: int, evicts: bool) -> None:
        """Record what a selection returned; its queries have served once it evicts, and after the first
        compression (the prompt's cut) whatever it kept."""
        first = self.budget is None
        self.quiet_until = None if quiet is None else seen + quiet
        self.budget = budget
        if evicts or first:
            self.queries = self.query_positions = None

    def moved(self, index: torch.Tensor, device) -> None:
        """Follow the slots' moves (``(B, H, S')`` the old slot of each slot held now) with the observed
        attention: kept (H2O) or restarted at zero."""
        if self.attention is not None:
            self.set_attention(self.attention.gather(-1, index) if self.accumulate else torch.zeros(index.shape, device=device))

    def restart(self) -> None:
        """A compression that moved no slot: the observation restarts at zero unless it accumulates (in
        place: a view of the room stays one)."""
        if self.attention is not None and not self.accumulate:
            self.attention.zero_()

    def moved_ragged(self, stored: int, before: torch.Tensor, take: torch.Tensor, window_index: torch.Tensor,
                     window_valid: torch.Tensor | None, store_slots: int) -> None:
        """Follow a ragged settle with the observed attention: head ``h`` held ``before[h]`` of the ``stored``
        store slots, and its window tokens ``take`` ``(B, H, n)`` went on after its own (the store now holds
        ``store_slots``); ``window_index``: the old window slot of each window slot now, ``window_valid`` their
        validity. A slot no token moved to (a shorter head's padding) gets 0."""
        if self.attention is None:
            return
        held = self.attention
        held = torch.nn.functional.pad(held, (0, stored + take.shape[-1] + 1 - held.shape[-1]))  # last column: 0
        nothing = held.shape[-1] - 1
        slot = torch.arange(store_slots, device=held.device)  # (S,) the store's slots now
        moved, _ = compaction_index(take)  # (B, H, n) each head's taken window slots, in order
        offset = slot - before  # (B, H, S) how far past the head's own earlier tokens
        came = (offset >= 0) & (offset < take.sum(-1, keepdim=True))
        from_window = stored + moved.gather(-1, offset.clamp(0, moved.shape[-1] - 1))
        store_index = torch.where(slot < before, slot, torch.where(came, from_window, nothing))
        window_index = stored + window_index
        if window_valid is not None:
            window_index = window_index.masked_fill(~window_valid[..., : window_index.shape[-1]], nothing)
        self.set_attention(held.gather(-1, torch.cat([store_index, window_index], -1)))

    # ---- what it holds ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        attention = None if self.in_room() else self.attention  # a view of the room occupies the room
        return tensor_bytes(self.room, attention, self.queries, self.query_positions, self.held, self.budget)

    def trim(self) -> None:
        """Release the room kept for slots to come (the attention observed so far stays)."""
        if self.in_room():
            self.attention = self.attention.clone()
        self.room = None

    def map_batch(self, fn) -> None:
        """Reorder, repeat or select rows (``fn`` on the batch dimension)."""
        for name in ("attention", "queries", "query_positions", "held", "budget"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        self.room = None
