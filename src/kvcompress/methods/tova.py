"""TOVA: evict the token the current query attends to least.

Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104.

Scores are the attention of the newest query, averaged over all heads of the layer, so every head
keeps the same tokens (the paper's choice). Eviction runs at every step once the budget is reached
(``block=1``); at the end of the prompt, the prompt's last query scores it.

Departure from the paper: no recent window by default (``window=0``), as in the paper, but the
newest token is always kept since it scores itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("tova")
@dataclass(frozen=True)
class TOVA(ScoredEviction):
    """``tova:ratio=0.75``."""

    window: int = 1
    block: int = 1

    @property
    def attention_window(self) -> int:
        return 1  # the newest query

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention.mean(1, keepdim=True).expand_as(view.attention)
