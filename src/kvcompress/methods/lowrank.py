"""Low-rank K/V ("multi-head compression"): the cache stores coordinates on a calibrated basis.

Shapes: ``B`` batch, ``H`` KV heads, ``N`` stored tokens, ``D`` head dim. Heads are projected in
``G`` groups of ``E = H / G * D`` dims: by default one group per layer (the layer's KV heads
concatenated, ``G = 1``), or one per head (``per_head``, ``G = H``). ``r_k``/``r_v`` are the
layer's key and value ranks.

Per layer, keys and values are projected onto the leading principal directions of their
calibration statistics (:mod:`kvcompress.calibration`): ``z = (x - mu) U`` with ``U (E, r)``
orthonormal, and rebuilt as ``x ~ mu + z Uᵀ``. The store holds ``z``, ``(B, G, N, r)``, and rebuilds
``(B, H, N, D)`` keys and values transiently for attention.

Keys use a **pre-rotary** basis: the store undoes the rotary rotation at each token's position,
projects, and rotates back when it rebuilds; it keeps the ``(B, H, N)`` int32 positions for that.
Measured on SmolLM2-135M (``experiments/lowrank_key_basis.py``; calibrated on code, 2,048 prose
tokens compressed, 256 scored), keeping half the key dims per head costs +1.6% perplexity with a
pre-rotary basis against +50% with a post-rotary one (joint heads: -0.7% against +12.9%): rotation
spreads a key's energy over every channel pair at a rate that depends on its position, so
post-rotary keys are far from low-rank. The price: rebuilding costs a rotation per key per step,
and queries cannot be projected into the key latent space (the rotation differs per key), so only
the value half of attention runs in latent space (:class:`LatentValues`). On the CPU the keys'
logits come from ``kvcompress::lowrank_logits`` (``csrc/lowrank.c``), which rebuilds, rotates and
multiplies each key while it is in registers and cache, never writing the ``(B, H, N, D)`` keys.

Values are mixed in latent space: ``softmax(q Kᵀ) (mu + Z Uᵀ) = mu + (softmax(q Kᵀ) Z) Uᵀ``,
exactly (softmax rows sum to one). The store's attention segment (:class:`LatentSegment`) does
that for the stored tokens, in the one softmax the layer's attention takes over stored and window
tokens; :meth:`LowRankStore.keys_values` rebuilds full-precision values for the reference path and
for scorers.

Composition: ``lowrank+kivi`` hands the latents to KIVI's store, which quantizes them like keys
and values of head dim ``r_k``/``r_v`` (its ``group`` must divide both ranks). The pipeline's
full-precision window keeps the larger of the two ``residual`` s. An eviction method before it
(``snapkv+lowrank``) works as usual; with per-head eviction, heads of one group may hold different
tokens in one slot, which a joint basis was not calibrated for (a quality cost, not an error).

Related work: EigenAttention (Saxena et al. 2024, https://arxiv.org/abs/2408.05646) projects K/V
on PCA bases from calibration activations; Palu (Chang et al. 2024, https://arxiv.org/abs/2407.21118)
factorises the K/V projection weights with group-head low rank and reconstructs keys before rotary.

Departures:
- Training-free PCA of calibration activations (as EigenAttention), not Palu's SVD of the weights;
  bases are per layer and per head group (joint by default: on SmolLM2 per-head bases cost ~2-3x
  more perplexity at the same bytes, the gap Palu reports for its group-head decomposition).
- The first ``sink`` tokens of each row are also kept in full precision: attention-sink keys are
  outliers that no basis fits (SmolLM2, ``key_ratio=0.75,value_ratio=0.25``: +28% perplexity
  with ``sink=0``, +3% with the default 4).
- Rebuilding a key costs ``r_k`` multiply-adds per dimension, more arithmetic than reading the
  full-precision key costs memory time on a CPU at the default ranks: decode stays slower than
  uncompressed (measurements in ``experiments/README.md``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvcompress import native
from kvcompress.buffer import CHUNK, FullPrecisionBuffer, round_up
from kvcompress.calibration import Rotary, load_or_build
from kvcompress.kernels import lowrank_logits
from kvcompress.methods.grouping import GroupedSlots
from kvcompress.protocols import Representation, Store
from kvcompress.registry import SpecError, register
from kvcompress.step import DenseSegment

ENERGY_ALIGN = 8  # ranks chosen by energy are rounded up to a multiple of this (KIVI groups, matmuls)


@dataclass
class LayerBasis:
    """One layer's bases: ``*_mean (G, E)``, ``*_basis (G, E, r)`` with orthonormal columns.

    A full-rank side (``r = E``) has no basis (None): its tokens are stored as they come, which is
    exactly "compression off" (a full orthonormal basis would rebuild them only to ~1e-6).
    """

    groups: int
    key_mean: torch.Tensor | None
    key_basis: torch.Tensor | None
    value_mean: torch.Tensor | None
    value_basis: torch.Tensor | None

    @property
    def ranks(self) -> tuple[int | None, int | None]:
        """``(r_k, r_v)``, None for a full-rank side."""
        return tuple(None if b is None else b.shape[-1] for b in (self.key_basis, self.value_basis))

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.key_mean, self.key_basis, self.value_mean, self.value_basis) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def principal(mean: torch.Tensor, cov: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal directions of each head group from a layer's joint statistics.

    Args:
        mean: ``(H*D,)``; cov: ``(H*D, H*D)``; groups: ``G``, which must divide ``H*D`` into equal
            blocks of whole heads.

    Returns:
        ``mean (G, E)``, ``basis (G, E, E)`` columns by decreasing variance, ``variance (G, E)``.
    """
    e = mean.shape[0] // groups
    blocks = cov.double().unflatten(0, (groups, e)).unflatten(2, (groups, e))  # (G, E, G, E)
    diag = torch.stack([blocks[g, :, g] for g in range(groups)])  # (G, E, E)
    variance, basis = torch.linalg.eigh(diag)  # ascending
    return mean.view(groups, e), basis.flip(-1).float(), variance.flip(-1).clamp_min(0).float()


def energy_rank(variance: torch.Tensor, energy: float) -> int:
    """Smallest rank (rounded up to :data:`ENERGY_ALIGN`) keeping ``energy`` of every group's variance."""
    kept = variance.cumsum(-1) / variance.sum(-1, keepdim=True).clamp_min(1e-30)  # (G, E)
    rank = int((kept < energy - 1e-9).sum(-1).max()) + 1
    dims = variance.shape[-1]
    return min(dims, math.ceil(rank / ENERGY_ALIGN) * ENERGY_ALIGN)


@register("lowrank")
@dataclass(frozen=True)
class LowRank(Representation):
    """Low-rank K/V on calibrated bases: ``lowrank`` (a quarter of the key dims, three quarters of the
    value dims), ``lowrank:ratio=0.5`` or ``lowrank:energy=0.95``.

    Args:
        ratio: fraction of each group's dims dropped, for keys and values alike; ``0`` keeps every
            dim (no compression). With no rank parameter at all, keys drop 0.75 and values 0.25:
            half the bytes, like ``ratio=0.5``, at about half its perplexity cost (keys are low-rank
            before rotary, values are not; ``experiments/README.md``), and fewer key dims to rebuild.
        key_ratio: fraction of key dims dropped; overrides ``ratio`` for keys.
        value_ratio: fraction of value dims dropped; overrides ``ratio`` for values.
        energy: instead of ratios, per layer the smallest ranks keeping this fraction of the
            calibration variance of every group, for keys and values separately (rounded up to a
            multiple of 8).
        per_head: one basis per KV head instead of one per layer's KV heads jointly.
        residual: most recent tokens kept in full precision.
        sink: first tokens held also kept in full precision (attention sinks).
        calibration: a calibration file (``kvcompress calibrate``); empty for the model's default
            one, built on first use.
    """

    ratio: float | None = None
    key_ratio: float | None = None
    value_ratio: float | None = None
    energy: float | None = None
    per_head: bool = False
    residual: int = 128
    sink: int = 4
    calibration: str = ""

    takes_inner = True

    def __post_init__(self):
        for name in ("ratio", "key_ratio", "value_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1) (the fraction of dims dropped), got {value}")
        if self.energy is not None:
            if not 0 < self.energy <= 1:
                raise ValueError(f"energy must be in (0, 1] (the fraction of variance kept), got {self.energy}")
            if any(getattr(self, n) is not None for n in ("ratio", "key_ratio", "value_ratio")):
                raise ValueError("give energy or ratios (ratio, key_ratio, value_ratio), not both")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")

    def prepare(self, model, inner: Representation | None = None) -> LowRankStorage:
        """Bases of every layer from the model's calibration (read, or built and saved on first use).

        ``inner`` (e.g. ``kivi``) stores the latents; it must accept every layer's ranks as its head dim.
        """
        calibration = load_or_build(model, self.calibration or None)
        heads, dim = calibration.heads, calibration.head_dim
        groups = heads if self.per_head else 1
        dtype, device = model.dtype, model.device
        bases = {}
        for layer in range(calibration.keys_mean.shape[0]):
            parts = []
            for kind, ratio in zip(("keys", "values"), self.ratios()):
                mean, basis, variance = principal(
                    getattr(calibration, f"{kind}_mean")[layer], getattr(calibration, f"{kind}_cov")[layer], groups
                )
                rank = self.rank(variance, ratio)
                if rank == basis.shape[-1]:
                    parts += [None, None]
                else:  # keys: each latent dim's column contiguous, the layout the logits kernel reads
                    basis = basis[..., :rank].to(device, dtype)
                    basis = basis.transpose(-1, -2).contiguous().transpose(-1, -2) if kind == "keys" else basis.contiguous()
                    parts += [mean.to(device, dtype), basis]
            bases[layer] = LayerBasis(groups, *parts)
        residual = max(self.residual, inner.residual) if inner is not None else self.residual  # one window serves both
        storage = LowRankStorage(bases, Rotary(model), inner, heads, residual, self.sink)
        for layer in bases:  # fail now, not in the middle of a forward
            storage.new_store(layer, dim, dtype)
        return storage

    def ratios(self) -> tuple[float, float]:
        """The fractions of key and value dims dropped (``energy`` aside): 0.75 and 0.25 when the spec
        gives no ratio, else ``key_ratio`` / ``value_ratio``, each falling back on ``ratio`` (or 0.5)."""
        if self.ratio is None and self.key_ratio is None and self.value_ratio is None:
            return 0.75, 0.25
        base = 0.5 if self.ratio is None else self.ratio
        return tuple(base if r is None else r for r in (self.key_ratio, self.value_ratio))

    def rank(self, variance: torch.Tensor, ratio: float) -> int:
        """Rank of one layer's keys or values from ``(G, E)`` variances and the spec."""
        dims = variance.shape[-1]
        if self.energy is not None:
            return energy_rank(variance, self.energy)
        return max(1, round(dims * (1 - ratio)))


class LowRankStorage:
    """``lowrank`` prepared for one model: the bases of every layer, its rotary tables, and the inner
    storage of the latents (full precision by default)."""

    needs_positions = True

    def __init__(self, bases: dict[int, LayerBasis], rotary: Rotary, inner, heads: int, residual: int, sink: int):
        self.bases, self.rotary, self.inner = bases, rotary, inner
        self.heads, self.residual, self.sink = heads, residual, sink

    @property
    def fixed_nbytes(self) -> int:
        return sum(b.nbytes for b in self.bases.values()) + self.rotary.nbytes

    def fixed_state(self) -> dict[str, torch.Tensor]:
        names = ("key_mean", "key_basis", "value_mean", "value_basis")
        return {
            f"{layer}.{name}": getattr(basis, name)
            for layer, basis in self.bases.items()
            for name in names
            if getattr(basis, name) is not None
        }

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> LowRankStore:
        basis = self.bases[layer_idx]
        width = head_dim * self.heads // basis.groups  # E
        ranks = tuple(width if r is None else r for r in basis.ranks)
        if self.inner is None:
            inner = FullPrecisionBuffer()
        else:
            try:
                for rank in ranks:  # the inner store sees latents of width r_k and r_v as its "head dim"
                    inner = self.inner.new_store(layer_idx, rank, dtype)
            except SpecError as err:
                raise SpecError(
                    f"lowrank+{self.inner.name}: layer {layer_idx} stores latents of {ranks[0]} (keys) and {ranks[1]} "
                    f"(values) dims, which {self.inner.name} must accept as its head dim: {err}"
                ) from None
        return LowRankStore(basis, self.rotary, inner, self.sink, self.heads)


class LowRankStore:
    """Latent keys and values of one layer, stored by an inner store, plus what rebuilding needs.

    Tensors held: the inner store's (``(B, G, N, r_k)``/``(B, G, N, r_v)`` latents, full precision
    or quantized), ``positions (B, H, N)`` int32, a ``(B, H, N)`` bool validity mask while some slot
    is padding or evicted, and the :class:`Sinks`.
    """

    STATE = ("positions",)  # see kvcompress.state
    NESTED = ("inner", "slots", "sinks")

    def __init__(self, basis: LayerBasis, rotary, inner: Store, sink: int, heads: int):
        self.basis, self.rotary, self.inner = basis, rotary, inner
        self.block = inner.block
        self._positions: torch.Tensor | None = None  # (B, H, >= N) int32, room for CHUNK more at a time
        self._held = 0  # positions held (N)
        device = next((t.device for t in (basis.key_mean, basis.value_mean) if t is not None), None)
        group_of = torch.arange(heads, device=device) // (heads // basis.groups)  # contiguous groups
        self.slots = GroupedSlots(group_of, basis.groups)  # per-head validity
        self.sinks = Sinks(sink)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def nbytes(self) -> int:
        held = self._positions.numel() * self._positions.element_size() if self._positions is not None else 0
        return self.inner.nbytes + held + self.sinks.nbytes + self.slots.nbytes

    @property
    def positions(self) -> torch.Tensor | None:
        """``(B, H, N)`` int32 position of every slot (a view of a buffer with room for more)."""
        return None if self._positions is None else self._positions[..., : self._held]

    @positions.setter
    def positions(self, positions: torch.Tensor | None) -> None:
        self._positions, self._held = positions, 0 if positions is None else positions.shape[-1]

    def _add_positions(self, positions: torch.Tensor) -> None:
        """Write ``(B, H, n)`` positions after the held ones, in place; grow the buffer ``CHUNK`` slots at a
        time (a decode step copies no position)."""
        held, n = self._held, self._held + positions.shape[-1]
        room = self._positions
        if room is None or n > room.shape[-1] or room.shape[:2] != positions.shape[:2]:
            room = positions.new_empty(*positions.shape[:2], round_up(n, CHUNK))
            if held:
                room[..., :held] = self._positions[..., :held]
        room[..., held:n] = positions
        self._positions, self._held = room, n

    def trim(self) -> None:
        """Release the positions' room for more (a context at rest holds what it stores)."""
        if self._positions is not None and self._positions.shape[-1] != self._held:
            self._positions = self.positions.clone()

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, n, dim = x.shape
        groups = self.basis.groups
        return x.view(batch, groups, heads // groups, n, dim).transpose(2, 3).flatten(3)  # (B, G, n, E)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, groups, n, e = x.shape
        return x.view(batch, groups, n, heads // groups, e * groups // heads).transpose(2, 3).flatten(1, 2)  # (B, H, n, D)

    def _project(self, x: torch.Tensor, valid: torch.Tensor | None, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, G, n, r)`` of ``(B, H, n, D)`` vectors; a head's padding or evicted slot counts as
        its mean, so what it holds (a filler) cannot leak into the latent of the group's other heads."""
        centered = self._grouped(x) - mean[:, None]  # (B, G, n, E)
        if valid is not None:
            centered = centered * self._grouped(valid[..., None].to(x.dtype).expand_as(x))
        return centered @ basis

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None = None) -> None:
        """Add ``(B, H, n, D)`` post-rotary keys and values at ``positions`` ``(B, H, n)``."""
        batch, heads, n, _ = keys.shape
        if positions is None:
            raise ValueError("LowRankStore.append needs the tokens' positions (lowrank.needs_positions)")
        self.sinks.add(keys, values, valid, len(self.inner))
        b = self.basis
        z_k, z_v = self._grouped(keys), self._grouped(values)  # (B, G, n, E)
        if b.key_basis is not None:
            z_k = self._project(self.rotary.unrotate(keys, positions), valid, b.key_mean, b.key_basis)  # (B, G, n, r_k)
        if b.value_basis is not None:
            z_v = self._project(values, valid, b.value_mean, b.value_basis)  # (B, G, n, r_v)
        group_valid = self.slots.append(valid, batch, heads, len(self.inner), n, keys.device)  # (B, G, n)
        self.inner.append(z_k, z_v, group_valid, None)
        self._add_positions(positions.to(torch.int32))

    def _rebuild(self, z: torch.Tensor, basis: torch.Tensor | None, mean: torch.Tensor | None) -> torch.Tensor:
        """``(B, H, N, D)`` vectors of one side from its ``(B, G, N, r)`` latents (a view of them when
        the side is full rank)."""
        heads = self.positions.shape[1]
        return self._heads(z if basis is None else z @ basis.transpose(1, 2) + mean[:, None], heads)

    def key_logits(self, query: torch.Tensor, z_k: torch.Tensor) -> torch.Tensor | None:
        """``(B, H, R, N)`` logits of ``R`` query rows per KV head over the stored keys, rebuilt and rotated
        token by token in ``kvcompress::lowrank_logits`` (never written out); None where it does not
        apply (a full-rank key side, not float32 on the CPU, no C compiler, another rotary layout)."""
        b = self.basis
        if b.key_basis is None or not _logits_kernel_applies(query, z_k, self.rotary):
            return None
        cos, sin = self.rotary.table(int(self.positions.max()) + 1, torch.float32, z_k.device)
        logits = lowrank_logits(query.contiguous(), z_k, b.key_basis.transpose(1, 2), b.key_mean, self.positions, cos, sin)
        if self.sinks.keys is not None:
            self.sinks.write_logits(logits, query)
        return logits

    def _keys(self, z_k: torch.Tensor) -> torch.Tensor:
        b = self.basis
        keys = self._rebuild(z_k, b.key_basis, b.key_mean)
        if b.key_basis is not None:
            keys = self.rotary.rotate(keys, self.positions)
        if self.sinks.keys is not None:  # (a full-rank side is a view of the inner store: copy it first)
            keys = keys.clone() if b.key_basis is None else keys
            self.sinks.write_keys(keys)
        return keys

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.basis
        z_k, z_v = self.inner.keys_values()  # (B, G, N, r_k), (B, G, N, r_v)
        values = self._rebuild(z_v, b.value_basis, b.value_mean)
        if self.sinks.values is not None:
            values = values.clone() if b.value_basis is None else values
            self.sinks.write_values(values)
        return self._keys(z_k), values

    def segment(self) -> LatentSegment | DenseSegment:
        """Rebuilt keys and the stored values as latents (mixed in latent space); plain rebuilt keys and
        values when the value side is full rank (nothing to gain)."""
        b = self.basis
        if b.value_basis is None:
            return DenseSegment(*self.keys_values())
        z_k, z_v = self.inner.keys_values()  # dequantized once for both
        heads = self.positions.shape[1]
        sink_slot = sink_error = None
        if self.sinks.slot is not None and bool((self.sinks.slot >= 0).any()):
            sink_slot = self.sinks.slot.clone()  # (B, H, m); a copy: settling more tokens fills it in place
            group = torch.arange(heads, device=z_v.device) // (heads // b.groups)  # (H,)
            slot = sink_slot.clamp_min(0)
            rows = torch.arange(slot.shape[0], device=z_v.device)[:, None, None]
            picked = z_v[rows, group[None, :, None], slot]  # (B, H, m, r_v), without copying every slot
            rebuilt = picked @ b.value_basis[group].transpose(1, 2)[None] + b.value_mean[group][None, :, None]  # (B, H, m, E)
            within = torch.arange(heads, device=z_v.device) % (heads // b.groups)  # (H,) place of the head in its group
            dim = self.sinks.values.shape[-1]
            index = (within[:, None] * dim + torch.arange(dim, device=z_v.device))[None, :, None].expand(*slot.shape, dim)
            rebuilt = rebuilt.gather(-1, index)  # (B, H, m, D) this head's part of the group's vector
            sink_error = (self.sinks.values - rebuilt) * (sink_slot >= 0)[..., None]
        return LatentSegment(z_k, LatentValues(z_v, b.value_basis, b.value_mean, sink_slot, sink_error), self)

    def valid(self) -> torch.Tensor | None:
        return self.slots.valid

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the slots some head of a group keeps; return the ``(B, H, n)`` old slot of each."""
        old = len(self.inner)
        index = self.slots.compact(self.inner, keep)  # (B, H, n)
        self.positions = self.positions.gather(-1, index)
        self.sinks.compact(index, old)
        return index

    def map_batch(self, fn) -> None:
        self.inner.map_batch(fn)
        self.slots.map_batch(fn)
        self.sinks.map_batch(fn)
        if self.positions is not None:
            self.positions = fn(self.positions)


class Sinks:
    """Full-precision copies of the first ``count`` valid tokens of every row and head of a store.

    Tensors held: ``keys``/``values (B, H, m, D)`` and ``slot (B, H, m)`` int64, the store slot of
    each copy (-1 while unfilled, or once an eviction dropped its token). Tokens reach the store in
    position order, so these are each sequence's first tokens whatever its padding; copying stops
    at the first eviction (later tokens are not sinks).
    """

    STATE = ("keys", "values", "slot", "open")  # see kvcompress.state

    def __init__(self, count: int):
        self.count = count
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.slot: torch.Tensor | None = None
        self.open = count > 0

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.keys, self.values, self.slot) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, first_slot: int) -> None:
        """Copy the sinks among ``(B, H, n, D)`` tokens about to occupy slots ``first_slot ..``."""
        if not self.open:
            return
        batch, heads, n, dim = keys.shape
        if self.slot is None:
            self.slot = torch.full((batch, heads, self.count), -1, dtype=torch.long, device=keys.device)
            self.keys = keys.new_zeros(batch, heads, self.count, dim)
            self.values = values.new_zeros(batch, heads, self.count, dim)
        real = torch.ones(batch, heads, n, dtype=torch.bool, device=keys.device) if valid is None else valid
        rank = (self.slot >= 0).sum(-1, keepdim=True) + real.long().cumsum(-1) - 1  # (B, H, n) sink index
        b, h, j = (real & (rank < self.count)).nonzero(as_tuple=True)
        r = rank[b, h, j]
        self.slot[b, h, r] = first_slot + j
        self.keys[b, h, r], self.values[b, h, r] = keys[b, h, j], values[b, h, j]
        self.open = bool((self.slot < 0).any())

    def _held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, h, j)`` of every sink copy that stands for a held slot (``self.slot[b, h, j]``)."""
        return (self.slot >= 0).nonzero(as_tuple=True)

    def write_keys(self, keys: torch.Tensor) -> None:
        """Overwrite the sinks' slots of rebuilt ``(B, H, N, D)`` keys with the copies."""
        b, h, j = self._held()
        keys[b, h, self.slot[b, h, j]] = self.keys[b, h, j]

    def write_values(self, values: torch.Tensor) -> None:
        """Overwrite the sinks' slots of rebuilt ``(B, H, N, D)`` values with the copies."""
        b, h, j = self._held()
        values[b, h, self.slot[b, h, j]] = self.values[b, h, j]

    def write_logits(self, logits: torch.Tensor, query: torch.Tensor) -> None:
        """Overwrite the sinks' slots of ``(B, H, R, N)`` logits over rebuilt keys with those of the copies,
        for the ``(B, H, R, D)`` query rows."""
        b, h, j = self._held()
        logits[b, h, :, self.slot[b, h, j]] = (query[b, h] @ self.keys[b, h, j][..., None]).squeeze(-1)  # (K, R)

    def compact(self, index: torch.Tensor, old: int) -> None:
        """Follow a compaction that kept ``index`` ``(B, H, n)`` (old slots) of ``old`` slots."""
        self.open = False
        if self.slot is None:
            return
        position = torch.arange(index.shape[-1], device=index.device).expand_as(index)
        new_slot = torch.full((*index.shape[:2], old), -1, dtype=torch.long, device=index.device).scatter_(-1, index, position)
        self.slot = torch.where(self.slot >= 0, new_slot.gather(-1, self.slot.clamp_min(0)), -1)

    def map_batch(self, fn) -> None:
        if self.slot is not None:
            self.keys, self.values, self.slot = fn(self.keys), fn(self.values), fn(self.slot)


@dataclass(frozen=True)
class LatentValues:
    """A store's values as latents, for attention that mixes them before projecting back.

    Attributes:
        latent: ``(B, G, N, r)``; basis: ``(G, E, r)``; mean: ``(G, E)``, ``E = H / G * D``.
        sink_slot: ``(B, H, m)`` slots of the sinks (exact full-precision values; -1: none), or None.
        sink_error: ``(B, H, m, D)`` exact minus rebuilt value of each sink (0 where none), or None.
    """

    latent: torch.Tensor
    basis: torch.Tensor
    mean: torch.Tensor
    sink_slot: torch.Tensor | None
    sink_error: torch.Tensor | None

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights @ values`` for ``(B, H, Q, N)`` attention weights on the stored slots (``Q`` rows per
        KV head): ``(B, H, Q, D)``.

        ``w (mu + Z Uᵀ) = (Σw) mu + (w Z) Uᵀ``: ``N r`` multiply-adds per row, instead of rebuilding
        ``N E`` values per group; sinks add ``w (exact - rebuilt)`` at their slots.
        """
        batch, heads, rows, n = weights.shape
        groups, r = self.latent.shape[1], self.latent.shape[-1]
        per_group = heads // groups
        dim = self.mean.shape[-1] // per_group
        grouped = weights.reshape(batch, groups, per_group * rows, n)  # a group's KV heads' rows
        mixed = (grouped @ self.latent).view(batch, groups, per_group, rows, r)  # (B, G, H/G, Q, r)
        basis = self.basis.view(groups, per_group, dim, r)  # KV head j of group g: its D rows of the basis
        mean = self.mean.view(groups, per_group, dim)
        total = grouped.sum(-1).view(batch, groups, per_group, rows, 1)  # weight on the stored slots
        out = (mixed @ basis.transpose(-1, -2) + total * mean[:, :, None]).view(batch, heads, rows, dim)
        if self.sink_slot is not None:
            slot = self.sink_slot.clamp_min(0)  # (B, H, m)
            at_sinks = weights.gather(-1, slot[:, :, None].expand(batch, heads, rows, slot.shape[-1]))  # (B, H, Q, m)
            out = out + at_sinks @ self.sink_error
        return out


@dataclass(frozen=True)
class LatentSegment:
    """The attention segment of a :class:`LowRankStore`: keys as their ``(B, G, N, r_k)`` latents (logits
    from :meth:`LowRankStore.key_logits`, or over keys rebuilt and rotated once, :attr:`keys`), values
    left latent and mixed by :meth:`LatentValues.mix`."""

    key_latent: torch.Tensor
    values: LatentValues
    store: LowRankStore
    dense_only = False

    def __len__(self) -> int:
        return self.key_latent.shape[2]

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """``(B, H, N, D)`` rebuilt, rotated keys (the path without the kernel)."""
        return self.store._keys(self.key_latent)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.keys_values()

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        fused = self.store.key_logits(query, self.key_latent)
        return fused if fused is not None else query @ self.keys.transpose(-1, -2)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return self.values.mix(weights)


def _logits_kernel_applies(query: torch.Tensor, z_k: torch.Tensor, rotary: Rotary) -> bool:
    return (
        query.dtype == z_k.dtype == torch.float32
        and query.device.type == z_k.device.type == "cpu"
        and z_k.stride(-1) == 1
        and query.shape[-1] % 2 == 0
        and rotary.half_split
        and native.load("lowrank") is not None
    )


