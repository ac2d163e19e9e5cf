"""Shared top-k pruning for eviction methods that score tokens.

A scored method only implements ``score(view) -> (B, H, S)``; this base keeps, per row and KV
head, the ``sink`` oldest and ``window`` newest tokens, and the best-scoring others up to the
layer's budget (the protected tokens count toward it; they are kept even where they exceed it). The budget is fixed at the first compression (``budget`` tokens, or a ``ratio``
of the tokens seen then), so a long generation runs in bounded memory: new tokens collect in the
full-precision window and, once ``block`` of them have arrived, the layer is cut back to its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcompress.methods.base import LayerView, Selection


@dataclass
class ScoredSelection(Selection):
    """Base of score-based eviction.

    Args:
        ratio: fraction of the tokens evicted at the first compression (0 <= ratio < 1).
        budget: tokens kept per layer and head; overrides ``ratio`` when > 0.
        window: most recent tokens never evicted (at most half the budget).
        block: new tokens that collect before the layer is compressed back to its budget.
        sink: oldest tokens never evicted (attention sinks).
    """

    ratio: float = 0.5
    budget: int = 0
    window: int = 32
    block: int = 32
    sink: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio is the fraction evicted and must be in [0, 1), got {self.ratio}")
        for field in ("budget", "window", "sink"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")

    def score(self, view: LayerView) -> torch.Tensor:
        """``(B, H, S)`` importance of every slot; higher is kept."""
        raise NotImplementedError

    def layer_budget(self, count: torch.Tensor, view: LayerView) -> torch.Tensor:
        """``(B, H, 1)`` tokens this layer keeps, given the ``(B, H, 1)`` real tokens it holds now."""
        if self.budget:
            return torch.full_like(count, self.budget)
        return torch.ceil(count * (1 - self.ratio)).long()

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        """Newest tokens kept whatever their score: ``window``, but at most half the budget, so
        scores always choose the other half (a budget below the window would otherwise keep only
        recent tokens and lose the attention sink)."""
        return (budget // 2).clamp_max(self.window)

    def select(self, view: LayerView) -> torch.Tensor | None:
        if self.ratio == 0 and self.budget == 0:
            return None
        valid = view.valid
        count = valid.sum(-1, keepdim=True)  # (B, H, 1)
        if "budget" not in view.state:
            view.state["budget"] = self.layer_budget(count, view)
            slack = 0  # the first compression (the prompt) cuts straight to the budget
        else:
            slack = self.block - 1
        budget = view.state["budget"]
        if not self.over_budget(count, budget + slack):
            return None
        age = valid.cumsum(-1) - 1  # (B, H, S) 0 = oldest real token
        protected = valid & ((age < self.sink) | (age >= count - self.recent(budget)))
        scores = self.score(view).float().masked_fill(~valid, -torch.inf).masked_fill(protected, torch.inf)
        return self.allocate(scores, valid, protected, budget)

    def over_budget(self, count: torch.Tensor, limit: torch.Tensor) -> bool:
        """Whether any head holds more than ``limit`` ``(B, H, 1)`` tokens, so the layer is cut back."""
        return bool((count > limit).any())

    def allocate(self, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """``(B, H, S)`` slots kept: per head, the protected ones and the best scores up to the budget
        (protected slots score +inf, so they count toward it; they stay even past it)."""
        return protected | (valid & (rank(scores) < budget))


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dimension, 0 for the highest; ties go to the older slot."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def pyramid_budgets(average: int, layers: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets: an arithmetic sequence from the first layer down to
    ``average / beta`` at the last, averaging ``average``."""
    last = average / beta
    first = 2 * average - last
    if layers == 1:
        return [average]
    return [max(1, math.ceil(first - (first - last) * i / (layers - 1))) for i in range(layers)]
