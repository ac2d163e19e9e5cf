"""PyramidKV: SnapKV scoring with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024, https://arxiv.org/abs/2406.02069.

The layer budgets form an arithmetic sequence whose last term is ``average / beta`` and whose mean
is the average budget (``budget``, or ``ratio`` of the prompt), so the cache holds the same total as
SnapKV at that budget (the ``pyramid`` allocation of :mod:`kvcompress.methods.budgets`; any scorer
takes it: ``h2o:ratio=0.75,allocation=pyramid``). Layers then hold different numbers of tokens,
which the ``kvcompress`` attention masks per layer.

Departure from the paper: the protected observation window counts inside each layer's budget, and
a layer never keeps fewer tokens than that window.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.methods.snapkv import SnapKV
from kvcompress.registry import register


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """``pyramidkv:ratio=0.75,beta=20``: ``snapkv`` with ``allocation=pyramid``."""

    allocation: str = "pyramid"
