"""Score-based eviction: a scorer (one method file) with an allocation (:mod:`kvcompress.methods.budgets`).

A scored method only implements ``score(view) -> (B, H, S)``; this base keeps, per row and KV head,
the ``sink`` oldest and the ``window`` newest tokens, and the best-scoring others up to the budget
the allocation gives the layer and head (protected tokens count toward it; they are kept even where
they exceed it). The budget is fixed at the first compression (``budget`` tokens per head on
average, or a ``ratio`` of the tokens seen then, or of the whole context when it is prefilled in
chunks), so a long generation runs in bounded memory: new
tokens collect in the full-precision window and, once ``block`` of them have arrived, the layer is
cut back to its budget.

Every scored method shares these parameters; ``allocation`` chooses the budget axis for any scorer
(``knorm:ratio=0.75,allocation=adaptive``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.kernels import drop_lowest
from kvcompress.methods.budgets import ALLOCATIONS, Uniform, allocation, global_budgets
from kvcompress.protocols import LayerView, Selected, Selection


@dataclass(frozen=True)
class ScoredEviction(Selection):
    """Base of score-based eviction.

    Args:
        ratio: fraction of the tokens evicted at the first compression (0 <= ratio < 1).
        budget: tokens kept per head (the layer average); overrides ``ratio`` when > 0.
        window: most recent tokens never evicted (at most half the budget).
        block: new tokens that collect before the layer is compressed back to its budget.
        sink: oldest tokens never evicted (attention sinks).
        allocation: how the budget is spread: ``uniform`` (every layer and head alike), ``pyramid``
            (shrinking with depth), ``adaptive`` (the heads of a layer share it), ``retrieval`` (retrieval
            heads keep every token) or ``global`` (every head of every layer shares it: only a method
            that replays the context, kvzip, ranks all layers' scores at once).
        beta: ``pyramid`` only: ratio of the average budget to the last layer's.
        alpha: ``adaptive`` only: fraction of the average every head keeps whatever its scores.
        calibration: ``retrieval`` only: the calibration file holding the retrieval-head scores;
            empty for the model's default (measured and saved on first use).
    """

    ratio: float = 0.5
    budget: int = 0
    window: int = 32
    block: int = 32
    sink: int = 0
    allocation: str = "uniform"
    beta: float = 20.0
    alpha: float = 0.2
    calibration: str = ""

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio is the fraction evicted and must be in [0, 1), got {self.ratio}")
        for field in ("budget", "window", "sink"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "global" and type(self).replay_context is Selection.replay_context:
            raise ValueError(
                f"allocation=global ranks every layer's scores at once, which needs a replay of the context; "
                f"{type(self).__name__} has none: use kvzip, or allocation=adaptive to share a budget within each layer"
            )
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    @property
    def ragged(self) -> bool:
        return allocation(self.allocation, self.beta, self.alpha).ragged

    @property
    def retrieval_heads(self) -> bool:
        return self.allocation == "retrieval" and self.evicts

    @property
    def evicts(self) -> bool:
        """False with ``ratio=0`` and no ``budget``: compression off, nothing is ever scored or evicted."""
        return self.ratio > 0 or self.budget > 0

    @property
    def observe(self) -> int:
        return self.attention_window if self.evicts else 0

    @property
    def attention_window(self) -> int:
        """How many of each step's latest queries the scorer reads the attention of (0: none, -1: all)."""
        return 0

    def score(self, view: LayerView) -> torch.Tensor:
        """``(B, H, S)`` importance of every slot; higher is kept."""
        raise NotImplementedError

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        """Newest tokens kept whatever their score: ``window``, but at most half the budget, so
        scores always choose the other half (a budget below the window would otherwise keep only
        recent tokens and lose the attention sink)."""
        return (budget // 2).clamp_max(self.window)

    def select(self, view: LayerView) -> Selected:
        if not self.evicts:
            return Selected(None, view.budget)
        policy = allocation(self.allocation, self.beta, self.alpha, self.sink)
        valid = view.valid
        budget = view.budget
        scores = None
        if budget is not None and self.block == 1 and type(policy).keep is Uniform.keep:
            scores = self.score(view)
            answered, keep = drop_lowest(scores, valid, budget, self.recent(budget), self.sink)
            if answered:  # a decode step of H2O or TOVA: at most one slot per head goes, found in one C scan
                return Selected(keep, budget)
        count = valid.sum(-1, keepdim=True)  # (B, H, 1)
        if budget is None:  # the first compression (the prompt) cuts straight to the budget
            basis, average = self._average(view)
            budget = view.allotted
            if budget is None:
                budget = policy.layer_budget(average, view.layer_idx, view.num_layers, self.window, basis, view.head_scores)
            slack = 0
        else:
            slack = self.block - 1
        # Until a head (or a row's heads, as the policy counts) could pass its budget plus the slack a block
        # leaves, the layer does not ask again: a decode loop of SnapKV or AdaKV (block 32) asks once in 32 steps.
        if not policy.over_budget(count, budget + slack):
            return Selected(None, budget, policy.margin(count, budget + self.block - 1))
        scores, protected = self._ranked(view, budget, scores)
        keep = policy.keep(scores, valid, protected, budget)
        return Selected(keep, budget, policy.margin(keep.sum(-1, keepdim=True), budget + self.block - 1))

    def allot(self, views: list[LayerView]) -> list[torch.Tensor | None]:
        """``allocation=global``: each head's share of one budget over every layer (:func:`global_budgets`)."""
        if not self.evicts or self.allocation != "global":
            return super().allot(views)
        averages = [self._average(view)[1] for view in views]
        scores = [self._ranked(view, average)[0] for view, average in zip(views, averages)]
        return global_budgets(scores, averages)

    def _average(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, 1)`` the tokens the first compression's budget is a share of, and the average budget per head."""
        count = view.valid.sum(-1, keepdim=True)  # (B, H, 1)
        basis = count if view.expected is None else view.expected.to(count)[:, None, None].expand_as(count)
        average = torch.full_like(count, self.budget) if self.budget else torch.ceil(basis * (1 - self.ratio)).long()
        return basis, average

    def _ranked(self, view: LayerView, budget: torch.Tensor, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, S)`` float scores, +inf for the protected slots (sinks and the recent window, also
        returned) and -inf for invalid ones; ``scores``: the scorer's, if already computed."""
        valid = view.valid
        count = valid.sum(-1, keepdim=True)  # (B, H, 1)
        age = valid.cumsum(-1) - 1  # (B, H, S) 0 = oldest real token
        protected = valid & ((age < self.sink) | (age >= count - self.recent(budget)))
        scores = (self.score(view) if scores is None else scores).float()  # scored once, if the C scan declined
        return scores.masked_fill(~valid, -torch.inf).masked_fill(protected, torch.inf), protected
