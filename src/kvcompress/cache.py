"""The compressed KV cache: a transformers ``Cache`` whose layers hold only compressed K/V.

Each :class:`CompressedLayer` holds a full-precision window of recent tokens and, when the pipeline
has a storage method (e.g. KIVI), a store of older tokens in that representation. One step of a
layer is :meth:`CompressedLayer.attend`, called by the ``kvcompress`` attention (installed by
:func:`kvcompress.attach`) with the step's queries, new keys and values, and
:class:`~kvcompress.step.StepInputs`:

1. :meth:`~CompressedLayer.append` adds the new tokens to the window and returns the
   :class:`~kvcompress.step.Operands` attention reads: a segment per part (store, window), the
   validity of every slot, and how many queries the selection observes;
2. :func:`kvcompress.attention.attend` returns :class:`~kvcompress.step.Attended`: the output and
   the observed attention;
3. :meth:`~CompressedLayer.compress` accumulates what the selection scores, evicts, and moves tokens
   that left the window into the store.

``Cache.update``, which transformers calls before attention, is a pass-through for these layers:
the step happens in attention, where the queries are. Nothing dequantized is kept.

Tokens *seen* (for positions) are tracked apart from tokens *stored* (for masks): a new token's
position is its true index in the sequence, and ``get_mask_sizes`` reports the stored length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvcompress import attention
from kvcompress.buffer import FullPrecisionBuffer, tensor_bytes
from kvcompress.calibration import load_retrieval_heads, rotary_of
from kvcompress.models import identity_differences, model_identity, model_name
from kvcompress.pages import PagePool
from kvcompress.paged import PagedBuffer
from kvcompress.ragged import RAGGED_CHUNK, RaggedStore
from kvcompress.scoring import Scoring
from kvcompress.protocols import LayerView, Selection, Storage
from kvcompress.registry import Pipeline, SpecError, parse_spec
from kvcompress.persist import load, save_cache
from kvcompress.state import Value, load_sliding_state, parts_of, restore, sliding_state, state_of
from kvcompress.step import ATTENTION, Attended, Operands, Replayed, Segment, StepInputs

_UNKNOWN = object()  # a layer's validity not handed down: work it out


class CompressedLayer(CacheLayerMixin):
    """One full-attention layer: a full-precision window plus an optional compressed store.

    Slots are ordered ``[store | window]``, each in position order per row and head.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        selection: Selection | None = None,
        storage: Storage | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        rotary=None,
        head_scores: torch.Tensor | None = None,
        pool: PagePool | None = None,
    ):
        super().__init__()
        self.selection, self.storage = selection, storage
        self.layer_idx, self.num_layers, self.rotary = layer_idx, num_layers, rotary
        self.head_scores = head_scores  # (L, H) the model's retrieval-head scores, if the selection asks
        self.ragged = selection is not None and selection.ragged
        # With a store, the window never holds more than residual + block - 1 tokens between steps: it
        # holds no spare room after a prompt, and grows to residual + block at once when decoding (see
        # append); a ragged layer's window collects a chunk of decoding before its heads take their tokens.
        # A layer with no other storage holds its tokens in pages (kvcompress.paged) of the cache's pool.
        self.pool = pool if pool is not None else PagePool()
        if storage is None and not self.ragged:
            self.window = PagedBuffer(self.pool, extents=selection is None)  # a layer that never evicts frees no page alone
        else:
            self.window = FullPrecisionBuffer(chunk=RAGGED_CHUNK if self.ragged else 1)
        self.store = None
        self.positions: torch.Tensor | None = None  # (B, H, n) int32 window positions, if the storage needs them
        self.seen = 0
        self.scoring = Scoring(selection is not None and selection.accumulate)  # what the selection scores with
        self.shared: list[SharedPart] = []  # a fork's view of the parts of the layer it was forked from

    @property
    def residual(self) -> int:
        return self.storage.residual if self.storage is not None else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = head_dim = key_states.shape[-1]
        if self.ragged:  # heads keep different numbers of tokens: each head stored apart
            storage = self.storage
            self.store = RaggedStore(
                (lambda: storage.new_store(self.layer_idx, head_dim, self.dtype))
                if storage is not None
                else (lambda: PagedBuffer(self.pool, addressed=False))  # each (row, head) in its own pages
            )
        elif self.storage is not None:
            self.store = self.storage.new_store(self.layer_idx, head_dim, self.dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' per-layer update: the layer's step happens in attention (:meth:`attend`)."""
        return key_states, value_states

    # ---- one step ---------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs: StepInputs, scaling: float) -> torch.Tensor:
        """One step: store ``(B, H, q, D)`` new keys/values, attend ``(B, Hq, q, D)`` queries over every
        slot, then compress; returns the ``(B, Hq, q, D)`` attention output."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        if inputs.replay is not None:  # a replay step scores the held slots and stores nothing (KVzip)
            return self.selection.replay_step(self, query, keys, values, inputs, scaling)
        operands = self.append(keys, values, inputs)
        attended = attention.attend(query, operands, scaling)
        self.compress(attended, query, inputs, scaling, operands.valid)
        return attended.output

    def append(self, keys: torch.Tensor, values: torch.Tensor, inputs: StepInputs) -> Operands:
        """Add the step's tokens to the window; return what attention reads."""
        batch, heads, new, _ = keys.shape
        valid = None if inputs.valid is None else inputs.valid[:, None, :].expand(batch, heads, new)  # (B, H, q)
        # A decode step's token lands in room for the tokens up to the next settling, not in a copy of the window.
        reserve = self.residual + self.store.block if self.store is not None and not self.ragged else 0
        self.window.append(keys, values, valid, reserve=reserve)
        if self.storage is not None and self.storage.needs_positions:
            positions = self._positions(inputs.positions, self.seen, new)[:, None, :].expand(batch, heads, new).to(torch.int32)
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        self.seen += new
        observe = self.selection.observe if self.selection is not None else 0
        if inputs.hold and observe > 0:
            observe = 0  # a window of queries is observed once the step that compresses has come
        observed = self.scoring.observation(batch, heads, len(self), self.device) if observe else None
        return Operands(self.segments(), self.valid(), heads, observe, observed)

    def compress(self, attended: Attended, query: torch.Tensor, inputs: StepInputs, scaling: float, valid=_UNKNOWN) -> None:
        """Keep what the selection scores with, then (unless the step is held) evict and settle; ``valid``:
        the step's :meth:`valid`, when its caller has it (the slots did not move since)."""
        selection, scoring = self.selection, self.scoring
        if selection is not None and selection.queries:
            scoring.add_queries(query, self._positions(inputs.positions, self.seen - query.shape[2], query.shape[2]))
        if attended.observed is not None:
            scoring.set_attention(attended.observed)  # Operands.observed with this step's attention added
        if inputs.hold:
            if selection is not None and selection.observe > 0:  # carry the window of queries to the next step
                scoring.hold(query, selection.observe)
            return
        if scoring.held is not None:
            self._observe_held(query.shape[2], scaling)
        self._evict(inputs.expected, valid, decoding=query.shape[2] == 1)
        self._settle()

    def compress_held(self, allotted: torch.Tensor | None = None) -> None:
        """Compress what held steps left, with no step to follow them (after a replay); ``allotted``:
        ``(B, H, 1)`` tokens each head keeps, from a model-wide allocation (see :meth:`Selection.allot`)."""
        self.scoring.held = None
        self._evict(allotted=allotted)
        self._settle()

    def _positions(self, given: torch.Tensor | None, start: int, new: int) -> torch.Tensor:
        """``(B or 1, q)`` positions of the step's tokens: the model's, or ``start .. start + q - 1``."""
        if given is None:
            return torch.arange(start, start + new, device=self.device)[None]
        return given.to(self.device)

    def _observe_held(self, new: int, scaling: float) -> None:
        """Question-aware: the observation window spans the held steps and this one; score the held
        queries it still needs against the slots they could see (all but this step's)."""
        held = self.scoring.take_held()
        need = self.selection.observe - min(self.selection.observe, new)
        if need <= 0:
            return
        keys, _ = self.dense_keys_values()
        slots = keys.shape[2] - new
        valid = self.valid()
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device) if valid is None else valid
        earlier = attention.summed_attention(held[:, :, -need:], keys[:, :, :slots], valid[..., :slots], scaling)
        self.scoring.observe(torch.nn.functional.pad(earlier, (0, new)))

    def view(self, expected: torch.Tensor | None = None, valid=_UNKNOWN, allotted: torch.Tensor | None = None) -> LayerView:
        """What the selection sees of this layer (arguments: see :meth:`_evict`)."""
        if valid is _UNKNOWN:
            valid = self.valid()
        if valid is None:
            valid = torch.ones(*self.window.batch_heads, len(self), dtype=torch.bool, device=self.device)
        scoring = self.scoring
        return LayerView(
            valid, scoring.attention, scoring.queries, scoring.query_positions, scoring.budget, self.layer_idx, self.num_layers,
            dense=self.dense_keys_values, rotary=self.rotary, expected=expected, head_scores=self.head_scores, allotted=allotted,
        )

    def _evict(self, expected: torch.Tensor | None = None, valid=_UNKNOWN, decoding: bool = False, allotted=None) -> bool:
        """Apply the selection (``expected``: see :class:`~kvcompress.step.StepInputs`; ``valid``: as in
        :meth:`compress`; ``decoding``: the step was one token, whose cut the pages may only mask;
        ``allotted``: see :meth:`compress_held`); True when it evicted."""
        if self.selection is None or self.scoring.quiet(self.seen):
            return False
        view = self.view(expected, valid, allotted)
        selected = self.selection.select(view)
        keep = selected.keep
        self.scoring.selected(selected.budget, selected.quiet, self.seen, evicts=keep is not None)
        if keep is None:
            return False
        if self.store is None:  # the window is the whole layer: evicted slots may only be masked
            window_index = self.window.drop(keep, compact=not decoding)
            if window_index is None:  # nothing moved
                self.scoring.restart()
                return True
            return self._moved([window_index])
        stored = len(self.store)
        kept = [self.store.compact(keep[..., :stored])] if stored else []
        if isinstance(self.store, RaggedStore):  # evicted window slots masked until a chunk is free, as in the heads
            window_index = self.window.drop_index(keep[..., stored:], self.selection.block, headroom=self.selection.block)
        else:
            window_index = self.window.compact(keep[..., stored:], in_place=True)  # (B, H, n) old slot of each
        if self.positions is not None:
            self.positions = self.positions.gather(-1, window_index)
        return self._moved([*kept, window_index + stored])

    def _moved(self, kept: list[torch.Tensor]) -> bool:
        """Follow the slots' moves (``(B, H, n)`` old slot of each, per part) with the observed attention."""
        self.scoring.moved(torch.cat(kept, -1), self.device)  # (B, H, S') the old slot of each slot held now
        return True

    def _settle(self) -> None:
        """Move the oldest window tokens into the store, whole blocks at a time."""
        if self.store is None:
            return
        if isinstance(self.store, RaggedStore):
            # Heads hold different tokens once the layer has evicted: each moves its own valid ones (a
            # layer whose heads all keep every token, retrieval heads, never evicts and moves them all),
            # once the window holds a chunk beyond the residual: a decode step that evicts a token then
            # moves nothing, where settling every step would copy into every head.
            if len(self.window) - self.residual >= max(self.store.block, RAGGED_CHUNK):
                self._settle_ragged()
            return
        ready = len(self.window) - self.residual
        count = ready - ready % self.store.block
        if count > 0:
            positions = None
            if self.positions is not None:
                # the rest copied: a view would keep the whole tensor alive
                positions, self.positions = self.positions[..., :count], self.positions[..., count:].clone()
            self.store.append(*self.window.take_front(count), positions)

    def _settle_ragged(self) -> None:
        """Per head, move the oldest valid window tokens beyond the residual, a multiple of the block."""
        valid = self.window.valid()
        if valid is None:
            valid = torch.ones(*self.window.batch_heads, len(self.window), dtype=torch.bool, device=self.device)
        count = valid.sum(-1, keepdim=True)  # (B, H, 1)
        ready = (count - self.residual).clamp_min(0)
        ready = ready - ready % self.store.block
        take = valid & (valid.cumsum(-1) <= ready)  # (B, H, n) the oldest `ready` valid tokens of each head
        if not bool(take.any()):
            return
        stored = len(self.store)
        before = (self.store.lengths().to(self.device) if stored else take.new_zeros(take.shape[:2], dtype=torch.long))[..., None]
        keys, values = self.window.keys_values()
        self.store.append(keys, values, take, None)
        window_index = self.window.compact(valid & ~take, in_place=True)  # (B, H, n') old window slot of each
        self.scoring.moved_ragged(stored, before, take, window_index, self.window.valid(), len(self.store))

    # ---- what the layer holds ---------------------------------------------------------------

    STATE = ("seen", "positions")  # see kvcompress.state; with the scoring's entries, unprefixed

    def state(self) -> dict[str, Value]:
        """Every entry the layer holds (see :mod:`kvcompress.state`), for saving."""
        if not self.is_initialized:
            return {"initialized": False}
        out = {"initialized": True, "head_dim": self.head_dim, **state_of(self), **state_of(self.scoring)}
        out.update(state_of(self.window, "window."))
        if self.store is not None:
            out.update(state_of(self.store, "store."))
            if isinstance(self.store, RaggedStore):
                out.update(self.store.state("store."))
        return out

    def load_state(self, state: dict[str, Value], dtype: torch.dtype, device) -> None:
        """Restore what :meth:`state` read, into a layer made by the same storage for the same model."""
        if not state["initialized"]:
            return
        empty = torch.empty(1, 1, 0, state["head_dim"], dtype=dtype, device=device)
        self.lazy_initialization(empty, empty)
        restore(self, state)
        restore(self.scoring, state)
        restore(self.window, state, "window.")
        if self.store is not None:
            restore(self.store, state, "store.")
            if isinstance(self.store, RaggedStore):
                self.store.device = device
                for i, store in enumerate(s for row in self.store.rows for s in row):
                    restore(store, state, f"store.stores.{i}.")

    def _parts(self):
        return [part for part in (*self.shared, self.store, self.window) if part is not None and len(part)]

    def segments(self) -> tuple[Segment, ...]:
        """What attention reads of every part holding slots, in slot order."""
        return tuple(part.segment() for part in self._parts())

    def dense_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient full-precision ``(B, H, S, D)`` keys and values of every slot (for scorers)."""
        kvs = [part.segment().dense() for part in self._parts()]
        if len(kvs) == 1:
            return kvs[0]
        return torch.cat([k for k, _ in kvs], 2), torch.cat([v for _, v in kvs], 2)

    def valid(self) -> torch.Tensor | None:
        """``(B, H, S)`` bool validity of every slot, or None when all are real tokens."""
        parts = self._parts()
        masks = [part.valid() for part in parts]
        if all(m is None for m in masks):
            return None
        if len(masks) == 1:  # one part: its mask as it is (a view), no copy
            return masks[0]
        shape = next(m for m in masks if m is not None).shape[:2]
        return torch.cat(
            [m if m is not None else torch.ones(*shape, len(p), dtype=torch.bool, device=self.device) for m, p in zip(masks, parts)],
            -1,
        )

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())

    @property
    def held_pages(self) -> int:
        """Pages this layer's parts hold and did not borrow (full-precision, KIVI and ragged heads' pages)."""
        parts = [obj for part in (self.window, self.store) if part is not None for obj in parts_of(part)]
        return sum(obj.held_pages for obj in parts if hasattr(obj, "held_pages"))  # a ragged store's heads among them

    @property
    def nbytes(self) -> int:
        held = self.window.nbytes + (self.store.nbytes if self.store is not None else 0)
        return held + tensor_bytes(self.positions) + self.scoring.nbytes

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.5 passes cache_position
            query_length = query_length.shape[0]
        stored = len(self)
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if isinstance(self.window, PagedBuffer):
            self.window.release()  # pages a fork still reads stay with it
        self.__init__(self.selection, self.storage, self.layer_idx, self.num_layers, self.rotary, self.head_scores, self.pool)

    def trim(self) -> None:
        """Release capacity reserved for tokens to come: held slots stay as they are."""
        self.scoring.trim()
        for part in self._parts():
            for obj in parts_of(part):
                if hasattr(obj, "trim"):
                    obj.trim()

    def fork(self, copies: int) -> CompressedLayer:
        """A layer that reads this one's slots (``copies`` rows per row) and holds only what comes after.
        This layer takes no more tokens, so the capacity it reserved for them is released."""
        self.trim()
        layer = CompressedLayer(None, self.storage, self.layer_idx, self.num_layers, self.rotary, pool=self.pool)
        if isinstance(self.window, PagedBuffer) and not self.shared:  # the pages themselves are shared
            layer.window = self.window.fork(copies)
        else:
            layer.shared = [SharedPart(part, copies) for part in self._parts()]
        layer.seen = self.seen
        if self.is_initialized:
            empty = torch.empty(1, 1, 0, self.head_dim, dtype=self.dtype, device=self.device)
            layer.lazy_initialization(empty, empty)
        return layer

    def map_batch(self, fn) -> None:
        if self.shared:
            raise NotImplementedError("rows of a forked cache cannot be reordered (beam search): they share their context")
        for part in self._parts():
            part.map_batch(fn)
        if self.positions is not None:
            self.positions = fn(self.positions)
        self.scoring.map_batch(fn)

    def unshare(self) -> None:
        """Give each row its own pages (see :meth:`kvcompress.paged.PagedBuffer.unshare` and
        :meth:`kvcompress.methods.kivi.KIVIStore.unshare`); other stores already hold every row apart."""
        if self.shared:
            return
        for part in self._parts():
            for obj in parts_of(part):
                if hasattr(obj, "unshare"):
                    obj.unshare()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")


class SharedPart:
    """A part (store or window) of the layer a fork was made from, read by the fork and never changed;
    each of its rows serves ``copies`` rows of the fork. Its bytes belong to the cache forked from."""

    def __init__(self, part, copies: int):
        self.part, self.copies = part, copies

    def __len__(self) -> int:
        return len(self.part)

    def segment(self) -> Segment:
        segment = self.part.segment()
        return segment if self.copies == 1 else SharedSegment(segment, self.copies)

    def valid(self) -> torch.Tensor | None:
        valid = self.part.valid()
        return None if valid is None else valid.repeat_interleave(self.copies, 0)


@dataclass(frozen=True)
class SharedSegment:
    """A segment of ``b`` rows read by ``b * copies`` rows of queries, without copying it: the copies of
    a row are read as more query rows of that row."""

    inner: Segment
    copies: int
    dense_only = False

    def __len__(self) -> int:
        return len(self.inner)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.dense()
        return keys.repeat_interleave(self.copies, 0), values.repeat_interleave(self.copies, 0)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """``(b * c, H, G, X)`` -> ``(b, H, c * G, X)``."""
        rows, heads, g, width = x.shape
        return x.view(rows // self.copies, self.copies, heads, g, width).transpose(1, 2).reshape(rows // self.copies, heads, -1, width)

    def _unfold(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """``(b, H, c * G, X)`` -> ``(b * c, H, G, X)``."""
        rows, heads, _, width = x.shape
        return x.view(rows, heads, self.copies, g, width).transpose(1, 2).reshape(rows * self.copies, heads, g, width)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return self._unfold(self.inner.logits(self._fold(query)), query.shape[2])

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return self._unfold(self.inner.mix(self._fold(weights)), weights.shape[2])


def layer_nbytes(layer) -> int:
    """Bytes of every tensor a cache layer holds (a compressed layer, or one of transformers' own)."""
    if isinstance(layer, CompressedLayer):
        return layer.nbytes
    return tensor_bytes(layer.keys, layer.values)


class CompressedCache(Cache):
    """A ``Cache`` of :class:`CompressedLayer` s, one per full-attention layer of the model.

    Sliding-window layers of hybrid models (Gemma 3) keep transformers' own sliding-window layer:
    they already hold a bounded window. Build one with :func:`make_cache`; use it inside
    :func:`kvcompress.attach`.
    """

    def __init__(
        self, pipeline: Pipeline, config, storage: Storage | None = None, identity: dict | None = None, rotary=None, layers=None,
        head_scores: torch.Tensor | None = None,
    ):
        super().__init__(layers=layers or self._new_layers(pipeline, config, storage, rotary, head_scores))
        self.pipeline, self.storage, self.identity, self.config = pipeline, storage, identity, config
        self.context: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, C) ids and padding mask compressed, if known
        self.attached_to = None  # the model this cache is attached to (kvcompress.attach), if any
        self.deferring = False  # question-aware: hold compression (see deferred)
        self.expected: torch.Tensor | None = None  # (B,) tokens of a context prefilled in chunks (see prefilling)
        self.forked = False  # its slots are read by forks: it may not change any more
        self.replaying: Replayed | None = None  # the tokens fed replay this chunk of the held context (see replay_chunk)
        self.model_name: str | None = None  # the name the model was loaded under (saved, for `kvcompress ask`)

    @staticmethod
    def _new_layers(pipeline: Pipeline, config, storage: Storage | None, rotary, head_scores=None) -> list:
        text_config = config.get_text_config()
        types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        pool = PagePool()  # the pages of every layer of the cache (and of its forks)
        layers = []
        for layer_type in types:
            if layer_type == "full_attention":
                layers.append(CompressedLayer(pipeline.selection, storage, len(layers), len(types), rotary, head_scores, pool))
            elif layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window))
            else:
                raise ValueError(f"kvcompress supports full and sliding attention layers, not {layer_type!r}")
        return layers

    def fork(self, copies: int = 1) -> CompressedCache:
        """A cache that continues this one's context, ``copies`` rows per row, without copying it.

        The fork reads every slot this cache holds, as it holds it, and stores only the tokens fed
        to it afterwards (a question, an answer), compressed by the same storage method but never
        evicted: answers are short. This cache becomes read-only (its forks read it); fork it again
        for more questions. Sliding-window layers (hybrid models) are copied: they are small.
        """
        self.forked = True
        layers = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layers.append(layer.fork(copies))
            else:
                copy = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)
                if layer.is_initialized:
                    load_sliding_state(copy, sliding_state(layer) | {
                        "keys": layer.keys.repeat_interleave(copies, 0), "values": layer.values.repeat_interleave(copies, 0)
                    })
                layers.append(copy)
        fork = CompressedCache(Pipeline(self.spec, None, self.pipeline.representation, self.pipeline.inner), self.config,
                               self.storage, self.identity, layers=layers)
        if self.context is not None:
            fork.context = tuple(t.repeat_interleave(copies, 0) for t in self.context)
        fork.model_name = self.model_name
        return fork

    def copy(self) -> CompressedCache:
        """A cache that holds what this one holds in tensors and pages of its own (the bytes again, no
        prefill), and that may take more tokens even where this one is read by forks: a context to
        continue (:func:`kvcompress.compress` on a longer context). Forks of this cache are unaffected."""
        first = self.compressed_layers[0]
        copy = CompressedCache(self.pipeline, self.config, self.storage, self.identity, first.rotary, head_scores=first.head_scores)
        for mine, theirs in zip(copy.layers, self.layers):
            if isinstance(theirs, CompressedLayer):
                if theirs.shared:
                    raise ValueError("a fork reads the context it was forked from: copy that context, not the fork")
                theirs.trim()
                state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in theirs.state().items()}
                if state["initialized"]:
                    mine.load_state(state, theirs.dtype, theirs.device)
            else:
                state = sliding_state(theirs)
                load_sliding_state(mine, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        if self.context is not None:
            copy.context = tuple(t.clone() for t in self.context)
        copy.model_name = self.model_name
        return copy

    def unshare(self) -> None:
        """Give every row its own copy of the pages it shares with other rows (after
        ``batch_repeat_interleave``, rows that repeat one context share its pages): the bytes a batch of
        distinct sequences would hold, and read, at each step."""
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.unshare()

    def reset(self) -> None:
        """Empty the cache for a new context. Forks made before keep reading the old context's stores."""
        super().reset()
        self.context, self.expected, self.forked = None, None, False

    @property
    def spec(self) -> str:
        return self.pipeline.spec

    @contextlib.contextmanager
    def deferred(self):
        """Question-aware compression: tokens fed inside this block are compressed together with
        the next step (the question), so attention-based scores see the question's queries."""
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False

    @contextlib.contextmanager
    def prefilling(self, lengths: torch.Tensor):
        """A context of ``lengths`` ``(B,)`` real tokens per row is fed inside this block in chunks:
        budgets given as a ratio are a ratio of all of it."""
        self.expected = lengths
        try:
            yield self
        finally:
            self.expected = None

    @contextlib.contextmanager
    def replay(self):
        """Inside this block, the context the cache holds uncompressed (held by :meth:`deferred`) is
        replayed, chunk by chunk (each fed inside :meth:`replay_chunk`), as queries that score it (KVzip);
        they are not kept. On exit the context is compressed, each layer to the budgets the selection
        allots over all layers (:meth:`~kvcompress.protocols.Selection.allot`), if it does. Sliding-window
        layers (hybrid models) store what they are fed: they are restored."""
        sliding = [(layer, sliding_state(layer)) for layer in self.layers if not isinstance(layer, CompressedLayer)]
        try:
            yield self
        finally:
            self.replaying = None
            for layer, state in sliding:
                load_sliding_state(layer, state)
        layers = self.compressed_layers
        allotted = self.pipeline.selection.allot([layer.view() for layer in layers]) if layers else []
        for layer, share in zip(layers, allotted):
            layer.compress_held(share)

    @contextlib.contextmanager
    def replay_chunk(self, chunk: Replayed):
        """The tokens fed inside this block (inside :meth:`replay`) are ``chunk``'s prompt and replay."""
        self.replaying = chunk
        try:
            yield self
        finally:
            self.replaying = None

    @property
    def compressed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            model = self.attached_to
            if self.forked:
                raise RuntimeError("this cache's context is read by its forks and may not change; feed tokens to a fork (cache.fork())")
            if model is None or model.config._attn_implementation != ATTENTION:
                raise RuntimeError(
                    "a kvcompress cache runs only inside `with kvcompress.attach(model, cache):` (kvcompress.generate "
                    "does this for you); there the model's attention implementation must stay 'kvcompress'"
                )
            return layer.update(key_states, value_states)
        return layer.update(key_states, value_states, *args, **kwargs)

    def check_model(self, model) -> None:
        """Raise ValueError unless ``model`` is the model this cache was made for."""
        if self.identity is None:
            return
        differ = identity_differences(self.identity, model_identity(model))
        if differ:
            raise ValueError(
                f"this cache was made for another model than {model_name(model)} ({'; '.join(differ)}); "
                "make one for this model with kvcompress.make_cache(spec, model)"
            )

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Write the cache to a file that :func:`kvcompress.load_cache` reloads; see
        :func:`kvcompress.persist.save_cache`."""
        return save_cache(self, path, tokenizer)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache holds: codes, scales, zero points, masks, windows."""
        return sum(layer_nbytes(layer) for layer in self.layers)

    @property
    def held_pages(self) -> int:
        """Pages the cache's layers hold (what a server reports per tier); tokens held outside pages (a
        low-rank store, a window) are not counted."""
        return sum(layer.held_pages for layer in self.compressed_layers)

    @property
    def fixed_nbytes(self) -> int:
        """Bytes held whatever the cache's length, not in ``nbytes``: its storage's (low-rank bases and their
        rotary tables) and its selection's rotary tables, which every cache of the model shares
        (:func:`kvcompress.calibration.rotary_of`; counted in each cache that holds them)."""
        rotaries = {id(layer.rotary): layer.rotary for layer in self.compressed_layers if layer.rotary is not None}
        held = sum(rotary.nbytes for rotary in rotaries.values())
        return held + (self.storage.fixed_nbytes if self.storage is not None else 0)

    @property
    def stored_tokens(self) -> int:
        """Tokens the first compressed layer holds for its fullest row and head (tokens seen are
        ``get_seq_length()``); slots held but masked (padding, evicted) are not counted."""
        layer = self.compressed_layers[0]
        valid = layer.valid()
        return len(layer) if valid is None else int(valid.sum(-1).max())


def make_cache(method: str, model) -> CompressedCache:
    """Build a compressed cache for ``model`` from a method spec; use it inside :func:`kvcompress.attach`.

    The model is not changed: its calibration (for ``lowrank``, ``share_heads``, the ``retrieval``
    allocation) is read, built and
    saved on first use if needed, and what the cache needs of it is prepared and owned by the cache.

    Args:
        method: a spec such as ``"streaming:sink=4,window=1024"``, ``"kivi:bits=2"``,
            ``"streaming:window=2048+kivi:bits=4"`` or ``"none"``.
        model: a transformers causal LM.

    Raises:
        SpecError: unknown method or parameter, a bad value, or a value the model cannot take.
        kvcompress.calibration.CalibrationError: a method's calibration is missing or for another model.
    """
    pipeline = parse_spec(method)
    storage = None
    if pipeline.representation is not None:
        storage = pipeline.representation.prepare(model, pipeline.inner)
    rotary = None
    if pipeline.selection is not None and pipeline.selection.queries:
        rotary = rotary_of(model)
        if rotary is None:
            raise SpecError(f"{pipeline.selection.name} extrapolates rotary embeddings, which {model_name(model)} has none of")
    head_scores = None
    if pipeline.selection is not None and pipeline.selection.retrieval_heads:
        head_scores = load_retrieval_heads(model, pipeline.selection.calibration or None).clone()
        types = getattr(model.config.get_text_config(), "layer_types", None)
        if types is not None:  # only heads of the compressed (full-attention) layers compete
            head_scores[[t != "full_attention" for t in types]] = -torch.inf
    cache = CompressedCache(pipeline, model.config, storage, model_identity(model), rotary, head_scores=head_scores)
    cache.model_name = model_name(model)
    return cache


def load_cache(path: str | Path, model, tokenizer=None) -> CompressedCache:
    """Reload a cache that :meth:`CompressedCache.save` wrote, for ``model`` (and ``tokenizer``, checked
    against the one recorded when both are known): the file is checked whole before use
    (:func:`kvcompress.persist.load`), then its entries fill a cache :func:`make_cache` builds from its spec.

    Raises:
        kvcompress.persist.CacheFileError: the file is missing, truncated or damaged, not a kvcompress cache
            (or one of another format version), holds what its spec and the model do not imply, or was made
            for another model, tokenizer or calibration; the message names the fix.
    """
    return load(path, model, tokenizer, make_cache)
