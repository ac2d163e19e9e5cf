"""How many tokens each layer and head keeps: the allocation axis of score-based eviction.

An allocation turns the average per-head budget (``budget`` tokens, or ``ratio`` of the tokens seen
at the first compression) into the tokens each layer and head keeps, given their scores. It knows
nothing of how the scores were made, so any scorer takes any allocation
(``knorm:ratio=0.75,allocation=adaptive``, ``h2o:ratio=0.75,allocation=pyramid``):

- ``uniform``: every head of every layer keeps the average (SnapKV, H2O, TOVA, KNorm).
- ``pyramid``: budgets shrink with depth, same total (PyramidKV, https://arxiv.org/abs/2406.02069).
- ``adaptive``: the heads of a layer share the layer's budget, spent on the best scores of any head,
  each head keeping at least ``alpha`` of its share (Ada-KV, https://arxiv.org/abs/2407.11550).
  Heads then hold different numbers of tokens (``ragged``), stored apart so nothing is padded.
- ``retrieval``: the KV heads that copy from far context (retrieval heads, scored once per model by
  :func:`kvcompress.calibration.retrieval_heads`) keep every token, the others share the rest (at
  least their sinks and window); how many heads are retrieval heads follows from the average budget
  (DuoAttention, https://arxiv.org/abs/2410.10819; RazorAttention, https://arxiv.org/abs/2407.15891).
  Ragged.
- ``global``: one budget for the whole model: per row, the ``layers × heads × average`` best scores of
  any head of any layer are kept, so heads and layers keep what their scores earn (KVzip's non-uniform
  budget, https://arxiv.org/abs/2505.23416). The ranking needs every layer's scores at once, which only a
  replay gives (:func:`global_budgets`, through :meth:`kvcompress.protocols.Selection.allot`). Ragged.

Shapes: ``B`` batch, ``H`` KV heads, ``S`` slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch



def rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dimension, 0 for the highest; ties go to the older slot."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def lowest_slot(scores: torch.Tensor, valid: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``(B, H, S)`` bool: in each head that ``where`` ``(B, H, 1)`` marks, the valid slot :func:`rank` puts
    last (the lowest score; of equal ones the newest), unless every valid slot scores +inf (protected).
    What ``rank(scores) < budget`` drops when a head holds one slot over its budget, without a sort."""
    among = scores.masked_fill(~valid, torch.inf)
    lowest = among.min(-1, keepdim=True).values  # (B, H, 1)
    newest = among.shape[-1] - 1 - (among == lowest).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    drop = where & (lowest < torch.inf)
    return torch.zeros_like(valid).scatter_(-1, newest, drop)


def pyramid_budgets(average: int, layers: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets: an arithmetic sequence from the first layer down to
    ``average / beta`` at the last, averaging ``average``."""
    last = average / beta
    first = 2 * average - last
    if layers == 1:
        return [average]
    return [max(1, math.ceil(first - (first - last) * i / (layers - 1))) for i in range(layers)]


@dataclass(frozen=True)
class Uniform:
    """Every head of every layer keeps the average budget."""

    ragged = False

    def layer_budget(
        self, average: torch.Tensor, layer_idx: int, num_layers: int, floor: int, basis=None, head_scores=None
    ) -> torch.Tensor:
        """``(B, H, 1)`` tokens this layer keeps per head, from the ``(B, H, 1)`` average, the protected
        window ``floor``, the ``(B, H, 1)`` tokens the budget is a share of (``basis``) and the model's
        ``(L, H)`` retrieval-head scores (``head_scores``, for ``retrieval``)."""
        return average

    def over_budget(self, count: torch.Tensor, limit: torch.Tensor) -> bool:
        """Whether a ``(B, H, 1)`` head holds more than ``limit`` tokens, so the layer is cut back."""
        return bool((count > limit).any())

    def margin(self, count: torch.Tensor, limit: torch.Tensor) -> int:
        """How many more tokens every head may take before :meth:`over_budget` could hold."""
        return int((limit - count).min())

    def keep(self, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """``(B, H, S)`` slots kept: per head, the protected ones and the best scores up to the budget
        (protected slots score +inf, so they count toward it; they stay even past it)."""
        over = valid.sum(-1, keepdim=True) - budget  # (B, H, 1)
        if bool((over <= 1).all()):  # a decode step of H2O or TOVA (block=1): at most one slot per head goes
            return protected | (valid & ~lowest_slot(scores, valid, over > 0))
        return protected | (valid & (rank(scores) < budget))


@dataclass(frozen=True)
class Pyramid(Uniform):
    """Budgets shrinking linearly with depth to ``average / beta`` at the last layer, never below ``floor``
    (the protected window); the mean over layers is the average."""

    beta: float = 20.0

    def layer_budget(self, average, layer_idx, num_layers, floor, basis=None, head_scores=None):
        per_row = [pyramid_budgets(int(a), num_layers, self.beta)[layer_idx] for a in average.flatten().tolist()]
        return torch.tensor(per_row, device=average.device).view_as(average).clamp_min(floor)


@dataclass(frozen=True)
class Adaptive(Uniform):
    """The heads of a layer share ``heads × average`` tokens, given to the best scores of any head; every
    head keeps at least ``alpha`` of the average (the safeguard)."""

    alpha: float = 0.2
    ragged = True

    def over_budget(self, count, limit):
        return bool((count.sum(1) > limit.sum(1)).any())  # the heads of a row share their budget

    def margin(self, count, limit):
        return int(((limit.sum(1) - count.sum(1)) // count.shape[1]).min())  # a token to every head of a row

    def keep(self, scores, valid, protected, budget):
        batch, heads, slots = scores.shape
        floor = torch.ceil(budget * self.alpha).long()  # (B, H, 1) the safeguard
        base = protected | (valid & (rank(scores) < floor))
        left = (budget.sum(1) - base.sum((1, 2))[:, None]).clamp_min(0)  # (B, 1) tokens still to give
        rest = scores.masked_fill(base, -math.inf).reshape(batch, heads * slots)  # every head competes
        extra = (rank(rest) < left) & (valid & ~base).reshape(batch, heads * slots)
        return base | extra.reshape(batch, heads, slots)


@dataclass(frozen=True)
class Retrieval(Uniform):
    """Retrieval heads keep every token, the others (streaming heads) share the rest, at least ``sink`` + ``floor``.

    With ``n`` KV heads in the model's compressed layers, an average of ``A`` tokens per head out of ``T``
    (``basis``) and ``s = sink + floor``, the ``floor(n (A - s) / (T - s))`` heads with the highest
    retrieval scores keep all ``T`` tokens and the others share what is left of the ``n A`` (at least
    ``s`` each): the target compression chooses the split. A retrieval head never drops a token by a
    question-agnostic score (rounding the count up instead made 22 heads at 4x keep all but 5 to 169
    of 4,096 tokens, and the fewer they kept, the fewer RULER-style needles survived). Which tokens a
    streaming head keeps within its budget is the scorer's choice (beyond the protected sinks and window):
    on the default model at about 18x with 4-bit KIVI, Expected Attention's choice cost +2.7 % perplexity
    on prose where SnapKV's cost +5.5 % (``experiments/ladder-4096-expected-attention-2026-12-02.txt``).
    The window trades retrieval heads for streaming heads that model local text: on the default model at
    4x, ``window=256`` (18 retrieval heads of 90, the others 256 tokens each) answered 28 of 32 RULER-style
    cases at +7 % perplexity on prose; the default 32 (21 heads, the others 89 tokens) 25 of 32 at +17 %
    (``experiments/``).
    """

    sink: int = 0
    ragged = True

    def layer_budget(self, average, layer_idx, num_layers, floor, basis=None, head_scores=None):
        if head_scores is None:
            raise ValueError("the retrieval allocation needs the model's retrieval-head scores (see make_cache)")
        flat = head_scores.flatten()  # (L * H,); -inf: a head this cache does not compress (sliding layers)
        n, heads = int(torch.isfinite(flat).sum()), head_scores.shape[1]
        order = torch.argsort(flat, descending=True, stable=True)
        out = []
        for a, t in zip(average[:, 0, 0].tolist(), basis[:, 0, 0].tolist()):
            stream = min(self.sink + floor, a)
            count = 0 if t <= stream else min(n, math.floor(n * (a - stream) / (t - stream)))
            rest = max(stream, (n * a - count * t) // (n - count)) if count < n else t  # the streaming heads' share
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[order[:count]] = True
            mine = chosen.view(-1, heads)[layer_idx]  # (H,) retrieval heads of this layer
            out.append(torch.where(mine, t, rest))
        return torch.stack(out).to(average)[..., None]  # (B, H, 1)


@dataclass(frozen=True)
class Global(Uniform):
    """Every head of every layer keeps the budget :func:`global_budgets` gives it (one ranking over the
    whole model); a layer compressed without one (no replay) keeps the average in every head."""

    ragged = True


def global_budgets(scores: list[torch.Tensor], average: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(B, H, 1)`` tokens each head of each layer keeps when, per row, the ``sum(average)`` best of all
    the layers' scores are kept (KVzip's non-uniform budget: one threshold for the whole model).

    Args:
        scores: per layer, ``(B, H, S)`` scores; +inf for protected slots (kept first, counted in the
            budget), -inf for invalid ones (never kept).
        average: per layer, ``(B, H, 1)`` the tokens each head would keep with a uniform budget.
    """
    total = sum(a.sum((1, 2)) for a in average)  # (B,) tokens the row keeps in the whole model
    flat = torch.cat([s.flatten(1) for s in scores], 1)  # (B, L * H * S)
    kept = (rank(flat) < total[:, None]) & (flat > -math.inf)
    budgets, at = [], 0
    for s in scores:
        size = s[0].numel()
        budgets.append(kept[:, at : at + size].view_as(s).sum(-1, keepdim=True))
        at += size
    return budgets


ALLOCATIONS = ("uniform", "pyramid", "adaptive", "retrieval", "global")


def allocation(name: str, beta: float, alpha: float, sink: int = 0) -> Uniform:
    """The allocation called ``name``, with its parameter (``beta`` for pyramid, ``alpha`` for adaptive,
    ``sink`` for retrieval)."""
    if name == "pyramid":
        return Pyramid(beta)
    if name == "adaptive":
        return Adaptive(alpha)
    if name == "retrieval":
        return Retrieval(sink)
    if name == "global":
        return Global()
    return Uniform()
