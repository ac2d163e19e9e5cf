"""StreamingLLM: keep a few attention-sink tokens and a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453.

Departures from the paper:
- A multi-token step (the prompt, a question) attends to the whole cache plus itself, and the
  layer is trimmed back to ``sink + window`` tokens after the step; the paper evaluates with a
  sliding window inside the prompt too. A single decode step therefore attends to at most
  ``sink + window + 1`` tokens.
- Positions are the tokens' true positions (keys are cached after rotary embedding), not the
  re-numbered positions inside the cache that the paper uses for its longest-context runs.
- With padding, sinks are each row's first real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


from kvcompress.kernels import drop_lowest
from kvcompress.protocols import LayerView, Selected, Selection
from kvcompress.registry import register


@register("streaming")
@dataclass(frozen=True)
class StreamingLLM(Selection):
    """Attention sinks plus a recent window: ``streaming:sink=4,window=1024``.

    Args:
        window: most recent tokens kept.
        sink: first tokens of the sequence kept forever.
    """

    window: int = 1024
    sink: int = 4

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")

    def select(self, view: LayerView) -> Selected:
        valid = view.valid
        keep_at_most = self.sink + self.window
        if valid.shape[-1] <= keep_at_most:  # no head can be over (the slots held bound every head's count)
            return Selected(None)
        answered, keep = drop_lowest(None, valid, keep_at_most, self.window, self.sink)
        if answered:  # a decode step: each head at most one token over drops its oldest outside the sinks (one C scan)
            return Selected(keep)
        count = valid.sum(-1, keepdim=True)  # (B, H, 1) real tokens per row and head
        if bool((count <= keep_at_most).all()):
            return Selected(None)
        rank = valid.cumsum(-1) - 1  # (B, H, S) age rank of each real token, 0 = oldest
        return Selected(valid & ((rank < self.sink) | (rank >= count - self.window)))
