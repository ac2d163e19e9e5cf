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

from kvcompress.methods.base import LayerView
from kvcompress.methods.scored import ScoredSelection
from kvcompress.registry import register


@register("h2o")
@dataclass
class H2O(ScoredSelection):
    """``h2o:ratio=0.75``: half the budget heavy hitters, half (or ``window``, if larger) recent."""

    window: int = 0
    block: int = 1
    observe: ClassVar[int] = -1
    reset_scores: ClassVar[bool] = False

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return (budget // 2).clamp_min(self.window)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.scores
