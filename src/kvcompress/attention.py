"""Attention over a compressed layer's :class:`~kvcompress.step.Operands`, with masks from slot validity.

Every compressed layer builds its own mask from its own slots (valid slots, the step's new tokens
causally, each token always seeing itself), so layers and heads may hold different tokens
(per-layer budgets, ragged heads, padding after eviction): there is no other mask path.

Three paths compute the same result (tests compare them):

- **dense**: when the step has more than :data:`SEGMENT_QUERIES` queries (a prompt, or a chunk of
  one), or every segment is full precision and the step needs no attention weights from the pass:
  the segments' keys and values (rebuilt in full precision once for the step, one layer at a time,
  for a quantized or latent segment) go to torch's ``scaled_dot_product_attention``; when a scorer
  observes the last queries (SnapKV's window, all of H2O's prompt), those queries instead get their
  output and the attention each slot receives from one chunked pass (:func:`attend_observing`).
  With many queries a matrix product over rebuilt keys beats unpacking the codes once per query.
- **one pass**: a decode step (one query per row) over float32 slots only (``kvcompress::paged_attend``,
  ``csrc/dense.c``), or over a stored segment that can attend on its own (``attend_one``, e.g. KIVI's
  codes) and the full-precision window: logits, the slots' mask, softmax and the value mix in one
  kernel call per layer, which also adds the attention each slot received to the layer's observation
  when a scorer observes it (so H2O and TOVA score from the step's own pass, and the weights are never
  written out). Taken first wherever it applies, on the CPU with the C kernels.
- **segments**: each segment computes its logits from the queries and mixes its own values from
  the weights (a quantized or latent segment without rebuilding full-precision keys or values),
  with one softmax over all of them; queries go in chunks so the ``(G, S)`` weights stay bounded,
  and the observed queries' weights come from the same pass.

:func:`reference_path` forces the dense path with observed attention from a separate pass, the
plain-PyTorch reference the other paths are tested against.

Shapes as in :mod:`kvcompress.step`.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kvcompress import native
from kvcompress.kernels import (
    NO_MASK,
    NO_OBSERVATION,
    NO_WINDOW,
    dense_one_pass_applies,
    observe_rows,
    page_mask,
    paged_attend,
    paged_one_pass_applies,
    window_attend,
)
from kvcompress.step import Attended, DenseSegment, Operands

QUERY_CHUNK = 256  # queries per chunk when scoring many of them in a separate pass
SEGMENT_QUERIES = 64  # above this many queries, the step goes to sdpa over rebuilt keys and values
LOGITS_BUDGET = 1 << 24  # elements of one chunk's (B, Hq, chunk, S) weights in the segment path
WEIGHTS_BUDGET = 1 << 21  # elements of one chunk's weights when observing queries (8 MB; 4 MB measured 4 % slower)


def allowed(valid: torch.Tensor, new: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Which slots the step's queries ``start .. stop - 1`` (of its ``new`` tokens) may attend to.

    Args:
        valid: ``(B, H, S)`` bool validity of every slot; the last ``new`` slots are the new tokens.
        new: tokens of this step.
        start, stop: the queries asked for (default: all ``new``).

    Returns:
        ``(B, H, stop - start, S)`` bool: valid past slots, the new tokens causally, and always the
        token itself (so a padding query never has an empty row).
    """
    stop = new if stop is None else stop
    slots = valid.shape[-1]
    slot = torch.arange(slots, device=valid.device)
    own = torch.arange(slots - new + start, slots - new + stop, device=valid.device)[:, None]  # (c, 1)
    causal = slot[None, :] <= own  # (c, S)
    return (valid[:, :, None, :] & causal) | (slot[None, :] == own)


def attention_weights(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    peak: bool = False,
    scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention weights of the last queries, averaged over the query heads of each KV head
    (``peak``: their maximum), each weight first multiplied by ``scale``'s ``(B, Hq, S)`` per slot and
    ``(B, m)`` per query factors, if given.

    Args:
        queries: ``(B, Hq, m, D)``, the tokens in the last ``m`` slots.
        keys: ``(B, H, S, D)``.
        valid: ``(B, H, S)`` bool.
        scaling: the model's softmax scale.

    Returns:
        ``(B, H, m, S)`` float32; rows of padding queries are zero.
    """
    batch, q_heads, m, dim = queries.shape
    heads = keys.shape[1]
    grouped = queries.reshape(batch, heads, q_heads // heads, m, dim).float()  # (B, H, g, m, D)
    logits = torch.einsum("bhgmd,bhsd->bhgms", grouped, keys.float()) * scaling
    logits = logits.masked_fill(~allowed(valid, m)[:, :, None], -torch.inf)
    weights = logits.softmax(-1)  # (B, H, g, m, S)
    if scale is not None:
        slots, rows = scale
        weights = weights * slots.view(batch, heads, -1, 1, slots.shape[-1]) * rows[:, None, None, :, None]
    weights = weights.amax(2) if peak else weights.mean(2)  # (B, H, m, S)
    return weights * valid[..., -m:, None]


def summed_attention(queries, keys, valid, scaling) -> torch.Tensor:
    """``(B, H, S)`` attention received by each slot from the ``m`` last queries, in chunks."""
    return _received(queries, keys, valid, scaling, peak=False)


def peak_attention(queries, keys, valid, scaling, scale=None) -> torch.Tensor:
    """``(B, H, S)`` the largest attention weight each slot receives from any of the ``m`` last queries
    and any query head of its KV head (KVzip's score), in chunks; ``scale``: see :func:`attention_weights`."""
    return _received(queries, keys, valid, scaling, peak=True, scale=scale)


def _received(queries, keys, valid, scaling, peak: bool, scale=None) -> torch.Tensor:
    total = torch.zeros(valid.shape, dtype=torch.float32, device=keys.device)
    m, slots = queries.shape[2], keys.shape[2]
    for start in range(0, m, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, m)
        end = slots - (m - stop)  # the chunk's queries are the last tokens of keys[:, :, :end]
        part = None if scale is None else (scale[0][..., :end], scale[1][:, start:stop])
        weights = attention_weights(queries[:, :, start:stop], keys[:, :, :end], valid[..., :end], scaling, peak, part)
        if peak:
            total[..., :end] = torch.maximum(total[..., :end], weights.amax(2))
        else:
            total[..., :end] += weights.sum(2)
    return total


def observed_count(observe: int, new: int) -> int:
    """How many of the step's ``new`` queries are observed (``observe``: 0 none, -1 all, else the last k)."""
    return new if observe < 0 else min(observe, new)


_REFERENCE = contextvars.ContextVar("kvcompress_reference_path", default=False)


@contextlib.contextmanager
def reference_path():
    """Inside this block every step takes the reference path: full-precision keys and values rebuilt
    from every segment, torch's sdpa, and observed attention from a separate pass."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def attend(query: torch.Tensor, operands: Operands, scaling: float) -> Attended:
    """``(B, Hq, q, D)`` queries over a layer's operands: the output and, if asked, observed attention."""
    if _REFERENCE.get():
        return attend_dense(query, operands, scaling)
    one = attend_one_pass(query, operands, scaling)
    if one is not None:
        return one
    if query.shape[2] > SEGMENT_QUERIES:  # a prompt or a chunk of one: rebuild each segment once, then sdpa
        if operands.observe:  # the observed queries' weights come from their own pass, the others' output from sdpa
            return attend_observing(query, operands, scaling)
        return attend_dense(query, operands, scaling)
    if operands.observe == 0 and all(segment.dense_only for segment in operands.segments):
        return attend_dense(query, operands, scaling)
    return attend_segments(query, operands, scaling)


def attend_one_pass(query: torch.Tensor, operands: Operands, scaling: float) -> Attended | None:
    """The one-pass path (see the module docstring); None where it does not apply."""
    batch, q_heads, new, dim = query.shape
    segments, heads = operands.segments, operands.heads
    first, window = segments[0], (segments[1] if len(segments) == 2 else None)
    if new != 1 or len(segments) > 2 or (window is not None and not isinstance(window, DenseSegment)):
        return None
    grouped = query.reshape(batch, heads, q_heads // heads, dim)  # (B, H, rep, D)
    # The kernel adds the query's row, averaged over the query heads of each KV head, to the observation (a
    # padding query counts zero).
    observed = observation(operands, batch, len(operands), query.device) if operands.observe else NO_OBSERVATION
    if len(segments) == 1 and hasattr(first, "pointers"):  # eviction alone, in pages (kvcompress.paged)
        if not paged_one_pass_applies(query, first):
            return None
        out = paged_attend(grouped.contiguous(), *first.pointers(), *first.page_counts(), first.page, len(first), NO_WINDOW,
                           NO_WINDOW, page_mask(operands.valid), scaling, observed)
    elif len(segments) == 1 and isinstance(first, DenseSegment):  # a window alone (a store not yet written)
        if not dense_one_pass_applies(query, first):
            return None
        out = window_attend(grouped, first.keys, first.values, page_mask(operands.valid), scaling, observed)
    elif hasattr(first, "attend_one"):
        out = first.attend_one(grouped, window, operands.valid, scaling, observed)
    else:
        return None
    if out is None:
        return None
    return Attended(out.reshape(batch, q_heads, 1, dim).to(query.dtype), observed if operands.observe else None)


def observation(operands: Operands, batch: int, slots: int, device) -> torch.Tensor:
    """The ``(B, H, S)`` float32 tensor a step adds its observed attention to: the layer's running
    observation (:attr:`Operands.observed`, in place), or zeros."""
    if operands.observed is not None:
        return operands.observed
    return torch.zeros(batch, operands.heads, slots, dtype=torch.float32, device=device)


def _valid_or_ones(operands: Operands, batch: int, heads: int, device) -> torch.Tensor:
    if operands.valid is not None:
        return operands.valid
    return torch.ones(batch, heads, len(operands), dtype=torch.bool, device=device)


def dense_operands(operands: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, S, D)`` keys and values of every segment, rebuilt in full precision and joined."""
    kvs = [segment.dense() for segment in operands.segments]
    keys = torch.cat([k for k, _ in kvs], 2) if len(kvs) > 1 else kvs[0][0]
    values = torch.cat([v for _, v in kvs], 2) if len(kvs) > 1 else kvs[0][1]
    return keys, values


def attend_dense(query: torch.Tensor, operands: Operands, scaling: float) -> Attended:
    """The dense path (see the module docstring), and the reference for every other."""
    keys, values = dense_operands(operands)
    batch, _, new, _ = query.shape
    out = _sdpa(query, keys, values, operands.valid, scaling)
    observed = None
    if operands.observe:
        m = observed_count(operands.observe, new)
        summed = summed_attention(query[:, :, -m:], keys, _valid_or_ones(operands, batch, keys.shape[1], keys.device), scaling)
        observed = observation(operands, batch, keys.shape[2], keys.device).add_(summed)
    return Attended(out, observed)


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scaling: float):
    """torch's sdpa of ``(B, Hq, q, D)`` queries, the last ``q`` of the ``S`` slots, with the slots' mask."""
    q_heads, new = query.shape[1], query.shape[2]
    heads, slots = keys.shape[1], keys.shape[2]
    mask, is_causal = None, False
    if valid is not None:
        mask = allowed(valid, new).repeat_interleave(q_heads // heads, dim=1)  # (B, Hq, q, S)
    elif new == slots and new > 1:
        is_causal = True  # torch aligns its causal mask top-left: right only when q == S
    elif new > 1:
        mask = allowed(torch.ones(1, 1, slots, dtype=torch.bool, device=keys.device), new)  # (1, 1, q, S)
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=True
    )


def attend_observing(query: torch.Tensor, operands: Operands, scaling: float) -> Attended:
    """The dense path for a step with many queries of which some are observed (all of H2O's prompt,
    SnapKV's window): the queries before the observed ones go to sdpa; the observed ones get their
    output and the attention each slot receives from one pass, in chunks of queries over rebuilt keys.

    A chunk's queries see only the slots before its end, so its logits stop there. Keys are transposed
    once, so every chunk's product reads them in the layout the matrix product wants (about half the
    time of a transposed view on the CPU). On the CPU, :func:`observe_rows` then turns each row into
    its weights and adds it to the observation while the row sits in the cache, and one product with
    the values gives the output. Elsewhere the softmax stays unnormalized (``e``): one product with the
    values and a column of ones gives both the value mix and the row sums, which then divide the mix
    and the observing row vector, so ``e`` is read by two products and never rescaled."""
    keys, values = dense_operands(operands)
    batch, q_heads, new, dim = query.shape
    heads, slots = keys.shape[1], keys.shape[2]
    rep = q_heads // heads
    m = observed_count(operands.observe, new)
    valid = operands.valid
    real = torch.ones(batch, heads, new, device=query.device) if valid is None else valid[..., -new:].float()  # padding queries count zero
    chunk = max(16, WEIGHTS_BUDGET // max(1, batch * q_heads * slots))
    grouped = (query.float() * scaling).view(batch, heads, rep, new, dim)
    keys_t = keys.float().transpose(-1, -2).contiguous()  # (B, H, D, S)
    native_rows = query.device.type == "cpu" and native.load("dense") is not None
    if not native_rows:
        ones = torch.ones(batch, heads, slots, 1, device=query.device)
        values_1 = torch.cat([values.float(), ones], -1)  # (B, H, S, D + 1)
    output = torch.empty(batch, heads, rep, new, dim, dtype=torch.float32, device=query.device)
    observed = observation(operands, batch, slots, query.device)
    first, before = new - m, slots - m  # the unobserved queries are the last `first` tokens of [:before]
    if first:
        part = None if valid is None else valid[..., :before]
        early = _sdpa(query[:, :, :first], keys[:, :, :before], values[:, :, :before], part, scaling)
        output[:, :, :, :first] = early.float().view(batch, heads, rep, first, dim)
    for start in range(first, new, chunk):
        stop = min(start + chunk, new)
        c, end = stop - start, slots - (new - stop)  # the chunk's queries are the last tokens of [:end]
        rows = grouped[:, :, :, start:stop].reshape(batch, heads, rep * c, dim)
        e = torch.matmul(rows, keys_t[..., :end]).view(batch, heads, rep, c, end)
        if native_rows:  # each row's mask, softmax and observation in one C pass; then the value mix
            allow = NO_MASK if valid is None else allowed(valid[..., :end], c).to(torch.uint8)
            observe_rows(e, allow, real[..., start:stop] / rep, observed)
            mixed = torch.matmul(e.view(batch, heads, rep * c, end), values[:, :, :end].float())
            output[:, :, :, start:stop] = mixed.view(batch, heads, rep, c, dim)
            continue
        if valid is None:  # the chunk's own block is causal; everything before it is seen
            own = torch.ones(c, c, dtype=torch.bool, device=query.device).triu_(1)
            e[..., end - c :].masked_fill_(own, -torch.inf)
        else:
            e.masked_fill_(~allowed(valid[..., :end], c)[:, :, None], -torch.inf)
        e = e.view(batch, heads, rep * c, end)
        e.sub_(e.amax(-1, keepdim=True)).exp_()
        mixed = torch.matmul(e, values_1[:, :, :end])  # (B, H, rep*c, D + 1): the mix, then the row sums
        total = mixed[..., dim:]
        output[:, :, :, start:stop] = (mixed[..., :dim] / total).view(batch, heads, rep, c, dim)
        weigh = real[:, :, None, start:stop].expand(batch, heads, rep, c).reshape(batch, heads, 1, rep * c)
        observed[..., :end] += torch.matmul(weigh / (rep * total.transpose(-1, -2)), e).squeeze(-2)
    return Attended(output.view(batch, q_heads, new, dim).to(query.dtype), observed)


def attend_segments(query: torch.Tensor, operands: Operands, scaling: float) -> Attended:
    """The segment path (see the module docstring); usable on any operands, dense ones included."""
    batch, q_heads, new, dim = query.shape
    segments = operands.segments
    heads, slots = operands.heads, len(operands)
    rep = q_heads // heads
    valid = _valid_or_ones(operands, batch, heads, query.device)
    m = observed_count(operands.observe, new)
    observed = observation(operands, batch, slots, query.device) if m else None
    chunk = max(1, LOGITS_BUDGET // max(1, batch * q_heads * slots))
    bounds = torch.tensor([0] + [len(s) for s in segments]).cumsum(0).tolist()
    outputs = []
    for start in range(0, new, chunk):
        stop = min(start + chunk, new)
        c = stop - start
        grouped = query[:, :, start:stop].reshape(batch, heads, rep * c, dim)  # (B, H, rep*c, D): rows (head, query)
        logits = torch.cat([segment.logits(grouped) for segment in segments], -1).float() * scaling
        mask = allowed(valid, new, start, stop)  # (B, H, c, S)
        logits = logits.view(batch, heads, rep, c, slots).masked_fill(~mask[:, :, None], -torch.inf)
        weights = logits.softmax(-1)  # (B, H, rep, c, S) float32
        flat = weights.view(batch, heads, rep * c, slots).to(query.dtype)
        out = sum(segment.mix(flat[..., lo:hi]) for segment, lo, hi in zip(segments, bounds[:-1], bounds[1:]))
        outputs.append(out.reshape(batch, q_heads, c, -1))
        first = max(start, new - m) if m else stop
        if first < stop:  # observed queries in this chunk: rows of padding queries count zero
            rows = weights[:, :, :, first - start :].mean(2)  # (B, H, c', S)
            real = valid[..., slots - new + first : slots - new + stop, None]  # (B, H, c', 1)
            observed += (rows * real).sum(2)
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)
    return Attended(output, observed)
