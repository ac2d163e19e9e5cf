"""The ``kvcompress`` attention implementation: per-layer masks and attention scores for eviction.

Registered through transformers' public ``AttentionInterface`` (and ``AttentionMaskInterface``)
under the name ``"kvcompress"``; :func:`kvcompress.make_cache` switches a model to it when the
method needs it. It computes the same attention as ``sdpa``, with two additions:

- the mask comes from the layer's own slot validity, so layers (and heads) may hold different
  tokens (per-layer budgets, padding after eviction);
- after attending, it hands the step's queries to the layer, which turns them into the attention
  weights its eviction policy scores with (SnapKV's observation window, H2O's accumulated
  attention, TOVA's current query) and then compresses.

The cache reaches this function as the ``kvcompress_cache`` keyword, which the forward pre-hook
of :mod:`kvcompress.cache` adds to the model call; transformers forwards such keywords to every
attention call.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvcompress"
QUERY_CHUNK = 256  # queries per chunk when scoring many of them (bounds the (q, S) weight matrix)


def allowed(valid: torch.Tensor, new: int) -> torch.Tensor:
    """Which slots the last ``new`` tokens may attend to.

    Args:
        valid: ``(B, H, S)`` bool validity of every slot; the last ``new`` slots are the new tokens.
        new: tokens of this step.

    Returns:
        ``(B, H, new, S)`` bool: valid past slots, the new tokens causally, and always the token
        itself (so a padding query never has an empty row).
    """
    slots = valid.shape[-1]
    slot = torch.arange(slots, device=valid.device)
    own = torch.arange(slots - new, slots, device=valid.device)[:, None]  # (new, 1) each query's slot
    causal = slot[None, :] <= own  # (new, S)
    return (valid[:, :, None, :] & causal) | (slot[None, :] == own)


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention weights of the last queries, averaged over the query heads of each KV head.

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
    weights = logits.softmax(-1).mean(2)  # (B, H, m, S)
    return weights * valid[..., -m:, None]


def summed_attention(queries, keys, valid, scaling) -> torch.Tensor:
    """``(B, H, S)`` attention received by each slot from the ``m`` last queries, in chunks."""
    total = torch.zeros(valid.shape, dtype=torch.float32, device=keys.device)
    m, slots = queries.shape[2], keys.shape[2]
    for start in range(0, m, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, m)
        end = slots - (m - stop)  # the chunk's queries are the last tokens of keys[:, :, :end]
        total[..., :end] += attention_weights(
            queries[:, :, start:stop], keys[:, :, :end], valid[..., :end], scaling
        ).sum(2)
    return total


def latent_value_attention(query, keys, window_values, mask, scaling, latent) -> torch.Tensor:
    """Attention whose stored values stay latent: one softmax over ``[stored | window]`` slots, then
    the stored part mixed in latent space (:meth:`kvcompress.methods.lowrank.LatentValues.mix`) and
    the window part on its full-precision values.

    Args:
        query: ``(B, Hq, q, D)``; keys: ``(B, H, S, D)``, all slots; window_values: ``(B, H, n, D)``,
            the last ``n`` slots' values; mask: bool, broadcastable to ``(B, Hq, q, S)``, or None.

    Returns:
        ``(B, Hq, q, D)``, as sdpa on the rebuilt values.
    """
    batch, q_heads, q, dim = query.shape
    heads, slots = keys.shape[1], keys.shape[2]
    rep = q_heads // heads
    # The rep query heads of a KV head are consecutive: stack them as rows (no copy of the keys).
    scores = query.reshape(batch, heads, rep * q, dim) @ keys.transpose(-1, -2)  # (B, H, rep*q, S)
    scores = scores.view(batch, q_heads, q, slots) * scaling
    if mask is None and q > 1:  # new tokens see each other causally
        mask = allowed(torch.ones(batch, heads, slots, dtype=torch.bool, device=keys.device), q).repeat_interleave(rep, 1)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    weights = scores.float().softmax(-1).to(query.dtype)
    stored = slots - window_values.shape[2]
    out = latent.mix(weights[..., :stored], heads)
    window = weights[..., stored:].reshape(batch, heads, rep * q, -1) @ window_values  # (B, H, rep*q, D)
    return out + window.view(batch, q_heads, q, dim)


def kvcompress_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Drop-in attention function: ``(B, Hq, q, D)`` queries over the cache's ``(B, H, S, D)`` K/V."""
    from kvcompress.cache import CompressedLayer  # the cache imports this module

    cache = kwargs.get("kvcompress_cache")
    layer = cache.layers[module.layer_idx] if cache is not None else None
    q_len = query.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    is_causal = False
    if isinstance(layer, CompressedLayer) and layer.step_needs_mask:
        valid = layer.step_valid
        if valid is None:
            valid = torch.ones(key.shape[:3], dtype=torch.bool, device=key.device)
        groups = query.shape[1] // key.shape[1]
        attention_mask = allowed(valid, q_len).repeat_interleave(groups, dim=1)  # (B, Hq, q, S)
    elif attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    elif attention_mask is None:
        is_causal = q_len > 1 and q_len == key.shape[2]
    latent = layer.step_latent if isinstance(layer, CompressedLayer) else None
    if latent is not None:
        out = latent_value_attention(query, key, value, attention_mask, scaling, latent)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=is_causal, scale=scaling, enable_gqa=True
        )
    if isinstance(layer, CompressedLayer):
        layer.after_attention(query, key, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, kvcompress_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
