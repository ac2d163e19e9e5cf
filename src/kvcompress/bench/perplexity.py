"""Perplexity under compression: how well the model still predicts text after a compressed context.

For each of several windows spread over the text: prefill ``C`` context tokens with the method
compressing, then feed the next ``N`` tokens one at a time at their true positions (teacher
forcing), exactly as decoding would, and score each prediction. Token by token matters: a cache
that quantizes or evicts appended tokens does so during the scoring, as it would while decoding,
instead of holding the whole continuation in full precision. The first continuation token is fed,
not scored, so every scored prediction is made by a decode step that reads the compressed cache:
the window spans ``C + N + 1`` tokens. The cache's exact bytes right after the context are recorded
too, so a row measured for perplexity alone still knows its compression.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.bench.feed import fill_context, step
from kvcompress.bench.methods import BenchMethod


@torch.no_grad()
def continuation_nll(
    method: BenchMethod, model, window: torch.Tensor, context: int, chunk: int | None = None, tokenizer=None
) -> tuple[list[float], int]:
    """Negative log-likelihoods (nats) of ``window[context + 1:]`` given a compressed ``window[:context]``.

    Args:
        window: ``(C + N + 1,)`` token ids.
        context: ``C``, tokens prefilled (and compressed) before scoring.
        chunk: prefill the context this many tokens at a time (see :func:`~kvcompress.bench.feed.fill_context`).

    Returns:
        ``N`` floats, one per scored token, in order, and the bytes the cache held after the context.
    """
    ids = window.to(model.device)[None]  # (1, C + N + 1)
    cache = method.new_cache(model)
    nll = []
    with method.session(model, cache):
        fill_context(method, model, ids[:, :context], cache, chunk, tokenizer)
        held = method.nbytes(cache)
        for pos in range(context, ids.shape[1] - 1):
            logits = step(model, cache, ids[:, pos : pos + 1], pos)[0, -1]  # (V,)
            nll.append(float(F.cross_entropy(logits.float(), ids[0, pos + 1])))
    return nll, held


def perplexity(
    method: BenchMethod,
    model,
    ids: torch.Tensor,
    context: int,
    tokens: int,
    offsets: list[int],
    desc: str = "",
    chunk: int | None = None,
    tokenizer=None,
) -> dict:
    """Score ``tokens`` continuation tokens after ``context`` compressed ones, at every offset.

    Args:
        ids: ``(L,)`` token ids of the whole text.
        offsets: window starts in ``ids``; each window spans ``context + tokens + 1`` ids.
        chunk: prefill each context this many tokens at a time (None: in one forward).

    Returns:
        ``{"perplexity", "mean_nll", "offsets", "nll", "kv_bytes_after_context", "context_tokens"}``:
        ``nll`` holds the per-token values of every window; perplexity is ``exp`` of their mean over all
        windows; ``kv_bytes_after_context`` is the cache's bytes after each window's context.
    """
    span = context + tokens + 1
    nll, held = [], []
    for offset in tqdm(offsets, desc=desc or f"perplexity {method.spec} C={context}", leave=False):
        window_nll, window_bytes = continuation_nll(method, model, ids[offset : offset + span], context, chunk, tokenizer)
        nll.append(window_nll)
        held.append(window_bytes)
    mean = sum(map(sum, nll)) / sum(map(len, nll))
    return {
        "perplexity": math.exp(mean), "mean_nll": mean, "offsets": list(offsets), "nll": nll,
        "kv_bytes_after_context": held, "context_tokens": context,
    }
