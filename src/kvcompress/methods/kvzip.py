"""KVzip: keep the tokens the model needs to reconstruct the context from its own cache.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", NeurIPS 2025,
https://arxiv.org/abs/2505.23416.

After the context is prefilled (and held uncompressed), it is fed again, in chunks of ``chunk``
tokens, each after a "repeat the previous context" prompt, as queries over the full-precision
cache (:func:`kvcompress.generation.replay`). A slot's score is the largest attention weight it
receives from any replayed token and any query head of its KV head, over all chunks; then the
usual top-k of :class:`~kvcompress.methods.scored.ScoredEviction` evicts. The replayed tokens are
never kept, and the scores do not depend on any question: one compressed context serves many.
The replay runs the model over the context once more (plus a prompt per chunk), with attention
over the whole held context: on 2,000 tokens (CPU, 1 thread) compressing took 3.3x SnapKV's time.

``plus=true`` is KVzip+ (Jégou and Jeblick, "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning",
2026, https://arxiv.org/abs/2601.07891): each attention weight is weighed by the norm of what the
slot adds to the attention output over the norm of the replayed token's attention input.

``allocation=uniform`` (the default) keeps the same number of tokens in every head of every layer;
``allocation=adaptive`` lets the heads of a layer share it (ragged heads, their memory freed); the
paper's default spreads one budget over all heads of all layers, which neither variant does.

Departures from the paper:
- Without a replay (a forward that does not go through :func:`kvcompress.generation.prefill`),
  and while decoding (cut back every ``block`` tokens to the budget set at the prompt, as every
  method here), slots are scored by the attention of the latest ``window`` queries, summed
  (SnapKV without pooling).
- The newest ``window`` tokens and the first ``sink`` are kept whatever their score (the paper
  keeps 4 sinks, no window).
- Each chunk's queries attend to the whole held context (the paper's chunked scoring attends to
  the context in full as well; kvpress's port attends to the sinks and the chunk only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.scored import ScoredEviction
from kvcompress.protocols import LayerView
from kvcompress.registry import register


@register("kvzip")
@dataclass(frozen=True)
class KVzip(ScoredEviction):
    """``kvzip:ratio=0.75,chunk=512``; see :class:`ScoredEviction` for shared fields.

    Args:
        chunk: tokens of the context replayed per forward. The paper uses 2K; a chunk attends to the
            context and to itself, so the replay's attention costs ``T (T + chunk)`` for ``T`` tokens,
            and 512 measured half the time of 2048 on 2,000 tokens (CPU).
        plus: KVzip+ normalization: each attention weight ``a_ij`` of replayed token ``j`` on slot ``i``
            is weighed by ``|W_O v_i| / |h_j|`` (what the slot adds to the output, over the norm of the
            token's attention input ``h_j``) before the maximum.
    """

    sink: int = 4
    chunk: int = 512
    plus: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {self.chunk}")

    @property
    def attention_window(self) -> int:
        return max(1, self.window)  # without a replay, and while decoding

    @property
    def replay_norms(self) -> bool:
        return self.plus

    @property
    def replay(self) -> int:
        return self.chunk if self.evicts else 0

    def replay_prompt(self, first: bool) -> str:
        return (
            "Repeat the previous context exactly."
            if first
            else "Repeat the part of the previous context exactly, starting with"
        )

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention  # (B, H, S)
