"""KIVI: asymmetric low-bit quantization of the KV cache.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
https://arxiv.org/abs/2402.02750.

Keys are quantized per channel (min/max over a group of ``group`` tokens, one scale per channel),
because key outliers sit in fixed channels; values are quantized per token (min/max over groups of
``group`` channels). The ``residual`` most recent tokens stay in full precision. Codes are
bit-packed into uint8, so 2-bit storage costs 2 bits per element plus scales and zero points.

Departures from the paper:
- Tokens leave the full-precision window one group at a time, as soon as ``residual + group``
  tokens are waiting, so at least ``residual`` recent tokens are always full precision (the paper
  flushes the whole residual once it reaches ``residual`` tokens).
- Scales and zero points are stored in float16 (bfloat16 for bfloat16 models).
- Padding and evicted slots are excluded from a key group's min/max.

Attention reads the codes directly (:class:`KIVISegment`): per-channel key scales and zero points
fold into the query, ``q . (s c + z) = (q s) . c + q . z``, and per-token value scales into the
attention weights, so unpacking and the dot products happen in one pass of a small C kernel
(``csrc/kivi.c``, registered as the ``kvcompress::kivi_key_logits`` and ``kvcompress::kivi_value_mix``
ops) that never writes full-precision keys or values. Keys are stored channel-major for it. Where
the kernel cannot be built (no C compiler), on GPUs, and under :func:`kvcompress.attention.reference_path`,
attention reads keys and values dequantized in plain PyTorch (the reference the kernel is tested
against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress import native
from kvcompress.kernels import key_logits, kernel_pair, kivi_attend, kivi_attend_heads, mask_bytes, value_mix
from kvcompress.protocols import Representation, Storage
from kvcompress.registry import SpecError, register
from kvcompress.step import DenseSegment


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``< 2**bits`` along the last dim: ``(..., D)`` -> ``(..., P)`` uint8, ``P = D * bits / 8``.

    Slot ``i`` of byte ``p`` (bits ``i * bits ..``) holds channel ``i * P + p``, so each slot
    unpacks to a contiguous run of channels (what the kernel vectorizes over).
    """
    slots = codes.to(torch.uint8).unflatten(-1, (8 // bits, -1))  # (..., per, P): slot i is channels i*P ..
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)[:, None]
    return (slots << shifts).sum(-2, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., P)`` uint8 -> ``(..., D)`` uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)[:, None]
    return ((packed[..., None, :] >> shifts) & (2**bits - 1)).flatten(-2)


def quantize(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None):
    """Asymmetric min/max quantization of ``x`` with statistics reduced over ``dim``.

    Args:
        x: tensor to quantize.
        bits: code width.
        dim: dimension the min and max are taken over (kept with size 1 in the outputs).
        valid: bool broadcastable to ``x``; False entries are ignored by the min/max.

    Returns:
        ``(codes, scale, minimum)``: uint8 codes shaped like ``x``, and ``scale``/``minimum`` in
        ``x``'s dtype with ``dim`` of size 1, so that ``x ~= codes * scale + minimum``.
    """
    levels = 2**bits - 1
    lo, hi = minmax(x, dim, valid)
    scale = (hi - lo).clamp_min(1e-8) / levels
    codes = ((x - lo) / scale).round_().clamp_(0, levels)
    return codes.to(torch.uint8), scale, lo


def minmax(x: torch.Tensor, dim: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s least and greatest entries over ``dim`` (kept with size 1), ignoring False entries of ``valid``
    (0 and 0 where every entry is invalid)."""
    if valid is None:
        return x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    lo = torch.where(valid, x, torch.inf).amin(dim, keepdim=True)
    hi = torch.where(valid, x, -torch.inf).amax(dim, keepdim=True)
    empty = torch.isinf(lo)  # every entry invalid: any finite statistics will do
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale + minimum`` in ``dtype`` (``scale`` and ``minimum`` broadcast over each group)."""
    return codes.to(dtype) * scale.to(dtype) + minimum.to(dtype)


@register("kivi")
@dataclass(frozen=True)
class KIVI(Representation):
    """KIVI quantization: ``kivi:bits=2,group=32,residual=128,sink=0``.

    Args:
        bits: code width, 2, 4 or 8.
        group: tokens per key group and channels per value group; must divide the head dim.
        residual: most recent tokens kept in full precision.
        sink: the first tokens each head stores also held exactly (attention sinks; see :class:`KIVIStore`).
    """

    bits: int = 2
    group: int = 32
    residual: int = 128
    sink: int = 0

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits}")
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        if not 0 <= self.sink <= self.group:
            raise ValueError(f"sink must be between 0 and group={self.group}, got {self.sink}")

    # KIVI holds no model state: prepared, it is its own storage.
    needs_positions = False
    fixed_nbytes = 0

    def fixed_state(self) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, model, inner: Storage | None = None) -> KIVI:
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.check_dim(head_dim, "the model's head dim")
        return self

    def check_dim(self, dim: int, what: str) -> None:
        """Raise :class:`SpecError` unless ``group`` divides ``dim`` (``what`` names it in the message)."""
        if dim % self.group:
            raise SpecError(
                f"kivi: group={self.group} must divide {what} {dim}; use a divisor such as "
                f"group={_largest_divisor(dim, self.group)}"
            )

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> KIVIStore:
        self.check_dim(head_dim, "the head dim")
        meta_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        return KIVIStore(self.bits, self.group, dtype, meta_dtype, self.sink)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


class KIVIStore:
    """Quantized keys and values of one layer, in blocks of ``group`` tokens.

    Tensors held (``N`` tokens, ``G`` group, ``P = D * bits / 8`` packed bytes):
    ``key_codes (B, H, P, N)`` uint8 (channel-major), ``key_scale``/``key_min (B, H, N/G, D)``,
    ``value_codes (B, H, N, P)`` uint8, ``value_scale``/``value_min (B, H, N, D/G)``, and a
    ``(B, H, N)`` bool validity mask only while some slot is padding or evicted.

    Sinks: with ``sink = m > 0``, the first ``m`` slots (the first tokens a head stores: a prompt's
    first tokens, or a padded row's padding) are also held exactly, ``sinks["keys"]`` ``(B, H, m, D)``
    and ``sinks["error"]`` ``(B, H, m, D)``, their values less the codes' (the codes stay, so blocks
    keep their shape). Attention takes their logits from the exact keys and adds the weighted errors
    to its mix. Their keys are also left out of their block's per-channel statistics: an attention
    sink's key is an outlier (as lowrank's sinks, :mod:`kvcompress.methods.lowrank`), which would
    otherwise widen every channel's scale for the block's other tokens. Measured on SmolLM2-135M
    (4 x 256 tokens of prose after 4,096, 4-bit, residual 32): +2.5 % perplexity without sinks,
    +1.2 % with 4 (``experiments/README.md``). The sinks leave with their block (an eviction that
    frees the first block).
    """

    TOKEN_DIM = {"key_codes": 3}  # every other tensor holds tokens (or token groups) on dim 2
    STATE = ("tensors", "_valid", "sinks")  # see kvcompress.state

    def __init__(self, bits: int, group: int, dtype: torch.dtype, meta_dtype: torch.dtype, sink: int = 0):
        self.bits, self.block, self.dtype, self.meta_dtype, self.sink = bits, group, dtype, meta_dtype, sink
        self.tensors: dict[str, torch.Tensor] = {}
        self._valid: torch.Tensor | None = None
        self.sinks: dict[str, torch.Tensor] = {}  # "keys", "error": (B, H, m, D), while the first block is held

    def __len__(self) -> int:
        return self.tensors["key_codes"].shape[3] if self.tensors else 0

    @property
    def nbytes(self) -> int:
        held = [*self.tensors.values(), *self.sinks.values()] + ([self._valid] if self._valid is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, positions=None) -> None:
        self.extend(self.encode(keys, values, valid, first=not len(self)), valid)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None,
               first: bool = False) -> dict[str, torch.Tensor]:
        """The tensors that hold ``(B, H, n, D)`` keys and values (``n`` a multiple of the group), as :meth:`extend`
        takes them; ``valid`` ``(B, H, n)`` keeps padding out of the key statistics; ``first``: they are the
        first the store holds, so its sinks are among them."""
        n, g = keys.shape[2], self.block
        m = min(self.sink, n) if first else 0
        if m:  # the sinks' keys out of their block's statistics (their codes are never read)
            stats = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device) if valid is None else valid.clone()
            stats[..., :m] = False
        else:
            stats = valid
        # Keys: per channel, statistics over each group of g tokens.
        blocks = keys.unflatten(2, (n // g, g))  # (B, H, n/g, g, D)
        token_valid = None if stats is None else stats[..., None].unflatten(2, (n // g, g))  # (B, H, n/g, g, 1)
        key_codes, key_scale, key_min = quantize(blocks, self.bits, dim=3, valid=token_valid)
        # Values: per token, statistics over each group of g channels.
        chans = values.unflatten(3, (values.shape[3] // g, g))  # (B, H, n, Dv/g, g); Dv may differ from D
        value_codes, value_scale, value_min = quantize(chans, self.bits, dim=4)
        new = {
            "key_codes": pack(key_codes.flatten(2, 3), self.bits).transpose(2, 3),  # (B, H, P, n)
            "key_scale": key_scale.squeeze(3).to(self.meta_dtype),  # (B, H, n/g, D)
            "key_min": key_min.squeeze(3).to(self.meta_dtype),
            "value_codes": pack(value_codes.flatten(3, 4), self.bits),  # (B, H, n, P)
            "value_scale": value_scale.squeeze(4).to(self.meta_dtype),  # (B, H, n, D/g)
            "value_min": value_min.squeeze(4).to(self.meta_dtype),
        }
        if m:  # what attention reads for the sinks: exact keys, and the values' error after the stored scales
            decoded = dequantize(value_codes[:, :, :m], new["value_scale"][:, :, :m, :, None], new["value_min"][:, :, :m, :, None],
                                 values.dtype)
            new["sink_keys"], new["sink_error"] = keys[:, :, :m].clone(), values[:, :, :m] - decoded.flatten(3, 4)
        return new

    def extend(self, new: dict[str, torch.Tensor], valid: torch.Tensor | None = None) -> None:
        """Add the tokens :meth:`encode` made (``valid``: which of them are real, or None for all)."""
        old_n = len(self)
        new = dict(new)
        sink_keys, sink_error = new.pop("sink_keys", None), new.pop("sink_error", None)
        if sink_keys is not None and not old_n:
            self.sinks = {"keys": sink_keys.contiguous(), "error": sink_error.contiguous()}
        self.tensors = {
            k: (torch.cat([self.tensors[k], t], self.TOKEN_DIM.get(k, 2)) if self.tensors else t).contiguous()
            for k, t in new.items()
        }
        batch, heads, n = new["value_codes"].shape[:3]
        self._set_valid(old_n, n, valid, batch, heads, new["value_codes"].device)

    def _set_valid(self, old_n, n, valid, batch, heads, device) -> None:
        if valid is None or bool(valid.all()):
            if self._valid is not None:
                self._valid = torch.cat([self._valid, self._valid.new_ones(batch, heads, n)], 2)
            return
        if self._valid is None:
            self._valid = torch.ones(batch, heads, old_n, dtype=torch.bool, device=device)
        self._valid = torch.cat([self._valid, valid], 2)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(B, H, N, D)`` keys and values (the reference path; transient)."""
        t, g = self.tensors, self.block
        key_codes = unpack(t["key_codes"].transpose(2, 3), self.bits).unflatten(2, (-1, g))  # (B, H, N/g, g, D)
        keys = dequantize(key_codes, t["key_scale"][:, :, :, None], t["key_min"][:, :, :, None], self.dtype)
        value_codes = unpack(t["value_codes"], self.bits).unflatten(3, (-1, g))  # (B, H, N, D/g, g)
        values = dequantize(value_codes, t["value_scale"][..., None], t["value_min"][..., None], self.dtype)
        keys, values = keys.flatten(2, 3), values.flatten(3, 4)
        if self.sinks:
            m = self.sinks["keys"].shape[2]
            keys[:, :, :m] = self.sinks["keys"]
            values[:, :, :m] += self.sinks["error"]
        return keys, values

    def segment(self) -> KIVISegment | DenseSegment:
        if self.dtype.is_floating_point and self.tensors["key_codes"].device.type == "cpu" and native.load("kivi"):
            return KIVISegment(self)
        return DenseSegment(*self.keys_values())

    def valid(self) -> torch.Tensor | None:
        return self._valid

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Free the blocks no row or head keeps a token of; return the ``(B, H, n)`` old slot of each slot."""
        g = self.block
        # (N/g,): a block lives while any row or head keeps one of its tokens
        live_blocks = keep.unflatten(2, (-1, g)).any(3).flatten(0, 1).any(0)
        if bool(live_blocks.all()):  # no block is freed: nothing moves, the dropped slots are masked
            self._valid = None if bool(keep.all()) else keep.clone()
            return torch.arange(keep.shape[2], device=keep.device).expand(keep.shape)
        tokens = live_blocks.repeat_interleave(g)  # (N,)
        if not bool(live_blocks[0]):  # the sinks' block is freed: they go with it
            self.sinks = {}
        for name, t in self.tensors.items():
            index = live_blocks if name == "key_scale" or name == "key_min" else tokens
            self.tensors[name] = t.index_select(self.TOKEN_DIM.get(name, 2), index.nonzero().flatten())
        self._valid = None
        valid = keep[:, :, tokens]
        if not bool(valid.all()):
            self._valid = valid
        return tokens.nonzero().flatten().expand(*keep.shape[:2], -1)

    def map_batch(self, fn) -> None:
        self.tensors = {k: fn(t) for k, t in self.tensors.items()}
        self.sinks = {k: fn(t) for k, t in self.sinks.items()}
        if self._valid is not None:
            self._valid = fn(self._valid)


@dataclass(frozen=True)
class KIVISegment:
    """Attention straight from a :class:`KIVIStore`'s codes, through the ``kvcompress::kivi_*`` ops."""

    store: KIVIStore
    dense_only = False

    def __len__(self) -> int:
        return len(self.store)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.keys_values()

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        t, store = self.store.tensors, self.store
        out = key_logits(query.float().contiguous(), t["key_codes"], t["key_scale"], t["key_min"], store.bits, store.block)
        if store.sinks:  # the sinks' exact logits replace their codes'
            sink_keys = store.sinks["keys"]
            out[..., : sink_keys.shape[2]] = query.float() @ sink_keys.float().transpose(2, 3)
        return out.to(query.dtype)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        t, store = self.store.tensors, self.store
        out = value_mix(weights.float().contiguous(), t["value_codes"], t["value_scale"], t["value_min"], store.bits, store.block)
        if store.sinks:  # what the codes miss of the sinks' values
            error = store.sinks["error"]
            out += weights[..., : error.shape[2]].float() @ error.float()
        return out.to(weights.dtype)

    def attend_one(self, query: torch.Tensor, window: DenseSegment | None, valid: torch.Tensor | None, scaling: float,
                   observed: torch.Tensor) -> torch.Tensor | None:
        """One decode query per row over ``[these codes | window]`` in one kernel call (``kvcompress::kivi_attend``):
        ``(B, H, G, D)`` grouped queries -> ``(B, H, G, D)`` output; the attention each slot received is added to
        ``observed`` ``(B, H, S)`` unless it is empty (see :func:`kvcompress.attention.attend_one_pass`). None
        where the kernel does not apply (the caller takes the segment path)."""
        t, store = self.store.tensors, self.store
        dim = query.shape[-1]
        if window is None:  # an empty window: zero slots of the right shape
            keys = values = query.new_empty(*query.shape[:2], 0, dim, dtype=torch.float32)
        else:
            keys, values = window.keys, window.values
        if keys.dtype != torch.float32 or values.shape[-1] != dim or t["value_codes"].shape[3] * 8 // store.bits != dim:
            return None
        keys, values = kernel_pair(keys, values)
        sink_keys, sink_error = _sinks(store, query)
        return kivi_attend(
            query.float().contiguous(), t["key_codes"], t["key_scale"], t["key_min"], t["value_codes"], t["value_scale"],
            t["value_min"], keys, values, sink_keys, sink_error, mask_bytes(valid), scaling, observed, store.bits,
            store.block,
        )

    @staticmethod
    def attend_heads(heads: list[KIVISegment], query: torch.Tensor, window: DenseSegment, valid: torch.Tensor | None,
                     stored: int, scaling: float, observed: torch.Tensor) -> torch.Tensor | None:
        """:meth:`attend_one` for ragged heads (a :class:`kvcompress.buffer.RaggedSegment`): ``heads``, one
        segment per (row, head), row-major, each its own number of the ``stored`` slots; one kernel call
        (``kvcompress::kivi_attend_heads``) for all of them. ``valid`` ``(B, H, stored + W)`` or None. The heads
        come from one layer's store factory, so they share bits, group and metadata type. None where the kernel
        does not apply (as in :meth:`attend_one`)."""
        first = heads[0].store
        if window.keys.dtype != torch.float32 or first.tensors["value_codes"].shape[3] * 8 // first.bits != query.shape[-1]:
            return None
        keys, values = kernel_pair(window.keys, window.values)
        held = {name: [s.store.tensors[name] for s in heads] for name in KIVI_TENSORS}
        sinks = [_sinks(s.store, query) for s in heads]
        return kivi_attend_heads(
            query.float().contiguous(), *held.values(), stored, keys, values, [k for k, _ in sinks], [e for _, e in sinks],
            mask_bytes(valid), scaling, observed, first.bits, first.block,
        )


_NO_SINKS = torch.empty(0)  # what the kernels read for a store without sinks (never written)


def _sinks(store: KIVIStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A store's sink keys and value errors as the kernels read them: float32, or empty (no sinks)."""
    if not store.sinks:
        empty = _NO_SINKS if query.device.type == "cpu" else query.new_empty(0, dtype=torch.float32)
        return empty, empty
    return store.sinks["keys"].float().contiguous(), store.sinks["error"].float().contiguous()


KIVI_TENSORS = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min")  # a store's, in kernel order


