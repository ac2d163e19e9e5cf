"""Scope kvcompress on a model: ``with kvcompress.attach(model, cache): model.generate(..., past_key_values=cache)``.

Inside the block, and only there, the model runs its compressed layers through kvcompress:

- its attention implementation is ``kvcompress`` (registered once with transformers' public
  ``AttentionInterface``): for a compressed layer it runs the layer's step
  (:meth:`kvcompress.cache.CompressedLayer.attend`); for any other layer (sliding-window layers of
  hybrid models) or a forward without this cache, it is transformers' ``sdpa``;
- one forward pre-hook on the model (a public PyTorch extension point) is the adapter for what
  transformers gives a cache no channel for: it reads the forward's 2D padding mask and positions
  into :class:`~kvcompress.step.StepInputs`, and passes them as the ``kvcompress`` keyword, which
  transformers forwards to every attention call.

On exit, also after an exception, the hook is removed and the attention implementation restored:
the model computes exactly what it computed before. Threads may attach caches to one model at the
same time (a server's, a user's): the implementation is installed by the first attach and restored
by the last one out, under a lock, and each hook serves only its own cache's forwards. A 4D attention mask given by the caller is
passed on untouched and its padding is not read (the cache's own slot validity masks its layers).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcompress.batching import CacheBatch, RowsLayer
from kvcompress.cache import CompressedCache, CompressedLayer
from kvcompress.step import ATTENTION, StepInputs

KEYWORD = "kvcompress"  # the forward keyword that carries StepInputs to every attention call


def kvcompress_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function: a compressed layer's step (each group's, in a batch of caches), else ``sdpa``
    (same arguments and results)."""
    inputs: StepInputs | None = kwargs.get(KEYWORD)
    layer = inputs.cache.layers[module.layer_idx] if inputs is not None else None
    if isinstance(layer, (CompressedLayer, RowsLayer)):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = layer.attend(query, key, value, inputs, scaling)  # (B, Hq, q, D)
        return out.transpose(1, 2).contiguous(), None
    kwargs.pop(KEYWORD, None)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ATTENTION, kvcompress_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks for the layers sdpa serves


_LOCK = threading.Lock()
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [attaches open, implementation before]


@contextlib.contextmanager
def _kvcompress_attention(model):
    """``kvcompress`` as the model's attention implementation inside the block. Blocks of several
    threads may overlap: the first in installs it, the last out restores what the first found."""
    with _LOCK:
        if model not in _INSTALLED:
            previous = model.config._attn_implementation
            if previous != ATTENTION:
                model.set_attn_implementation(ATTENTION)
            _INSTALLED[model] = [0, previous]
        _INSTALLED[model][0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _INSTALLED[model][0] -= 1
            if _INSTALLED[model][0] == 0:
                previous = _INSTALLED.pop(model)[1]
                if previous != ATTENTION:
                    model.set_attn_implementation(previous)


def _pre_forward(cache: CompressedCache, module: torch.nn.Module, args: tuple, kwargs: dict):
    if args:  # positional call: bind to names so the mask and cache are found wherever they are
        kwargs = _bind_to_names(module.forward, args, kwargs)
        args = ()
    if kwargs.get("cache", kwargs.get("past_key_values")) is not cache:
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    new = tokens.shape[1]
    mask, valid = kwargs.get("attention_mask"), None
    if mask is not None and mask.dim() == 2:
        incoming = mask[:, -new:].bool()  # (B, q) the padding of this forward's tokens
        valid = None if bool(incoming.all()) else incoming
    kwargs[KEYWORD] = StepInputs(cache, valid, kwargs.get("position_ids"), cache.deferring, cache.expected, cache.replaying)
    return args, kwargs


def _bind_to_names(forward, args: tuple, kwargs: dict) -> dict:
    signature = inspect.signature(forward)
    named = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


@contextlib.contextmanager
def attach(model, cache: CompressedCache | CacheBatch):
    """Run ``model`` with ``cache`` compressing, inside a ``with`` block; restore the model on exit.
    A :class:`~kvcompress.batching.CacheBatch` (several sequences' caches decoded together) is attached
    the same way.

    Safe from several threads at once on one model, each with its own cache: the model is restored
    when the last of them leaves.

    Args:
        model: the transformers causal LM the cache was made for.
        cache: from :func:`kvcompress.make_cache`.

    Raises:
        TypeError: ``cache`` is not a kvcompress cache.
        ValueError: the cache was made for another model.
        RuntimeError: the cache is already attached to another model.
    """
    if not isinstance(cache, (CompressedCache, CacheBatch)):
        raise TypeError(f"kvcompress.attach needs a cache from kvcompress.make_cache, not {type(cache).__name__}")
    cache.check_model(model)
    outer = cache.attached_to
    if outer is not None and outer is not model:
        raise RuntimeError("this cache is already attached to another model; leave that attach block first")
    with _kvcompress_attention(model):
        handle = model.register_forward_pre_hook(functools.partial(_pre_forward, cache), with_kwargs=True)
        try:
            cache.attached_to = model
            yield cache
        finally:
            cache.attached_to = outer
            handle.remove()
