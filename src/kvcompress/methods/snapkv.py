"""SnapKV: keep the tokens the last queries (the observation window) attend to, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469.

Scores are the attention of the last ``window`` queries of the prompt, averaged over the query
heads of each KV head (GQA) and smoothed with a 1D average pool of size ``kernel``; each KV head
keeps its own top tokens, plus the observation window itself.

Departures from the paper:
- The paper compresses the prompt once. Here the budget set at that point also holds during
  decoding: the attention of the queries generated since the last compression is the observation
  window of the next one, every ``block`` tokens.
- By default the question is not in the observation window (the compressed context can serve
  many questions); ``kvcompress.generate(..., question_aware=True)`` gives the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(ScoredEviction):
    """``snapkv:ratio=0.75,window=32,kernel=7``; see :class:`ScoredEviction` for shared fields.

    Args:
        kernel: width of the average pooling over token scores (odd).
    """

    kernel: int = 7

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 1, got {self.kernel}")

    @property
    def attention_window(self) -> int:
        return max(1, self.window)  # the observation window is the protected window

    def score(self, view: LayerView) -> torch.Tensor:
        # Average over the valid slots in each kernel window, so padding does not dilute the scores.
        batch, heads, slots = view.attention.shape
        valid = view.valid.float()

        def pool(x):  # (B, H, S) -> (B, H, S) sums over a centred window of `kernel` slots
            pooled = torch.nn.functional.avg_pool1d(
                x.reshape(batch * heads, 1, slots), self.kernel, stride=1, padding=self.kernel // 2,
                count_include_pad=True,
            )
            return pooled.reshape(batch, heads, slots)

        return pool(view.attention * valid) / pool(valid).clamp_min(1e-9)
