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

from kvcompress.buffer import compaction_index
from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


def mean_rotation(rotary, last: torch.Tensor, future: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``cos`` and ``sin`` tables ``(B, D)`` of positions ``last + 1 .. last + future``, ``last`` ``(B,)``."""
    positions = last[:, None] + torch.arange(1, future + 1, device=last.device)  # (B, T)
    cos, sin = rotary.tables(positions, torch.float32)  # (B, T, D)
    return cos.mean(1).to(dtype), sin.mean(1).to(dtype)


def expected_mass(keys: torch.Tensor, real: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """``(B, h, n)`` expected attention of ``h`` KV heads' ``n`` slots, averaged over their query heads.

    Args:
        keys: ``(B, h, n, D)`` float32.
        real: ``(B, h, n)`` bool, False for padding (scores 0).
        mean: ``(B, h G, D)`` mean of each query head's queries, rotated ahead.
        cov: ``(B, h G, D, D)`` their covariance, rotated ahead; None for the mean only.
    """
    batch, heads, slots, dim = keys.shape
    group = mean.shape[1] // heads
    grouped = keys.repeat_interleave(group, 1)  # (B, h G, n, D)
    logits = (grouped @ mean[..., None])[..., 0] / math.sqrt(dim)  # (B, h G, n)
    if cov is not None:
        logits = logits + ((grouped @ cov) * grouped).sum(-1) / (2 * dim)
    logits = logits.masked_fill(~real.repeat_interleave(group, 1), -torch.inf)
    return logits.softmax(-1).nan_to_num().view(batch, heads, group, slots).mean(2)  # a head with no token: 0


def _gather(x: torch.Tensor, heads: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
    """``(B, h, n, D)``: of ``x`` ``(B, H, S, D)``, the ``heads`` and, per row and head, the ``slot``
    ``(B, h, n, 1)`` (None: every slot)."""
    x = x if len(heads) == x.shape[1] else x[:, heads]
    return x if slot is None else x.gather(2, slot.expand(-1, -1, -1, x.shape[-1]))


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
        cov = None
        if self.covariance:
            centered = (pre - mean[:, :, None]) * weight
            cov = centered.transpose(-1, -2) @ centered / count[..., None]  # (B, Hq, D, D)
            turn = rotate(torch.eye(dim, device=queries.device).expand(batch, dim, dim))  # (B, D, D): rows R e_i, i.e. Rᵀ
            cov = turn.transpose(-1, -2)[:, None] @ cov @ turn[:, None]  # R Sigma Rᵀ
        mean = rotate(mean)  # (B, Hq, D) R mu
        valid = view.valid
        heads, slots = valid.shape[1:]
        group = q_heads // heads
        counts = valid.sum(-1)  # (B, H)
        scores = torch.zeros(batch, heads, slots, device=valid.device)
        # A ragged layer's heads hold different numbers of tokens in slots of the longest one's length (a
        # retrieval head the whole context, a streaming head a few hundred): the heads that fill at most
        # half the slots are scored on their own tokens only, gathered, and the others on every slot.
        short = counts.amax(0) <= slots // 2  # (H,)
        for mine in (short.nonzero()[:, 0], (~short).nonzero()[:, 0]):
            size = int(counts[:, mine].max()) if len(mine) else 0
            if size == 0:  # no head here, or no token in any row (a padded batch of empty rows)
                continue
            if size < slots:  # each row's token slots first, in order, then padding
                slot, real = compaction_index(valid[:, mine])  # (B, h, n)
                slot = slot[..., None]  # (B, h, n, 1)
            else:
                slot, real = None, valid[:, mine]
            rows = (mine[:, None] * group + torch.arange(group, device=mine.device)).flatten()  # their query heads
            mass = expected_mass(_gather(view.keys, mine, slot).float(), real, mean[:, rows], None if cov is None else cov[:, rows])
            if self.vnorm:
                mass = mass * _gather(view.values, mine, slot).float().norm(dim=-1)
            scores[:, mine] = mass if slot is None else scores[:, mine].scatter(2, slot[..., 0], mass)
        return scores
