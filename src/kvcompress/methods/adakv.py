"""AdaKV: the heads of a layer share one budget, spent where attention is spread out.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", 2024, https://arxiv.org/abs/2407.11550.

A layer keeps ``heads × budget`` tokens in all, chosen as the best SnapKV scores over all its KV
heads together, so a head whose attention is concentrated on a few tokens gives its share to heads
whose attention is spread out. A safeguard keeps at least ``alpha`` of the uniform budget in every
head (the top of that head's own scores). Heads then hold different numbers of tokens: the layer
stores them flattened per head (:class:`kvcompress.buffer.RaggedBuffer`), so the evicted tokens'
memory is freed, and the ``kvcompress`` attention masks each head's own slots.

Departures from the paper:
- Scores are SnapKV's, averaged over the query heads of each KV head (GQA), as in the paper's GQA
  variant; the observation window and the sinks are protected in every head and count toward
  the layer's total.
- As for every method here, the budget set at the prompt also holds during decoding: every
  ``block`` new tokens, the layer is cut back to ``heads × budget`` with the same allocation.
- With a quantized store (``adakv+kivi``), the store's blocks span the heads of a layer, so a head
  holding fewer tokens than the longest leaves masked slots there; only the full-precision
  layout is ragged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.methods.scored import rank
from kvcompress.methods.snapkv import SnapKV
from kvcompress.registry import register


@register("adakv")
@dataclass
class AdaKV(SnapKV):
    """``adakv:ratio=0.75,alpha=0.2``; see :class:`SnapKV` for the scoring fields.

    Args:
        alpha: fraction of the uniform per-head budget every head keeps whatever its scores (the
            safeguard); 1 gives SnapKV's uniform allocation.
    """

    alpha: float = 0.2
    ragged: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def over_budget(self, count: torch.Tensor, limit: torch.Tensor) -> bool:
        return bool((count.sum(1) > limit.sum(1)).any())  # the heads of a row share their budget

    def allocate(self, scores, valid, protected, budget):
        batch, heads, slots = scores.shape
        floor = torch.ceil(budget * self.alpha).long()  # (B, H, 1) the safeguard
        base = protected | (valid & (rank(scores) < floor))
        left = (budget.sum(1) - base.sum((1, 2))[:, None]).clamp_min(0)  # (B, 1) tokens still to give
        rest = scores.masked_fill(base, -math.inf).reshape(batch, heads * slots)  # every head competes
        extra = (rank(rest) < left) & (valid & ~base).reshape(batch, heads * slots)
        return base | extra.reshape(batch, heads, slots)
