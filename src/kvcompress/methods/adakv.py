"""AdaKV: the heads of a layer share one budget, spent where attention is spread out.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", 2024, https://arxiv.org/abs/2407.11550.

A layer keeps ``heads × budget`` tokens in all, chosen as the best SnapKV scores over all its KV
heads together, so a head whose attention is concentrated on a few tokens gives its share to heads
whose attention is spread out. A safeguard keeps at least ``alpha`` of the uniform budget in every
head (the top of that head's own scores). This is the ``adaptive`` allocation of
:mod:`kvcompress.methods.budgets`, which any scorer takes (``knorm:ratio=0.75,allocation=adaptive``).
Heads then hold different numbers of tokens: the layer stores each head apart
(:class:`kvcompress.buffer.RaggedStore`), so the evicted tokens' memory is freed, also in a
quantized store (``adakv+kivi``), and the ``kvcompress`` attention masks each head's own slots.

Departures from the paper:
- Scores are SnapKV's, averaged over the query heads of each KV head (GQA), as in the paper's GQA
  variant; the observation window and the sinks are protected in every head and count toward
  the layer's total.
- As for every method here, the budget set at the prompt also holds during decoding: every
  ``block`` new tokens, the layer is cut back to ``heads × budget`` with the same allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.methods.snapkv import SnapKV
from kvcompress.registry import register


@register("adakv")
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """``adakv:ratio=0.75,alpha=0.2``: ``snapkv`` with ``allocation=adaptive``.

    ``alpha`` is the fraction of the uniform per-head budget every head keeps whatever its scores
    (the safeguard); 1 gives SnapKV's uniform allocation.
    """

    allocation: str = "adaptive"
