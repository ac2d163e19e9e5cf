"""Feeding tokens to a benchmark row's cache: the context (:func:`fill_context`) and later steps (:func:`step`).

Apart from :mod:`kvcompress.bench.methods` so that every kind of row (kvcompress specs, kvpress presses,
transformers' ``QuantizedCache`` peers) fills its cache through the same two functions.
"""

from __future__ import annotations

import torch

from kvcompress.cache import CompressedCache
from kvcompress.generation import prefill
from kvcompress.models import cache_kwarg


@torch.no_grad()
def fill_context(
    method, model, input_ids: torch.Tensor, cache, chunk: int | None = None, tokenizer=None
) -> torch.Tensor:
    """Prefill ``(B, C)`` context ids into ``cache`` with ``method`` compressing; return ``(B, 1, V)`` logits.

    ``chunk=n`` feeds the context ``n`` tokens at a time (:func:`kvcompress.generation.prefill`): a
    kvcompress cache compresses between chunks; any other cache (kvpress's, transformers') is fed in
    chunks by plain forwards. A method that replays the context to score it (``kvzip``) needs the
    ``tokenizer``. Call it (and :func:`step`) inside ``method.session(model, cache)``.
    """
    with method.compressing(model):
        if chunk and not isinstance(cache, CompressedCache):  # prefill(chunk=) is kvcompress's chunked compression
            for start in range(0, input_ids.shape[1], chunk):
                logits = step(model, cache, input_ids[:, start : start + chunk], start)
            return logits[:, -1:]
        return prefill(
            model, input_ids, torch.ones_like(input_ids), cache, logits_to_keep=1, chunk=chunk, tokenizer=tokenizer
        )


@torch.no_grad()
def step(model, cache, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Feed ``(B, q)`` tokens at their true positions ``start .. start + q - 1``; return ``(B, q, V)`` logits.

    Positions are passed explicitly, so a cache that evicts (and reports fewer stored tokens than it
    has seen) still gives each token its index in the sequence.
    """
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand(tokens.shape)  # (B, q)
    out = model(input_ids=tokens, position_ids=positions, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits
