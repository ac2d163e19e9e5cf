"""H2O: heavy hitters (most attention received over all queries so far) plus recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048.

A token's score is the attention it has received from every query seen: all prompt queries, then
each generated one. The budget is split evenly between heavy hitters and the most recent tokens,
as in the paper, and a token is evicted at every step (``block=1``) once the budget is reached.
Scores accumulate per KV head (summed attention averaged over the query heads that share it).

Departures from the paper: the prompt is processed with full attention and then cut to the
budget (the paper's experiments also evict while reading the prompt); eviction is per KV head
rather than per query head, since storage is per KV head (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("h2o")
@dataclass(frozen=True)
class H2O(ScoredEviction):
    """``h2o:ratio=0.75``: half the budget heavy hitters, half (or ``window``, if larger) recent."""

    window: int = 0
    block: int = 1
    accumulate: ClassVar[bool] = True

    @property
    def attention_window(self) -> int:
        return -1  # every query

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return (budget // 2).clamp_min(self.window)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention
