"""KNorm: keep the keys with the smallest L2 norm (no attention needed).

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024, https://arxiv.org/abs/2406.11430.

Low-norm keys draw high attention, so a key's score is minus its norm, per KV head.
Departure: a recent window (``window=32``) is kept by default, as for the other methods here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("knorm")
@dataclass(frozen=True)
class KNorm(ScoredEviction):
    """``knorm:ratio=0.5``."""

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)  # (B, H, S)
