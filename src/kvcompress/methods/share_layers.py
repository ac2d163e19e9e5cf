"""Cross-layer sharing (MiniCache): pairs of adjacent deep layers store one direction per token.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models",
NeurIPS 2024, https://arxiv.org/abs/2405.14873.

Shapes: ``B`` batch, ``H`` KV heads, ``N`` merged tokens, ``D`` head dim, ``M`` retained tokens.

From the layer at fraction ``start`` of the depth on, consecutive full-attention layers are paired.
For every token and KV head, a pair stores one unit key direction, the spherical interpolation
(SLERP) of the two layers' normalised keys with weight ``t`` toward the second, and each layer's
key norm; the same for values. A layer reads its keys back as its own norm times the shared
direction. Where the two layers disagree (cosine similarity of the keys or of the values at most
``threshold``), the token is not merged: both layers' exact vectors are kept for it (the paper's
token retention): its direction slot holds the first layer's vector (norm 1) and the second
layer's vector is kept beside. Training-free; a merged token of a pair costs ``2D + 4`` values
instead of ``4D``, a retained one ``4D + 4``.

Keys are merged after rotary embedding: both layers rotate a token's key by the same angle (its
position), so the angle between them, and the merge, is the same as before rotation.

Departures from the paper:
- Retention uses a fixed cosine threshold per token and head instead of the paper's threshold
  relative to the spread of angular distances.
- Tokens merge as they leave the full-precision window (the ``residual`` most recent tokens), in
  prefill and decoding alike.
- It combines with no other method: eviction would drop different tokens in the two layers of a
  pair, and the shared directions are not handed to a quantizer.
- The pair's tensors are counted once, in the bytes of its first layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.buffer import FullPrecisionBuffer
from kvcompress.paged import PagedBuffer
from kvcompress.protocols import Representation
from kvcompress.registry import register
from kvcompress.step import DenseSegment


def slerp_merge(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``(..., D)`` vectors of two layers into one direction.

    Returns:
        ``direction (..., D)`` unit SLERP of ``a/|a|`` and ``b/|b|`` at ``t``, ``norms (..., 2)``
        ``(|a|, |b|)`` and ``cos (...)`` the cosine similarity of ``a`` and ``b``.
    """
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a, unit_b = a / norm_a.clamp_min(1e-12), b / norm_b.clamp_min(1e-12)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    curved = sin > 1e-4  # nearly parallel vectors: linear interpolation is exact enough
    weight_a = torch.where(curved, torch.sin((1 - t) * angle) / sin.clamp_min(1e-4), torch.full_like(sin, 1 - t))
    weight_b = torch.where(curved, torch.sin(t * angle) / sin.clamp_min(1e-4), torch.full_like(sin, t))
    direction = weight_a * unit_a + weight_b * unit_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return direction, torch.cat([norm_a, norm_b], -1), cos[..., 0]


@register("share_layers")
@dataclass(frozen=True)
class ShareLayers(Representation):
    """Merge adjacent deep layers token by token: ``share_layers:start=0.5,t=0.6,threshold=0.5``.

    Args:
        start: fraction of the depth from which layers are paired (0: all layers).
        t: SLERP weight of the second layer of a pair in the shared direction.
        threshold: tokens whose two layers' keys or values have a cosine similarity at most this
            stay unmerged (1 keeps every token exactly: no compression; -1 merges all).
        residual: most recent tokens kept in full precision, unmerged.
    """

    start: float = 0.5
    t: float = 0.6
    threshold: float = 0.5
    residual: int = 128
    standalone: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 <= self.start < 1:
            raise ValueError(f"start is a fraction of the depth and must be in [0, 1), got {self.start}")
        if not 0 <= self.t <= 1:
            raise ValueError(f"t must be in [0, 1], got {self.t}")
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {self.threshold}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")

    def prepare(self, model, inner: Representation | None = None) -> ShareLayersStorage:
        """Pair the deep full-attention layers of ``model``."""
        config = model.config.get_text_config()
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        deep = [i for i, kind in enumerate(types) if kind == "full_attention" and i >= self.start * len(types)]
        partner = {}
        for first, second in zip(deep[0::2], deep[1::2]):
            partner[first], partner[second] = (first, 0), (first, 1)
        return ShareLayersStorage(partner, self.t, self.threshold, self.residual)


class ShareLayersStorage:
    """``share_layers`` prepared for one model and one cache: which layers pair, and the pairs' shared
    stores (made as the cache's layers start)."""

    needs_positions = False
    fixed_nbytes = 0

    def fixed_state(self) -> dict[str, torch.Tensor]:
        return {}

    def __init__(self, partner: dict[int, tuple[int, int]], t: float, threshold: float, residual: int):
        self.partner = partner  # layer -> (first layer of its pair, 0 or 1)
        self.t, self.threshold, self.residual = t, threshold, residual
        self.pairs: dict[int, MergedPair] = {}

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype):
        if layer_idx not in self.partner:
            return PagedBuffer(extents=True)  # a shallow layer, or the last one of an odd count: its tokens in pages
        first, which = self.partner[layer_idx]
        if which == 0:  # the first layer of a pair is initialised first: a fresh pair for it
            self.pairs[first] = MergedPair(self.t, self.threshold)
        return PairLayerStore(self.pairs[first], which)


class MergedPair:
    """The merged tokens of two layers, shared by their two :class:`PairLayerStore` s.

    Tensors held: unit directions ``(B, H, N, D)`` of keys and values and their ``(B, H, N, 2)``
    per-layer norms (each in a :class:`FullPrecisionBuffer`, with its validity mask while some
    slot is padding), a ``(B, H, N)`` bool marking retained tokens, the second layer's exact keys
    and values of the retained tokens ``(M, D)``, and, between the two layers' turns in one
    forward pass, the first layer's tokens waiting for the second's.
    """

    STATE = ("retained", "retained_k", "retained_v")  # see kvcompress.state (nothing is staged between forwards)
    NESTED = ("directions", "norms")

    def __init__(self, t: float, threshold: float):
        self.t, self.threshold = t, threshold
        self.directions = FullPrecisionBuffer()
        self.norms = FullPrecisionBuffer()
        self.retained: torch.Tensor | None = None  # (B, H, N) bool
        self.retained_k: torch.Tensor | None = None  # (M, 2, D)
        self.retained_v: torch.Tensor | None = None
        self.staged: tuple | None = None  # the first layer's (keys, values, valid) awaiting the second

    @property
    def nbytes(self) -> int:
        tensors = [self.retained, self.retained_k, self.retained_v, *(self.staged or ())]
        return self.directions.nbytes + self.norms.nbytes + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def merge(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Merge the second layer's ``(B, H, n, D)`` tokens with the staged ones of the first."""
        first_k, first_v, valid = self.staged
        if first_k.shape != keys.shape:
            raise RuntimeError("the two layers of a share_layers pair settled different tokens")
        self.staged = None
        dir_k, norm_k, cos_k = slerp_merge(first_k, keys, self.t)
        dir_v, norm_v, cos_v = slerp_merge(first_v, values, self.t)
        retained = (cos_k <= self.threshold) | (cos_v <= self.threshold)  # (B, H, n)
        # A retained token keeps the first layer's exact vector in its direction slot (norm 1) and
        # the second layer's among the retained vectors.
        unmerged = retained[..., None]
        dir_k, dir_v = torch.where(unmerged, first_k, dir_k), torch.where(unmerged, first_v, dir_v)
        norm_k[..., :1] = torch.where(unmerged, 1.0, norm_k[..., :1])
        norm_v[..., :1] = torch.where(unmerged, 1.0, norm_v[..., :1])
        self.directions.append(dir_k, dir_v, valid)
        self.norms.append(norm_k, norm_v, None)
        exact_k, exact_v = keys[retained], values[retained]  # (m, D)
        if self.retained is None:
            self.retained, self.retained_k, self.retained_v = retained, exact_k, exact_v
            return
        # Retained vectors are kept in the row-major order of the (B, H, N) mask, which interleaves
        # the old tokens and the new ones of every head.
        combined = torch.cat([self.retained, retained], -1)
        is_new = torch.cat([torch.zeros_like(self.retained), torch.ones_like(retained)], -1)[combined]  # (M,)
        merged = []
        for old, new in ((self.retained_k, exact_k), (self.retained_v, exact_v)):
            both = old.new_empty(len(is_new), *old.shape[1:])
            both[~is_new], both[is_new] = old, new
            merged.append(both)
        self.retained, (self.retained_k, self.retained_v) = combined, merged

    def layer_keys_values(self, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transient ``(B, H, N, D)`` keys and values of the pair's first (0) or second (1) layer."""
        directions_k, directions_v = self.directions.keys_values()
        norms_k, norms_v = self.norms.keys_values()
        keys = directions_k * norms_k[..., which : which + 1]
        values = directions_v * norms_v[..., which : which + 1]
        if which == 1:
            keys[self.retained], values[self.retained] = self.retained_k, self.retained_v
        return keys, values

    def map_batch(self, fn) -> None:
        if self.retained is None:
            return
        batch_shape = self.retained.shape
        dense = []
        for exact in (self.retained_k, self.retained_v):
            full = exact.new_zeros(*batch_shape, exact.shape[1])  # (B, H, N, D)
            full[self.retained] = exact
            dense.append(fn(full))
        self.directions.map_batch(fn)
        self.norms.map_batch(fn)
        self.retained = fn(self.retained)
        self.retained_k, self.retained_v = (full[self.retained] for full in dense)


class PairLayerStore:
    """One layer's side of a :class:`MergedPair` (``which`` 0: the first layer, 1: the second)."""

    block = 1
    STATE = ()  # see kvcompress.state: the pair's entries go with its first layer
    NESTED = ("owned",)

    def __init__(self, pair: MergedPair, which: int):
        self.pair, self.which = pair, which

    @property
    def owned(self):
        return self.pair if self.which == 0 else _NOTHING

    def _staged(self) -> tuple | None:
        return self.pair.staged if self.which == 0 else None

    def __len__(self) -> int:
        staged = self._staged()
        return len(self.pair.directions) + (staged[0].shape[2] if staged else 0)

    @property
    def nbytes(self) -> int:
        return self.pair.nbytes if self.which == 0 else 0  # counted once, with the first layer

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None) -> None:
        if self.which == 0:
            self.pair.staged = (keys, values, valid)
        else:
            self.pair.merge(keys, values)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        staged = self._staged()  # only between the two layers' turns in a forward pass
        if not len(self.pair.directions):
            return staged[0], staged[1]
        keys, values = self.pair.layer_keys_values(self.which)
        if staged:
            keys, values = torch.cat([keys, staged[0]], 2), torch.cat([values, staged[1]], 2)
        return keys, values

    def segment(self) -> DenseSegment:
        return DenseSegment(*self.keys_values())

    def valid(self) -> torch.Tensor | None:
        valid, staged = self.pair.directions.valid(), self._staged()
        if staged is None or (valid is None and staged[2] is None):
            return valid
        batch, heads, n = staged[0].shape[:3]
        ones = torch.ones(batch, heads, len(self.pair.directions), dtype=torch.bool, device=staged[0].device)
        staged_valid = staged[2] if staged[2] is not None else torch.ones(batch, heads, n, dtype=torch.bool, device=ones.device)
        return torch.cat([ones if valid is None else valid, staged_valid], -1)

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("share_layers does not combine with eviction (refused when the spec is parsed)")

    def map_batch(self, fn) -> None:
        if self.which == 0:  # the pair is shared: transform it once
            self.pair.map_batch(fn)


class _Nothing:
    STATE = ()


_NOTHING = _Nothing()
