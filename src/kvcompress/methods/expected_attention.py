"""Expected Attention: score each token by the attention that future queries are expected to give it.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", 2025, https://arxiv.org/abs/2510.00636.

Queries are modelled as Gaussian: mean ``mu`` and covariance ``Sigma`` per query head, measured on
the queries seen since the last compression (before rotary embedding), then rotated by the average
rotation of the next ``future`` positions. For a Gaussian query ``q``,
``E[exp(q . k / sqrt(D))] = exp(mu' . k / sqrt(D) + k' Sigma' k / (2 D))``; normalised over the
slots (a softmax), averaged over the query heads of each KV head, and weighted by the value's norm,
that is the token's score. Question-agnostic: it needs no attention weights, only the queries and
the cached keys and values.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads, ``m`` queries, ``S`` slots, ``D`` head dim.

Departures from the paper:
- The statistics come from the attention layer's own queries (after any query normalisation,
  rotary undone), not recomputed from the layer's input; queries at the first ``sink`` positions
  are left out as outliers and the first ``sink`` tokens are kept (the paper's ``n_sink``).
- While decoding, the budget set at the prompt holds (as for every method here): every ``block``
  tokens the layer is cut back, scored with the statistics of that block's queries.
- The softmax scale is ``1 / sqrt(D)`` (Llama's); models with another query scale (Gemma 3) get
  the same ranking up to that temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


def mean_rotation(rotary, last: torch.Tensor, future: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``cos`` and ``sin`` tables ``(B, D)`` of positions ``last + 1 .. last + future``, ``last`` ``(B,)``."""
    positions = last[:, None] + torch.arange(1, future + 1, device=last.device)  # (B, T)
    cos, sin = rotary.tables(positions, torch.float32)  # (B, T, D)
    return cos.mean(1).to(dtype), sin.mean(1).to(dtype)


@register("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(ScoredEviction):
    """``expected_attention:ratio=0.75``; see :class:`ScoredEviction` for shared fields.

    Args:
        future: positions ahead whose average rotation the query statistics take.
        covariance: include the queries' covariance (else their mean only).
        vnorm: weight each score by the norm of the token's value.
    """

    sink: int = 4
    future: int = 512
    covariance: bool = True
    vnorm: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.future < 1:
            raise ValueError(f"future must be >= 1, got {self.future}")

    @property
    def queries(self) -> bool:
        return self.evicts

    def score(self, view: LayerView) -> torch.Tensor:
        queries, positions = view.queries.float(), view.query_positions  # (B, Hq, m, D), (B or 1, m)
        batch, q_heads, _, dim = queries.shape
        pre = view.rotary.unrotate(queries, positions[:, None, :])  # (B, Hq, m, D) before rotary
        # Statistics of the queries past the first `sink` positions (outliers; padding sits at 0 too).
        weight = (positions >= self.sink).to(pre.dtype)[:, None, :, None]  # (B or 1, 1, m, 1)
        count = weight.sum(2).clamp_min(1)  # (B or 1, 1, 1)
        mean = (pre * weight).sum(2) / count  # (B, Hq, D)
        cos, sin = mean_rotation(view.rotary, positions[:, -1].expand(batch), self.future, torch.float32)
        rotate = lambda x: x * cos[:, None] + view.rotary.rotate_half(x) * sin[:, None]  # noqa: E731  (B, ., D)
        keys = view.keys.float()  # (B, H, S, D)
        heads = keys.shape[1]
        grouped = keys.repeat_interleave(q_heads // heads, 1)  # (B, Hq, S, D)
        logits = (grouped @ rotate(mean)[..., None])[..., 0] / math.sqrt(dim)  # (B, Hq, S)
        if self.covariance:
            centered = (pre - mean[:, :, None]) * weight
            cov = centered.transpose(-1, -2) @ centered / count[..., None]  # (B, Hq, D, D)
            turn = rotate(torch.eye(dim, device=keys.device).expand(batch, dim, dim))  # (B, D, D): rows R e_i, i.e. Rᵀ
            cov = turn.transpose(-1, -2)[:, None] @ cov @ turn[:, None]  # R Sigma Rᵀ
            logits = logits + ((grouped @ cov) * grouped).sum(-1) / (2 * dim)
        logits = logits.masked_fill(~view.valid.repeat_interleave(q_heads // heads, 1), -torch.inf)
        scores = logits.softmax(-1).view(batch, heads, q_heads // heads, -1).mean(2)  # (B, H, S)
        if self.vnorm:
            scores = scores * view.values.float().norm(dim=-1)
        return scores
