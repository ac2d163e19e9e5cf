"""PyramidKV: SnapKV scoring with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024, https://arxiv.org/abs/2406.02069.

The layer budgets form an arithmetic sequence whose last term is ``average / beta`` and whose mean
is the average budget (``budget``, or ``ratio`` of the prompt), so the cache holds the same total as
SnapKV at that budget. Layers then hold different numbers of tokens, which the ``kvcompress``
attention implementation masks per layer.

Departure from the paper: the protected observation window counts inside each layer's budget, and
a layer never keeps fewer tokens than that window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.base import LayerView
from kvcompress.methods.scored import pyramid_budgets
from kvcompress.methods.snapkv import SnapKV
from kvcompress.registry import register


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """``pyramidkv:ratio=0.75,beta=20``.

    Args:
        beta: ratio of the average budget to the last layer's budget.
    """

    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, count: torch.Tensor, view: LayerView) -> torch.Tensor:
        average = super().layer_budget(count, view)  # (B, H, 1)
        per_row = [
            pyramid_budgets(int(a), view.num_layers, self.beta)[view.layer_idx] for a in average.flatten().tolist()
        ]
        budget = torch.tensor(per_row, device=count.device).view_as(count)
        return budget.clamp_min(self.window)
