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
(``csrc/kivi.c``) that never writes full-precision keys or values. The codes are held in pages of one key
group (:class:`PageLayout`, :class:`KIVIStore`), keys channel-major within a page; a decode step reads them
through the page tables (``kvcompress::kivi_attend_pages``), several queries at once read them gathered
(``kvcompress::kivi_key_logits`` and ``kvcompress::kivi_value_mix``). Where
the kernel cannot be built (no C compiler), on GPUs, and under :func:`kvcompress.attention.reference_path`,
attention reads keys and values dequantized in plain PyTorch (the reference the kernel is tested
against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import torch

from kvcompress import native
from kvcompress.kernels import META_KIND, key_logits, kernel_pair, kivi_attend_pages, mask_bytes, value_mix
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


@dataclass(frozen=True)
class PageLayout:
    """Where the parts of a KIVI page sit. A page holds one key group (``group`` tokens) of one row, all its
    KV heads; each head's share is a key block and a value block, each part starting at a multiple of 16
    bytes (``P = D * bits / 8``, ``Pv = Dv * bits / 8``, ``E = Dv / group``; scales and zero points of the
    meta type)::

        key block:   key_codes (P, group) channel-major | key_scale (D) | key_min (D)
        value block: value_codes (group, Pv) | value_scale (E, group) | value_min (E, group)

    (value scales group-major: a group's in one run). Pages written together are a run, ``(H, count *
    head_bytes)`` uint8: for each head, the key blocks of its pages one after the other, then their value
    blocks, so each pass of attention (logits over keys, then the mix of values) reads one run of memory
    per head. What the kernel reads (``csrc/kivi.c``, the offsets :attr:`offsets` within each block) and what
    :meth:`write` and :meth:`read` convert to and from the store's tensors as :meth:`KIVIStore.encode`
    makes them."""

    heads: int
    dim: int
    vdim: int
    bits: int
    group: int
    meta_dtype: torch.dtype

    KEY_PARTS = ("key_codes", "key_scale", "key_min")
    VALUE_PARTS = ("value_codes", "value_scale", "value_min")
    PARTS = ("key_codes", "value_codes", "key_scale", "key_min", "value_scale", "value_min")  # the kernel's order
    ALIGN = 16

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each part's shape in one head's block."""
        g, codes, vcodes, groups = self.group, self.dim * self.bits // 8, self.vdim * self.bits // 8, self.vdim // self.group
        return {"key_codes": (codes, g), "value_codes": (g, vcodes), "key_scale": (self.dim,), "key_min": (self.dim,),
                "value_scale": (groups, g), "value_min": (groups, g)}

    @cached_property
    def spans(self) -> dict[str, tuple[int, int]]:
        """Each part's first byte and byte count in its block."""
        spans = {}
        for half in (self.KEY_PARTS, self.VALUE_PARTS):
            at = 0
            for name in half:
                size = math.prod(self.shapes[name]) * (1 if name.endswith("codes") else self.meta_dtype.itemsize)
                spans[name] = (at, size)
                at = self._aligned(at + size)
        return spans

    def _aligned(self, n: int) -> int:
        return -(-n // self.ALIGN) * self.ALIGN

    @cached_property
    def key_bytes(self) -> int:
        return self._aligned(sum(self.spans[self.KEY_PARTS[-1]]))

    @cached_property
    def value_bytes(self) -> int:
        return self._aligned(sum(self.spans[self.VALUE_PARTS[-1]]))

    @cached_property
    def head_bytes(self) -> int:
        """One head's share of a page: its key block and its value block."""
        return self.key_bytes + self.value_bytes

    @cached_property
    def page_bytes(self) -> int:
        return self.heads * self.head_bytes

    @property
    def offsets(self) -> torch.Tensor:
        """The parts' first bytes within their blocks, int64, as the kernel reads them (one tensor per layout,
        not held by a store)."""
        return _offsets(tuple(self.spans[name][0] for name in self.PARTS))

    def new_run(self, count: int, device) -> torch.Tensor:
        """Room for ``count`` pages, one allocation."""
        return torch.empty(self.heads, count * self.head_bytes, dtype=torch.uint8, device=device)

    def count(self, run: torch.Tensor) -> int:
        """Pages in a run."""
        return run.shape[1] // self.head_bytes

    def blocks(self, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's key blocks ``(count, H, key_bytes)`` and value blocks ``(count, H, value_bytes)``, as views."""
        split = self.count(run) * self.key_bytes
        keys = run[:, :split].unflatten(1, (-1, self.key_bytes)).transpose(0, 1)
        values = run[:, split:].unflatten(1, (-1, self.value_bytes)).transpose(0, 1)
        return keys, values

    def addresses(self, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(H, count)`` int64 address of each head's key block and value block in each page of a run."""
        count = self.count(run)
        heads = torch.arange(self.heads, dtype=torch.int64)[:, None] * run.stride(0) + run.data_ptr()
        pages = torch.arange(count, dtype=torch.int64)[None]
        return heads + pages * self.key_bytes, heads + count * self.key_bytes + pages * self.value_bytes

    def page(self, run: torch.Tensor, i: int) -> torch.Tensor:
        """Page ``i`` of a run as a run of its own (a copy)."""
        keys, values = self.blocks(run)
        return torch.cat([keys[i], values[i]], 1)

    def views(self, run: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part of a run's pages as a ``(count, H, *shape)`` view."""
        keys, values = self.blocks(run)
        out = {}
        for name in self.PARTS:
            first, size = self.spans[name]
            part = (keys if name in self.KEY_PARTS else values)[..., first : first + size]
            out[name] = (part if name.endswith("codes") else part.view(self.meta_dtype)).unflatten(-1, self.shapes[name])
        return out

    def write(self, run: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        """Fill a run with one row's tensors of ``count * group`` tokens, shaped as :meth:`KIVIStore.encode`
        makes them without the batch dimension."""
        count, parts = self.count(run), self.views(run)
        parts["key_codes"].copy_(new["key_codes"].unflatten(2, (count, self.group)).permute(2, 0, 1, 3))  # (H, P, n)
        for name in ("key_scale", "key_min"):  # (H, n / group, D)
            parts[name].copy_(new[name].transpose(0, 1))
        parts["value_codes"].copy_(new["value_codes"].unflatten(1, (count, self.group)).transpose(0, 1))  # (H, n, Pv)
        for name in ("value_scale", "value_min"):  # (H, n, E)
            parts[name].copy_(new[name].unflatten(1, (count, self.group)).permute(1, 0, 3, 2))

    def read(self, run: torch.Tensor) -> dict[str, torch.Tensor]:
        """One row's tensors, as :meth:`write` takes them, from a run (a copy)."""
        parts = self.views(run)
        out = {"key_codes": parts["key_codes"].permute(1, 2, 0, 3).flatten(2, 3)}  # (H, P, n)
        out.update({name: parts[name].transpose(0, 1) for name in ("key_scale", "key_min")})
        out["value_codes"] = parts["value_codes"].transpose(0, 1).flatten(1, 2)  # (H, n, Pv)
        out.update({name: parts[name].permute(1, 0, 3, 2).flatten(1, 2) for name in ("value_scale", "value_min")})
        return {name: out[name].contiguous() for name in self.PARTS}


@cache
def _offsets(offsets: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int64)


class KIVIStore:
    """Quantized keys and values of one layer, in pages of one key group (``group`` tokens) each.

    Each row has a page table: its pages in slot order, held as runs (:class:`PageLayout`): the pages encoded
    together (a prompt, a chunk, a group leaving the window) are one allocation, each head's key blocks one
    after the other, then its value blocks, so attention reads a head's prompt as two runs of memory (as
    full-precision pages, :mod:`kvcompress.paged`: pages interleaved across heads made a decode step of
    ``kivi:bits=4`` at 4,096 tokens about 12 % slower). A page is written once and never changed, so rows
    and stores share pages by reference (the allocation is freed with its last reader: torch's own
    reference count) and nothing is copied before a write. What a step moves:

    - a group leaving the window is encoded into one new page: no held page is copied;
    - eviction frees a page once no row or head keeps a token of it, and masks the other evicted slots; a
      run that loses pages is split into single pages the first time (its kept pages copied once, so the
      freed ones' memory goes), after which a page leaves with no copy.

    A decode step reads the pages where they are (``kvcompress::kivi_attend_pages``), through the
    ``(B * H, J)`` addresses of each page's key block and value block (:attr:`pointers`, see
    :meth:`page_table`: 16 bytes per page and head, counted in :attr:`nbytes`). :attr:`tensors` gives every page's parts as whole tensors (a copy):
    what is saved (so the file format is the one of contiguous stores), and what the reference path and the
    multi-query path read. Shapes there (``N`` tokens, ``G`` group, ``P = D * bits / 8``):
    ``key_codes (B, H, P, N)`` uint8 (channel-major), ``key_scale``/``key_min (B, H, N/G, D)``,
    ``value_codes (B, H, N, P)`` uint8, ``value_scale``/``value_min (B, H, N, D/G)``; and a ``(B, H, N)``
    bool validity mask only while some slot is padding or evicted.

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

    Attributes:
        tables: ``[B]`` lists of runs of pages, in slot order.
        moved: bytes of pages copied so far (runs split by an eviction); a step's new page is not counted.
    """

    TOKEN_DIM = {"key_codes": 3}  # in :attr:`tensors`, every other part holds tokens (or token groups) on dim 2
    STATE = ("tensors", "_valid", "sinks")  # see kvcompress.state

    def __init__(self, bits: int, group: int, dtype: torch.dtype, meta_dtype: torch.dtype, sink: int = 0):
        self.bits, self.block, self.dtype, self.meta_dtype, self.sink = bits, group, dtype, meta_dtype, sink
        self.tables: list[list[torch.Tensor]] = []
        self.layout: PageLayout | None = None  # set by the first tokens (heads and dims)
        self._valid: torch.Tensor | None = None
        self.sinks: dict[str, torch.Tensor] = {}  # "keys", "error": (B, H, m, D), while the first block is held
        self.pointers: tuple[torch.Tensor, torch.Tensor] | None = None  # (B * H, J) int64 each: see page_table
        self.moved = 0

    def __len__(self) -> int:
        return self.pages * self.block

    @property
    def pages(self) -> int:
        """Pages each row holds."""
        return sum(self.layout.count(run) for run in self.tables[0]) if self.tables else 0

    @property
    def held_pages(self) -> int:
        """Pages held by all rows (a run shared by rows counts once)."""
        runs = {run.untyped_storage().data_ptr(): run for table in self.tables for run in table}
        return sum(self.layout.count(run) for run in runs.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the pages held (an allocation shared by rows once), the sinks, the mask and the page table."""
        held = {run.untyped_storage().data_ptr(): run.untyped_storage().nbytes() for table in self.tables for run in table}
        extra = [*self.sinks.values(), self._valid, *(self.pointers or ())]
        return sum(held.values()) + sum(t.numel() * t.element_size() for t in extra if t is not None)

    # ---- writing --------------------------------------------------------------------------------

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
        self._write(new)
        batch, heads, n = new["value_codes"].shape[:3]
        self._set_valid(old_n, n, valid, batch, heads, new["value_codes"].device)

    def _write(self, new: dict[str, torch.Tensor]) -> None:
        """Each row's tokens of ``new`` (whole tensors, as :meth:`encode` makes them) into one new run of pages."""
        batch, heads, n, vcodes = new["value_codes"].shape
        if not n:
            return
        if self.layout is None:
            dim = new["key_scale"].shape[3]
            self.layout = PageLayout(heads, dim, vcodes * 8 // self.bits, self.bits, self.block, self.meta_dtype)
        if not self.tables:
            self.tables = [[] for _ in range(batch)]
        for b, table in enumerate(self.tables):
            run = self.layout.new_run(n // self.block, new["value_codes"].device)
            self.layout.write(run, {name: t[b] for name, t in new.items()})
            table.append(run)
        self._changed()

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every held page's parts as whole ``(B, H, ...)`` tensors (a copy; see the class docstring); ``{}`` when
        nothing is held. Setting it replaces every page (a saved store read back)."""
        if not self.pages:
            return {}
        rows = []
        for table in self.tables:
            runs = [self.layout.read(run) for run in table]
            rows.append({name: torch.cat([r[name] for r in runs], self.TOKEN_DIM.get(name, 2) - 1) for name in PageLayout.PARTS})
        return {name: torch.stack([row[name] for row in rows]) for name in PageLayout.PARTS}

    @tensors.setter
    def tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tables, self.layout, self.pointers = [], None, None
        if tensors:
            n, groups = tensors["key_codes"].shape[3], tensors["key_scale"].shape[2]
            held = [tensors[name].shape[2] for name in ("value_codes", "value_scale", "value_min")]
            if n % self.block or groups * self.block != n or tensors["key_min"].shape[2] != groups or held != [n] * 3:
                raise ValueError(
                    f"key codes hold {n} tokens, key scales and minimums {groups} and {tensors['key_min'].shape[2]} "
                    f"groups of {self.block}, value codes, scales and minimums {held} tokens: they must agree"
                )
            self._write(tensors)

    def _set_valid(self, old_n, n, valid, batch, heads, device) -> None:
        if valid is None or bool(valid.all()):
            if self._valid is not None:
                self._valid = torch.cat([self._valid, self._valid.new_ones(batch, heads, n)], 2)
            return
        if self._valid is None:
            self._valid = torch.ones(batch, heads, old_n, dtype=torch.bool, device=device)
        self._valid = torch.cat([self._valid, valid], 2)

    # ---- reading --------------------------------------------------------------------------------

    def _changed(self) -> None:
        """The page tables changed: work out the address of each (row, head)'s key block and value block in each
        page (16 bytes per page and head, held with the tables and counted in :attr:`nbytes`)."""
        if not self.pages:
            self.pointers = None
            return
        rows = [[self.layout.addresses(run) for run in table] for table in self.tables]
        self.pointers = tuple(
            torch.stack([torch.cat([pair[half] for pair in row], 1) for row in rows]).flatten(0, 1).contiguous()  # (B * H, J)
            for half in (0, 1)
        )

    def page_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B * H, J)`` int64 addresses of each (row, head)'s key blocks and of its value blocks in its ``J``
        pages, and the ``(B * H,)`` int64 pages each reads, as the kernel reads them."""
        keys, values = self.pointers
        return keys, values, torch.full((keys.shape[0],), keys.shape[1], dtype=torch.int64)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(B, H, N, D)`` keys and values (the reference path; transient)."""
        return self.dequantized(self.tensors)

    def dequantized(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`keys_values` of the parts ``t`` (:attr:`tensors`)."""
        g = self.block
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
        if self.dtype.is_floating_point and self.tables[0][0].device.type == "cpu" and native.load("kivi"):
            return KIVISegment(self)
        return DenseSegment(*self.keys_values())

    def valid(self) -> torch.Tensor | None:
        return self._valid

    # ---- evicting and rows ----------------------------------------------------------------------

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Free the pages no row or head keeps a token of; return the ``(B, H, n)`` old slot of each slot."""
        g = self.block
        # (N/g,): a page lives while any row or head keeps one of its tokens
        live_blocks = keep.unflatten(2, (-1, g)).any(3).flatten(0, 1).any(0)
        if bool(live_blocks.all()):  # no page is freed: nothing moves, the dropped slots are masked
            self._valid = None if bool(keep.all()) else keep.clone()
            return torch.arange(keep.shape[2], device=keep.device).expand(keep.shape)
        tokens = live_blocks.repeat_interleave(g)  # (N,)
        if not bool(live_blocks[0]):  # the sinks' page is freed: they go with it
            self.sinks = {}
        live = live_blocks.tolist()
        for b, table in enumerate(self.tables):
            kept, at = [], 0
            for run in table:
                count = self.layout.count(run)
                flags, at = live[at : at + count], at + count
                if all(flags):
                    kept.append(run)
                else:  # split, so each freed page's memory goes now and later pages leave with no copy
                    singles = [self.layout.page(run, i) for i, alive in enumerate(flags) if alive]
                    self.moved += len(singles) * self.layout.page_bytes
                    kept.extend(singles)
            self.tables[b] = kept
        self._changed()
        self._valid = None
        valid = keep[:, :, tokens]
        if not bool(valid.all()):
            self._valid = valid
        return tokens.nonzero().flatten().expand(*keep.shape[:2], -1)

    def map_batch(self, fn) -> None:
        """Reorder, repeat or select rows (``fn`` on the batch dimension): rows used twice share their pages."""
        if self.tables:
            order = fn(torch.arange(len(self.tables))).tolist()  # the old row of every new row
            self.tables = [list(self.tables[i]) for i in order]
            self._changed()
        self.sinks = {k: fn(t) for k, t in self.sinks.items()}
        if self._valid is not None:
            self._valid = fn(self._valid)

    def unshare(self) -> None:
        """Give every row its own copy of the pages it shares with another row (after ``map_batch`` repeated
        rows): the bytes distinct sequences would hold and read."""
        seen = set()
        for table in self.tables:
            for i, run in enumerate(table):
                if run.untyped_storage().data_ptr() in seen:
                    table[i] = run.clone()
                    self.moved += run.numel()
                else:
                    seen.add(run.untyped_storage().data_ptr())
        self._changed()


@dataclass(frozen=True)
class KIVISegment:
    """Attention straight from a :class:`KIVIStore`'s codes: one decode query per row through its pages
    (``kvcompress::kivi_attend_pages``), several queries (a prompt, a chunk) through the whole parts
    (``kvcompress::kivi_key_logits`` and ``kivi_value_mix``, gathered once per segment: a segment lives for one step)."""

    store: KIVIStore
    dense_only = False

    def __len__(self) -> int:
        return len(self.store)

    @cached_property
    def parts(self) -> dict[str, torch.Tensor]:
        return self.store.tensors

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.dequantized(self.parts)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        t, store = self.parts, self.store
        out = key_logits(query.float().contiguous(), t["key_codes"], t["key_scale"], t["key_min"], store.bits, store.block)
        if store.sinks:  # the sinks' exact logits replace their codes'
            sink_keys = store.sinks["keys"]
            out[..., : sink_keys.shape[2]] = query.float() @ sink_keys.float().transpose(2, 3)
        return out.to(query.dtype)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        t, store = self.parts, self.store
        out = value_mix(weights.float().contiguous(), t["value_codes"], t["value_scale"], t["value_min"], store.bits, store.block)
        if store.sinks:  # what the codes miss of the sinks' values
            error = store.sinks["error"]
            out += weights[..., : error.shape[2]].float() @ error.float()
        return out.to(weights.dtype)

    def attend_one(self, query: torch.Tensor, window: DenseSegment | None, valid: torch.Tensor | None, scaling: float,
                   observed: torch.Tensor) -> torch.Tensor | None:
        """One decode query per row over ``[these pages | window]`` in one kernel call: ``(B, H, G, D)`` grouped
        queries -> ``(B, H, G, D)`` output; the attention each slot received is added to ``observed``
        ``(B, H, S)`` unless it is empty (see :func:`kvcompress.attention.attend_one_pass`). None where the
        kernel does not apply (the caller takes the segment path)."""
        store = self.store
        dim = query.shape[-1]
        if window is None:  # an empty window: zero slots of the right shape
            keys = values = query.new_empty(*query.shape[:2], 0, dim, dtype=torch.float32)
        else:
            keys, values = window.keys, window.values
        if keys.dtype != torch.float32 or values.shape[-1] != dim or store.layout.vdim != dim:
            return None
        keys, values = kernel_pair(keys, values)
        key_pages, value_pages, npages = store.page_table()
        sink_keys, sink_error, sinks, held = _sinks([store], query)  # held: what the addresses point into
        out = kivi_attend_pages(
            query.float().contiguous(), key_pages, value_pages, npages, store.layout.offsets, len(store), keys, values, sink_keys,
            sink_error, sinks, mask_bytes(valid), scaling, observed, META_KIND[store.meta_dtype], store.bits, store.block,
        )
        del held
        return out

    @staticmethod
    def attend_heads(heads: list[KIVISegment], query: torch.Tensor, window: DenseSegment, valid: torch.Tensor | None,
                     stored: int, scaling: float, observed: torch.Tensor) -> torch.Tensor | None:
        """:meth:`attend_one` for ragged heads (a :class:`kvcompress.buffer.RaggedSegment`): ``heads``, one
        segment per (row, head), row-major, each its own number of the ``stored`` slots; one kernel call for
        all of them, each head through its own page table. ``valid`` ``(B, H, stored + W)`` or None. The heads
        come from one layer's store factory, so they share bits, group and metadata type. None where the
        kernel does not apply (as in :meth:`attend_one`)."""
        stores = [s.store for s in heads]
        first = stores[0]
        if window.keys.dtype != torch.float32 or first.layout.vdim != query.shape[-1]:
            return None
        keys, values = kernel_pair(window.keys, window.values)
        tables = [store.pointers for store in stores]  # (1, J) each, key blocks and value blocks: one row, one head
        longest = max(table[0].shape[1] for table in tables)
        key_pages, value_pages = (torch.zeros(len(tables), longest, dtype=torch.int64) for _ in range(2))
        for i, (key_blocks, value_blocks) in enumerate(tables):
            key_pages[i, : key_blocks.shape[1]], value_pages[i, : value_blocks.shape[1]] = key_blocks[0], value_blocks[0]
        npages = torch.tensor([table[0].shape[1] for table in tables], dtype=torch.int64)
        sink_keys, sink_error, sinks, held = _sinks(stores, query)  # held: what the addresses point into
        out = kivi_attend_pages(
            query.float().contiguous(), key_pages, value_pages, npages, first.layout.offsets, stored, keys, values, sink_keys,
            sink_error, sinks, mask_bytes(valid), scaling, observed, META_KIND[first.meta_dtype], first.bits,
            first.block,
        )
        del held
        return out


def _sinks(stores: list[KIVIStore], query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, list[torch.Tensor]]:
    """The sinks of ``stores`` as the kernel reads them: ``(B * H,)`` int64 addresses of each (row, head)'s
    float32 exact keys and value errors (0: none; empty: no store has any), their slots, and the tensors
    the addresses point into (held by the caller until the kernel returns). ``stores``: one store of
    ``B`` rows and ``H`` heads, or one store per (row, head), row-major."""
    empty = torch.empty(0, dtype=torch.int64)
    held = [(store.sinks["keys"].float().contiguous(), store.sinks["error"].float().contiguous()) if store.sinks else None
            for store in stores]
    present = [h for h in held if h is not None]
    if not present:
        return empty, empty, 0, []
    m = present[0][0].shape[2]
    if any(k.shape[2] != m for k, _ in present):
        raise ValueError(f"kvcompress: heads hold sinks of {sorted({k.shape[2] for k, _ in present})} slots; the kernel reads one count")
    addresses = []
    for part in (0, 1):
        rows = []
        for h, store in zip(held, stores):
            count = store.layout.heads * len(store.tables)
            if h is None:
                rows.append(torch.zeros(count, dtype=torch.int64))
            else:
                t = h[part]
                rows.append(t.data_ptr() + torch.arange(count, dtype=torch.int64) * m * t.shape[3] * t.element_size())
        addresses.append(torch.cat(rows))
    return addresses[0], addresses[1], m, [t for h in present for t in h]
