"""Head sharing: similar KV heads of a layer are merged and share one K/V (fewer KV heads).

Shapes: ``B`` batch, ``H`` KV heads, ``G`` groups (``groups``), ``N`` stored tokens, ``D`` head dim.

Per layer, heads are grouped by their calibration statistics (:mod:`kvcompress.calibration`):
Ward's agglomerative clustering on the expected squared distance between heads' keys, plus the
same for values (each normalised by the layer's total, so keys and values weigh alike), merging
the closest pair until ``groups`` remain. A group stores the mean of its heads' keys and values,
``(B, G, N, D)``, in pages of 32 tokens of its ``G`` merged heads (:class:`~kvcompress.paged.PagedBuffer`;
or an inner storage's form, e.g. ``+kivi``); a decode step reads each head's group's pages in place through
the page table (``kvcompress::paged_attend``: the ``G`` groups' page addresses indexed per head), and other
paths read them back as ``(B, H, N, D)`` by indexing (transient). This is
a training-free, post-hoc version of turning MHA/GQA into GQA with fewer KV heads: Ainslie et al.,
"GQA", 2023 (https://arxiv.org/abs/2305.13245) mean-pools the heads of a group and uptrains;
grouping heads by similarity follows Chen et al., "Optimised Grouped-Query Attention", 2024
(https://arxiv.org/abs/2406.14963).

Departures:
- No uptraining: quality depends entirely on how similar the model's heads already are.
- Keys are merged after rotary embedding; heads share the rotation of a position, so the distance
  measured on pre-rotary calibration keys is the distance of the cached keys.
- The mean skips heads whose slot is padding or evicted (per-head eviction can also leave heads of
  a group holding different tokens in one slot: they are merged anyway, a quality cost).
- Grouping is per layer; the same group count everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.calibration import load_or_build
from kvcompress.paged import PagedBuffer
from kvcompress.methods.grouping import GroupedSlots
from kvcompress.protocols import Representation, Store
from kvcompress.registry import SpecError, register
from kvcompress.step import DenseSegment, GatheredSegment


def head_gram(mean: torch.Tensor, cov: torch.Tensor, heads: int) -> torch.Tensor:
    """``E[x_i . x_j]`` between heads from joint statistics ``mean (H*D,)``, ``cov (H*D, H*D)``: ``(H, H)``."""
    moment = cov.double() + torch.outer(mean.double(), mean.double())  # (H*D, H*D)
    blocks = moment.unflatten(0, (heads, -1)).unflatten(2, (heads, -1))  # (H, D, H, D)
    return blocks.diagonal(dim1=1, dim2=3).sum(-1)  # (H, H)


def ward_groups(gram: torch.Tensor, groups: int) -> torch.Tensor:
    """Group heads by Ward's criterion on a Gram matrix: ``(H,)`` group index, groups numbered by first head.

    The spread of a group ``S`` is ``sum_i E|x_i - mean_S|^2 = sum_i G_ii - sum_ij G_ij / |S|``; each step
    merges the two groups whose union grows the total spread least.
    """
    clusters = [[h] for h in range(gram.shape[0])]

    def spread(members):
        idx = torch.tensor(members)
        return float(gram[idx, idx].sum() - gram[idx][:, idx].sum() / len(members))

    while len(clusters) > groups:
        cost, a, b = min(
            (spread(clusters[a] + clusters[b]) - spread(clusters[a]) - spread(clusters[b]), a, b)
            for a in range(len(clusters))
            for b in range(a + 1, len(clusters))
        )
        clusters[a] += clusters.pop(b)
    group_of = torch.empty(gram.shape[0], dtype=torch.long)
    for g, members in enumerate(sorted(clusters)):
        group_of[members] = g
    return group_of


@register("share_heads")
@dataclass(frozen=True)
class ShareHeads(Representation):
    """Merge similar KV heads of each layer: ``share_heads:groups=2``.

    Args:
        groups: KV heads kept per layer, between 1 and the model's KV heads (that many keeps every
            head: no compression).
        residual: most recent tokens kept in full precision (unmerged).
        calibration: a calibration file (``kvcompress calibrate``); empty for the model's default.
    """

    groups: int = 1
    residual: int = 128
    calibration: str = ""

    takes_inner = True

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1 (KV heads kept per layer), got {self.groups}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")

    def prepare(self, model, inner: Representation | None = None) -> ShareHeadsStorage:
        """Group each layer's heads from the model's calibration; ``inner`` (e.g. ``kivi``) stores the merged heads."""
        calibration = load_or_build(model, self.calibration or None)
        heads = calibration.heads
        if self.groups > heads:
            raise SpecError(f"share_heads: groups={self.groups} must be between 1 and the model's {heads} KV heads")
        group_of = {}
        for layer in range(calibration.keys_mean.shape[0]):
            grams = [
                head_gram(getattr(calibration, f"{kind}_mean")[layer], getattr(calibration, f"{kind}_cov")[layer], heads)
                for kind in ("keys", "values")
            ]
            gram = sum(g / g.trace().clamp_min(1e-30) for g in grams)
            group_of[layer] = ward_groups(gram, self.groups).to(model.device)
        residual = max(self.residual, inner.residual) if inner is not None else self.residual  # one window serves both
        return ShareHeadsStorage(group_of, self.groups, inner, residual)


class ShareHeadsStorage:
    """``share_heads`` prepared for one model: the head groups of every layer (``(H,)`` group index)."""

    needs_positions = False
    fixed_nbytes = 0

    def fixed_state(self) -> dict[str, torch.Tensor]:
        return {f"group_of.{layer}": groups for layer, groups in self.group_of.items()}

    def __init__(self, group_of: dict[int, torch.Tensor], groups: int, inner, residual: int):
        self.group_of, self.groups, self.inner, self.residual = group_of, groups, inner, residual

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> ShareHeadsStore:
        inner = PagedBuffer(extents=True) if self.inner is None else self.inner.new_store(layer_idx, head_dim, dtype)
        return ShareHeadsStore(self.group_of[layer_idx], self.groups, inner)


class ShareHeadsStore:
    """Merged keys and values ``(B, G, N, D)`` in an inner store, read back as ``(B, H, N, D)``.

    Tensors held: the inner store's, and a ``(B, H, N)`` bool validity mask while some slot is
    padding or evicted.
    """

    STATE = ()  # see kvcompress.state
    NESTED = ("inner", "slots")

    def __init__(self, group_of: torch.Tensor, groups: int, inner: Store):
        self.group_of, self.inner = group_of, inner
        self.slots = GroupedSlots(group_of, groups)
        self.block = inner.block
        heads = group_of.shape[0]
        self.member = torch.zeros(groups, heads, device=group_of.device)  # (G, H) 1 where head h is in group g
        self.member[group_of, torch.arange(heads, device=group_of.device)] = 1

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.slots.nbytes + self.member.numel() * self.member.element_size()

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None) -> None:
        batch, heads, n, _ = keys.shape
        weight = torch.ones(batch, heads, n, dtype=keys.dtype, device=keys.device) if valid is None else valid.to(keys.dtype)
        member = self.member.to(keys.dtype)
        count = torch.einsum("gh,bhn->bgn", member, weight).clamp_min(1)[..., None]  # (B, G, n, 1)
        merged_k = torch.einsum("gh,bhn,bhnd->bgnd", member, weight, keys) / count  # (B, G, n, D)
        merged_v = torch.einsum("gh,bhn,bhnd->bgnd", member, weight, values) / count
        group_valid = self.slots.append(valid, batch, heads, len(self.inner), n, keys.device)
        self.inner.append(merged_k, merged_v, group_valid, None)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.keys_values()  # (B, G, N, D)
        return keys[:, self.group_of], values[:, self.group_of]  # (B, H, N, D), transient

    def segment(self) -> DenseSegment | MergedPagesSegment:
        if isinstance(self.inner, PagedBuffer):
            return MergedPagesSegment(self)
        return DenseSegment(*self.keys_values())

    def valid(self) -> torch.Tensor | None:
        return self.slots.valid

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        return self.slots.compact(self.inner, keep)

    def map_batch(self, fn) -> None:
        self.inner.map_batch(fn)
        self.slots.map_batch(fn)


class MergedPagesSegment(GatheredSegment):
    """What attention reads of a :class:`ShareHeadsStore` whose merged heads are in pages: each head reads its
    group's pages in place (:meth:`attend_one`), or the merged keys and values gathered per head once per
    step (:meth:`dense`, the other paths)."""

    def __init__(self, store: ShareHeadsStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.keys_values()

    def attend_one(self, query: torch.Tensor, window: DenseSegment | None, valid: torch.Tensor | None, scaling: float,
                   observed: torch.Tensor) -> torch.Tensor | None:
        """One decode query per row over ``[merged pages | window]`` in one ``kvcompress::paged_attend`` call:
        ``(B, H, G, D)`` grouped queries -> ``(B, H, G, D)`` output, each KV head reading the pages of its
        group through the group's page table; adds the attention each slot received to ``observed`` unless it
        is empty (:meth:`PagedSegment.attend_one <kvcompress.paged.PagedSegment.attend_one>` with the heads'
        groups). None unless the pages and the window are float32 on the CPU (the caller then takes the segment
        path)."""
        return self.store.inner.segment().attend_one(query, window, valid, scaling, observed, heads=self.store.group_of)
