"""KeyDiff: keep the keys that differ most from the layer's average key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", 2025, https://arxiv.org/abs/2504.15364.

Per KV head, the anchor is the mean of the held keys' unit vectors; a key's score is minus its
cosine similarity to the anchor, so distinctive keys are kept and keys that look like the rest are
evicted. It needs no attention weights (question-agnostic, works with any attention kernel).

Departure: a recent window (``window=32``) is kept by default, as for the other methods here; the
anchor is taken over every valid slot the layer holds when it is compressed (the paper's block-wise
prefill takes it over the blocks seen so far).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("keydiff")
@dataclass(frozen=True)
class KeyDiff(ScoredEviction):
    """``keydiff:ratio=0.75``; see :class:`ScoredEviction` for shared fields."""

    def score(self, view: LayerView) -> torch.Tensor:
        unit = torch.nn.functional.normalize(view.keys.float(), dim=-1)  # (B, H, S, D)
        valid = view.valid[..., None].float()
        anchor = (unit * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp_min(1)  # (B, H, 1, D)
        return -torch.nn.functional.cosine_similarity(unit, anchor, dim=-1)  # (B, H, S)
