"""One decode step over many sequences, each with its own cache: the model step of continuous batching.

A :class:`CacheBatch` puts independent caches side by side, one group of rows each (a request's
fork of its kept context: its ``n`` answers are its rows): different documents, different lengths,
different positions. One forward of the model over the batch decodes one token for every row. The
weight products, most of a small batch's time on the CPU, run once for all rows; each layer's
attention runs every group's own step over its own pages and stores
(:meth:`kvcompress.cache.CompressedLayer.attend`, batch of its own rows), so a sequence computes
what it computes alone, whatever runs beside it, and no group reads another's slots::

    tokens (B, 1), positions (B, 1): each row its own position (its cache's tokens seen)
    embeddings, projections, MLP: one matrix product per layer for all B rows
    attention of layer l:  group 0 (rows 0..n0-1) -> its cache's layer l step
                           group 1 (rows n0..)    -> its cache's layer l step  ...
    logits (B, V)

A sliding-window layer of a hybrid model (Gemma 3) is transformers' own layer in each group's
cache: its update gives the window, which one decode token attends to whole.

Used inside :func:`kvcompress.attach` (which takes a batch as it takes a cache): ``model(input_ids,
position_ids=..., past_key_values=batch)``. Multi-token steps (a prompt, a question) run on each
group's own cache, where padding and causal masks apply; a batch takes one token per row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcompress.cache import CompressedCache, CompressedLayer
from kvcompress.step import StepInputs


class RowsLayer(CacheLayerMixin):
    """Layer ``l`` of a :class:`CacheBatch`: layer ``l`` of each group's cache, and the rows each group takes."""

    is_compileable = False

    def __init__(self, layers: list, caches: list[CompressedCache], rows: list[int]):
        super().__init__()
        self.layers, self.caches, self.rows = layers, caches, rows
        self.is_sliding = bool(getattr(layers[0], "is_sliding", False))
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Each group's layer initializes itself."""

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' per-layer update: each group's step happens in attention (:meth:`attend`)."""
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(layer.get_seq_length() for layer in self.layers)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # The mask transformers builds from this is not read: every group masks its own slots.
        return max(layer.get_mask_sizes(query_length)[0] for layer in self.layers), 0

    def get_max_length(self) -> int:
        return -1

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs: StepInputs, scaling: float) -> torch.Tensor:
        """Each group's step on its rows: ``(B, Hq, 1, D)`` queries and ``(B, H, 1, D)`` new keys and values in,
        ``(B, Hq, 1, D)`` attention out."""
        if query.shape[2] != 1:
            raise ValueError(f"a batch of caches decodes one token per row, not {query.shape[2]}: feed prompts to each cache")
        out, start = [], 0
        for layer, cache, rows in zip(self.layers, self.caches, self.rows):
            part = slice(start, start + rows)
            q, k, v = query[part], keys[part], values[part]  # (n, Hq, 1, D), (n, H, 1, D)
            if isinstance(layer, CompressedLayer):
                positions = None if inputs.positions is None else inputs.positions[part]
                out.append(layer.attend(q, k, v, StepInputs(cache, positions=positions), scaling))
            else:  # transformers' sliding-window layer: its window, all of which one token sees
                k, v = layer.update(k, v)
                out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True))
            start += rows
        return torch.cat(out)


class CacheBatch(Cache):
    """Caches of different sequences decoded together, one token per row per step (see the module docstring).

    Args:
        caches: one :class:`~kvcompress.cache.CompressedCache` per group (its rows consecutive in the
            batch), all made for one model; each is written by the step as if it ran alone.
    """

    deferring, expected, replaying = False, None, None  # a decode step: what kvcompress.attach reads off a cache

    def __init__(self, caches: list[CompressedCache]):
        if not caches:
            raise ValueError("a batch needs at least one cache")
        counts = {len(c.layers) for c in caches}
        if len(counts) != 1:
            raise ValueError(f"the caches of a batch must be made for one model; they have {sorted(counts)} layers")
        self.caches = list(caches)
        self.rows = [_rows(cache) for cache in self.caches]
        layers = [RowsLayer([c.layers[i] for c in self.caches], self.caches, self.rows) for i in range(counts.pop())]
        super().__init__(layers=layers)
        self.attached_to = None

    @property
    def batch_size(self) -> int:
        return sum(self.rows)

    def positions(self) -> torch.Tensor:
        """``(B, 1)`` the position of each row's next token: its cache's tokens seen."""
        return torch.tensor([c.get_seq_length() for c, n in zip(self.caches, self.rows) for _ in range(n)])[:, None]

    def check_model(self, model) -> None:
        """Raise ValueError unless every cache was made for ``model``."""
        for cache in self.caches:
            cache.check_model(model)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)



def _rows(cache: CompressedCache) -> int:
    """Rows a cache holds (a fork's copies), read off the context it continues."""
    if cache.context is None:
        raise ValueError("a cache in a batch must continue a context (kvcompress.compress, load_cache, or a fork of one)")
    return cache.context[0].shape[0]
