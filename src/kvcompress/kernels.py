"""The C kernels as Python calls: each wrapper lays its tensors out as the kernel reads them, calls it
through :mod:`kvcompress.native` (which builds ``csrc/*.c`` on first use) and is registered as a
``kvcompress::*`` custom op, with a fake implementation for ``torch.compile``.

- ``dense.c``: :func:`paged_attend` (float32 slots in pages through page tables, rows and heads of
  different lengths, then a window), :func:`observe_rows` (a prompt's observed queries);
- ``kivi.c``: :func:`key_logits`, :func:`value_mix`, :func:`kivi_attend_pages`
  (attention on KIVI's codes);
- ``lowrank.c``: :func:`lowrank_logits` (keys rebuilt from latents and rotated in registers);
- ``select.c``: :func:`drop_lowest` (a decode step's eviction of one token per head).

Each has a plain-PyTorch reference that the tests compare it with (:mod:`kvcompress.attention`'s dense
path, the stores' ``keys_values``, :func:`kvcompress.methods.budgets.rank`). Shapes as in
:mod:`kvcompress.step`.
"""

from __future__ import annotations

import ctypes

import torch

from kvcompress import native
from kvcompress.native import data_pointer
from kvcompress.step import DenseSegment

def observed_rows(observed: torch.Tensor) -> int:
    """The stride between the (row, head) rows of a ``(B, H, S)`` observation, as the C kernels step
    through it: its slots contiguous, its rows one stride apart (a view of a tensor with room for more
    slots qualifies)."""
    batch, heads, _ = observed.shape
    if observed.dtype != torch.float32 or observed.stride(2) != 1 or (batch > 1 and observed.stride(0) != heads * observed.stride(1)):
        raise ValueError("an observation must be float32 with contiguous slots and rows one stride apart")
    return observed.stride(1)


def dense_one_pass_applies(query: torch.Tensor, *segments: DenseSegment) -> bool:
    """Whether ``kvcompress::paged_attend`` can read these float32 CPU segments (the C kernels built)."""
    for segment in segments:
        keys, values = segment.keys, segment.values
        if keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.device.type != "cpu":
            return False
        if values.shape[-1] != keys.shape[-1] or keys.shape[-1] != query.shape[-1]:
            return False
    return query.dtype == torch.float32 and native.load("dense") is not None


def paged_kernel_reads(query: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``kvcompress::paged_attend`` can read pages of ``dtype`` on ``device`` for ``query`` (float32
    on the CPU, the C kernels built)."""
    return (dtype == query.dtype == torch.float32 and device.type == query.device.type == "cpu"
            and native.load("dense") is not None)


def paged_one_pass_applies(query: torch.Tensor, segment) -> bool:
    """Whether ``kvcompress::paged_attend`` can read this paged segment: :func:`paged_kernel_reads`, some
    slots, and keys and values of the query's head dim."""
    shape = segment.buffer.shape
    if not len(segment) or shape[1] != shape[2] or shape[1] != query.shape[-1]:
        return False
    return paged_kernel_reads(query, segment.buffer.dtype, segment.buffer.device)


def page_mask(valid: torch.Tensor | None) -> torch.Tensor:
    """A ``(B, H, S)`` validity mask as ``kvcompress::paged_attend`` reads it: uint8 (a bool mask's own
    bytes), slots contiguous, its (row, head) rows one stride apart (a view of a mask with room for more
    slots qualifies); empty for "all real"."""
    if valid is None:
        return NO_MASK
    batch, heads, _ = valid.shape
    if valid.stride(2) != 1 or (batch > 1 and valid.stride(0) != heads * valid.stride(1)):
        valid = valid.contiguous()
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)


def mask_bytes(valid: torch.Tensor | None) -> torch.Tensor:
    """A ``(B, H, S)`` validity mask as the C kernels read it: contiguous uint8, or empty for "all real". A
    contiguous bool mask is read as its own bytes (0 or 1), with no copy."""
    if valid is None:
        return NO_MASK
    valid = valid.contiguous()
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)


NO_MASK = torch.empty(0, dtype=torch.uint8)


NO_OBSERVATION = torch.empty(0, dtype=torch.float32)  # what a kernel is given when no scorer observes


def kernel_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, H, S, D)`` as the C kernels read it: each (row, head) a contiguous ``(S, D)`` block, the
    blocks one stride apart (a view of a buffer with spare capacity qualifies); else a contiguous copy."""
    batch, heads, slots, dim = t.shape
    if t.stride(3) == 1 and t.stride(2) == dim and (batch == 1 or t.stride(0) == heads * t.stride(1)):
        return t
    return t.contiguous()


def kernel_pair(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as :func:`kernel_rows`, their (row, head) blocks the same stride apart (one stride
    reaches both in the kernels); copies only where a view does not qualify."""
    keys, values = kernel_rows(keys), kernel_rows(values)
    if keys.stride(1) != values.stride(1):
        keys, values = keys.contiguous(), values.contiguous()
    return keys, values


@native.custom_op("kvcompress::paged_attend", mutates=("observed",))
def paged_attend(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    npages: torch.Tensor,
    fills: torch.Tensor,
    page: int,
    stored: int,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    allow: torch.Tensor,
    scaling: float,
    observed: torch.Tensor,
) -> torch.Tensor:
    """One decode step over float32 slots ``[stored | window]`` (``csrc/dense.c``): ``(B, H, G, D)`` queries.

    - The stored part, ``stored`` slots per (row, head), in pages: each (row, head) reads its first
      ``npages`` of ``J`` pages of ``page`` slots at the ``(B * H, J)`` int64 addresses ``key_pages`` and
      ``value_pages`` (each a ``(page, D)`` block; see :func:`kvcompress.paged.page_addresses`), its last
      page holding ``fills`` slots (``npages`` and ``fills`` ``(B * H,)`` int64: rows and heads may differ in
      length; a head shorter than ``stored`` is padded, never read). ``(B * H, 0)`` tables: none.
    - The window: keys and values ``(B, H, W, D)``, each (row, head) a contiguous block, blocks one stride
      apart (:func:`kernel_pair`); ``W = 0``: none.

    ``allow`` ``(B, H, stored + W)`` uint8 as :func:`page_mask` gives it, or empty (every slot real; the
    last, the query's own token, always allowed). Returns the ``(B, H, G, D)`` output (zeros for a (row,
    head) of no slot) and adds to ``observed`` ``(B, H, stored + W)`` (unless empty) the attention each slot
    received, the mean over the ``G`` query rows (0 for a padding query; see :func:`observed_rows` for its
    layout)."""
    batch, heads, rows, dim = query.shape
    pages, window = key_pages.shape[1], window_keys.shape[2]
    out = query.new_empty(batch, heads, rows, dim)
    ostride = observed_rows(observed) if observed.numel() else 0
    status = native.load("dense").paged_attend(
        data_pointer(query), data_pointer(key_pages), data_pointer(value_pages), ctypes.c_int64(pages),
        data_pointer(npages), data_pointer(fills), ctypes.c_int64(page), ctypes.c_int64(stored),
        data_pointer(window_keys), data_pointer(window_values), ctypes.c_int64(window_keys.stride(1) if window else 0),
        ctypes.c_int64(window), data_pointer(allow), ctypes.c_int64(allow.stride(1) if allow.numel() else 0),
        ctypes.c_float(scaling), data_pointer(out), data_pointer(observed), ctypes.c_int64(ostride),
        *map(ctypes.c_int64, (batch * heads, rows, dim)),
    )
    if status:
        raise MemoryError("kvcompress::paged_attend: the kernel could not allocate its scratch buffer")
    return out


@paged_attend.register_fake
def _(query, key_pages, value_pages, npages, fills, page, stored, window_keys, window_values, allow, scaling, observed):
    return query.new_empty(query.shape)


NO_PAGES = torch.empty(1, 0, dtype=torch.int64)  # page tables of no page (the stored part of a window alone)
NO_WINDOW = torch.empty(1, 1, 0, 1)  # window keys or values of no slot (pages alone)


def window_attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allow: torch.Tensor, scaling: float,
                  observed: torch.Tensor) -> torch.Tensor:
    """:func:`paged_attend` over a window alone: ``(B, H, W, D)`` float32 keys and values, no pages."""
    keys, values = kernel_pair(keys, values)
    none = NO_PAGES.expand(query.shape[0] * query.shape[1], 0)
    counts = torch.zeros(query.shape[0] * query.shape[1], dtype=torch.int64)
    return paged_attend(query.contiguous(), none, none, counts, counts, 1, 0, keys, values, allow, scaling, observed)


@native.custom_op("kvcompress::observe_rows", mutates=("logits", "observed"))
def observe_rows(logits: torch.Tensor, allow: torch.Tensor, weigh: torch.Tensor, observed: torch.Tensor) -> None:
    """One chunk of observed queries in place (``csrc/dense.c``): ``logits`` ``(B, H, G, c, n)`` float32,
    scaled, of ``c`` queries that are the last ``c`` of ``n`` slots, become their softmax weights (masked
    where ``allow`` ``(B, H, c, n)`` uint8 is 0, or causally only when it is empty; 0 after each query's own
    token), and ``observed`` ``(B, H, S >= n)`` (laid out as :func:`observed_rows` says) gains ``weigh``
    ``(B, H, c)`` times each query's row."""
    batch, heads, rows, c, n = logits.shape
    weigh = weigh.float().contiguous()
    native.load("dense").observe_rows(
        data_pointer(logits), data_pointer(allow), data_pointer(weigh), data_pointer(observed),
        ctypes.c_int64(observed_rows(observed)), *map(ctypes.c_int64, (batch * heads, rows, c, n)),
    )


META_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # how the kernel reads scales and zero points


def _call(name: str, out: torch.Tensor, first: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
          sizes: tuple[int, ...], bits: int, group: int) -> torch.Tensor:
    """Run the C kernel ``name`` on CPU tensors, writing ``out``."""
    tensors = [t.contiguous() for t in (first, codes, scale, minimum)]
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    status = getattr(native.load("kivi"), name)(
        *pointers, ctypes.c_int(META_KIND[scale.dtype]), ctypes.c_void_p(out.data_ptr()), *map(ctypes.c_int64, sizes),
        ctypes.c_int(bits), ctypes.c_int64(group),
    )
    if status:
        raise MemoryError(f"kvcompress::{name}: the kernel could not allocate its scratch buffers")
    return out


@native.custom_op("kvcompress::kivi_key_logits")
def key_logits(query: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``(B, H, G, D)`` float32 queries · keys of channel-major codes ``(B, H, P, N)``: ``(B, H, G, N)``.

    ``scale``/``minimum`` ``(B, H, N / group, D)`` in float32, float16 or bfloat16."""
    batch, heads, rows, dim = query.shape
    out = query.new_empty(batch, heads, rows, codes.shape[3])
    return _call("kivi_key_logits", out, query, codes, scale, minimum, (batch * heads, rows, dim, codes.shape[3]), bits, group)


@key_logits.register_fake
def _(query, codes, scale, minimum, bits, group):
    return query.new_empty(*query.shape[:3], codes.shape[3])


@native.custom_op("kvcompress::kivi_value_mix")
def value_mix(weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``(B, H, G, N)`` float32 weights · values of token-major codes ``(B, H, N, P)``: ``(B, H, G, D)``.

    ``scale``/``minimum`` ``(B, H, N, D / group)`` in float32, float16 or bfloat16."""
    batch, heads, rows, tokens = weights.shape
    dim = codes.shape[3] * 8 // bits
    out = weights.new_empty(batch, heads, rows, dim)
    return _call("kivi_value_mix", out, weights, codes, scale, minimum, (batch * heads, rows, dim, tokens), bits, group)


@value_mix.register_fake
def _(weights, codes, scale, minimum, bits, group):
    return weights.new_empty(*weights.shape[:3], codes.shape[3] * 8 // bits)


@native.custom_op("kvcompress::kivi_attend_pages", mutates=("observed",))
def kivi_attend_pages(query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, npages: torch.Tensor,
                      layout: torch.Tensor, stored: int,
                      window_keys: torch.Tensor, window_values: torch.Tensor, sink_keys: torch.Tensor,
                      sink_error: torch.Tensor, sinks: int, allow: torch.Tensor, scaling: float, observed: torch.Tensor,
                      meta: int, bits: int, group: int) -> torch.Tensor:
    """One decode step of attention over ``[KIVI pages | window]`` (``csrc/kivi.c``): ``(B, H, G, D)`` float32
    queries; each (row, head) reads its first ``npages`` ``(B * H,)`` int64 of ``J`` pages of ``group`` slots,
    each a key block and a value block at the ``(B * H, J)`` int64 addresses in ``key_pages`` and
    ``value_pages``, their parts at the byte offsets ``layout`` (six int64,
    :class:`kvcompress.methods.kivi.PageLayout`), out of ``stored`` slots (a head holding fewer is
    ragged: its other slots are padding, weight 0). Scales and zero points of the kind ``meta`` (0 float32,
    1 float16, 2 bfloat16). Float32 window keys and values ``(B, H, W, D)`` (each (row, head) a contiguous
    block, blocks one stride apart); ``sink_keys`` and ``sink_error`` ``(B * H,)`` int64 addresses of each
    head's float32 exact keys and value errors ``(sinks, D)`` of its first slots (0: none; empty: no head
    has any, see :class:`kvcompress.methods.kivi.KIVIStore`); ``allow`` ``(B, H, stored + W)`` uint8 or
    empty (every slot real; the last slot, the query's own token, is always allowed). Returns the
    ``(B, H, G, D)`` output, and adds to ``observed`` ``(B, H, stored + W)`` (unless empty) the attention
    each slot received, as :func:`paged_attend` does."""
    batch, heads, rows, dim = query.shape
    window = window_keys.shape[2]
    out = query.new_empty(batch, heads, rows, dim)
    ostride = observed_rows(observed) if observed.numel() else 0
    pointer = native.data_pointer
    status = native.load("kivi").kivi_attend_pages(
        pointer(query), pointer(key_pages), pointer(value_pages), ctypes.c_int64(key_pages.shape[1]), pointer(npages),
        pointer(layout),
        ctypes.c_int64(stored), ctypes.c_int(meta), pointer(window_keys), pointer(window_values),
        ctypes.c_int64(window_keys.stride(1) if window else 0), ctypes.c_int64(window), pointer(sink_keys),
        pointer(sink_error), ctypes.c_int64(sinks), pointer(allow), ctypes.c_float(scaling), pointer(out),
        pointer(observed), ctypes.c_int64(ostride), *map(ctypes.c_int64, (batch * heads, rows, dim)), ctypes.c_int(bits),
        ctypes.c_int64(group),
    )
    if status:
        raise MemoryError("kvcompress::kivi_attend_pages: the kernel could not allocate its scratch buffers")
    return out


@kivi_attend_pages.register_fake
def _(query, key_pages, value_pages, npages, layout, stored, window_keys, window_values, sink_keys, sink_error, sinks,
      allow, scaling, observed, meta, bits, group):
    return query.new_empty(query.shape)


@native.custom_op("kvcompress::lowrank_logits")
def lowrank_logits(
    query: torch.Tensor,
    latent: torch.Tensor,
    basis_t: torch.Tensor,
    mean: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """``(B, H, R, N)`` logits of ``(B, H, R, D)`` float32 queries over keys rebuilt from ``latent``
    ``(B, G, N, r)`` (last dim contiguous) as ``mean (G, E) + basis_t (G, r, E)ᵀ latent`` (``E = H / G * D``:
    a group's heads side by side) and rotated (half-split RoPE) at ``positions`` ``(B, H, N)`` int32 (a view
    of a buffer with room for more qualifies, as :func:`kernel_rows`) by the ``(P, D)`` tables ``cos``,
    ``sin``; ``csrc/lowrank.c``."""
    batch, heads, rows, dim = query.shape
    groups, n, rank = latent.shape[1], latent.shape[2], latent.shape[3]
    out = query.new_empty(batch, heads, rows, n)
    basis_t, mean, cos, sin = (t.contiguous() for t in (basis_t, mean, cos, sin))
    if positions.stride(2) != 1 or (batch > 1 and positions.stride(0) != heads * positions.stride(1)):
        positions = positions.contiguous()
    status = native.load("lowrank").lowrank_logits(
        native.data_pointer(query), native.data_pointer(latent), *map(ctypes.c_int64, latent.stride()[:3]),
        native.data_pointer(basis_t), native.data_pointer(mean), native.data_pointer(positions),
        ctypes.c_int64(positions.stride(1) if n else 0),
        native.data_pointer(cos), native.data_pointer(sin), ctypes.c_int64(cos.shape[0]), native.data_pointer(out),
        *map(ctypes.c_int64, (batch, heads, groups, rows, n, rank, dim)),
    )
    if status:
        raise MemoryError("kvcompress::lowrank_logits: the kernel could not allocate its scratch row")
    return out


@lowrank_logits.register_fake
def _(query, latent, basis_t, mean, positions, cos, sin):
    return query.new_empty(*query.shape[:3], latent.shape[2])


def drop_lowest(
    scores: torch.Tensor | None, valid: torch.Tensor, budget: torch.Tensor | int, recent: torch.Tensor | int, sink: int
) -> tuple[bool, torch.Tensor | None]:
    """The decode step of eviction one token at a time (H2O, TOVA, StreamingLLM) in one C call
    (``csrc/select.c``): every head one slot over its budget drops the valid slot :func:`kvcompress.methods.budgets.lowest_slot`
    drops among those outside the first ``sink`` and the newest ``recent``; with ``scores`` None, the
    oldest of those (StreamingLLM's age rule). ``budget`` and ``recent`` are ``(B, H, 1)`` or one int for
    every head; ``valid`` may be a view of a buffer's mask with spare capacity (read where it is).

    Returns ``(True, keep)`` with the ``(B, H, S)`` kept slots (None when no head is over its budget),
    or ``(False, None)`` when the kernel cannot answer (not built, not on the CPU, or a head more than
    one slot over): the caller then ranks."""
    library = native.load("select") if valid.device.type == "cpu" else None
    if library is None:
        return False, None
    batch, heads, slots = valid.shape
    valid = kernel_rows(valid[..., None])[..., 0]  # a view of a buffer's mask with spare capacity is read in place
    if scores is not None:
        scores = scores.float().contiguous()  # held here while the kernel reads it
    budget, recent = (t.to(torch.int64).expand(batch, heads, 1).contiguous() if torch.is_tensor(t) else t for t in (budget, recent))
    keep = valid.clone(memory_format=torch.contiguous_format)
    dropped = library.drop_lowest(
        _pointer(scores), native.data_pointer(valid), ctypes.c_int64(valid.stride(1)), native.data_pointer(keep),
        _pointer(budget), _every(budget), _pointer(recent), _every(recent), *map(ctypes.c_int64, (sink, batch * heads, slots)),
    )
    if dropped < 0:
        return False, None
    return True, keep if dropped else None


def _pointer(t) -> ctypes.c_void_p | None:
    """A tensor argument of ``csrc/select.c`` (NULL for None or an int)."""
    return native.data_pointer(t) if torch.is_tensor(t) else None


def _every(t) -> ctypes.c_int64:
    """The value of an int argument for every head (unused when it is a tensor)."""
    return ctypes.c_int64(0 if torch.is_tensor(t) else t)
