"""The compressed KV cache: a transformers ``Cache`` whose layers hold only compressed K/V.

Each :class:`CompressedLayer` holds a full-precision window of recent tokens and, when the pipeline
has a representation (e.g. KIVI), a store of older tokens in that representation. After every
``update`` the layer evicts (if the pipeline has a selection) and moves tokens that left the window
into the store. Attention gets a transient full-precision view; nothing dequantized is kept.

Tokens *seen* (for positions) are tracked apart from tokens *stored* (for masks): a new token's
position is its true index in the sequence, and ``get_mask_sizes`` reports the stored length.

Padding. transformers builds the attention mask from the 2D padding mask by indexing it with slot
positions ``seen - stored + j``. That is right as long as every stored slot holds a real token or
slots still line up with sequence positions (nothing evicted). When eviction leaves padding or
evicted-but-held slots (a row with fewer tokens than the budget, a partly evicted quantized block),
the cache builds the 4D mask itself from its per-slot validity. It learns which incoming tokens are
padding from a forward pre-hook on the model (a public PyTorch extension point) that reads the
``attention_mask`` argument; the hook is attached by :func:`make_cache`.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvcompress.buffer import FullPrecisionBuffer
from kvcompress.methods.base import Representation, Selection
from kvcompress.registry import SpecError, parse_spec


class CompressedLayer(CacheLayerMixin):
    """One full-attention layer: a full-precision window plus an optional compressed store.

    Slots are ordered ``[store | window]``, each in position order per row.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, selection: Selection | None = None, representation: Representation | None = None):
        super().__init__()
        self.selection, self.representation = selection, representation
        # With a store, the window never holds more than residual + block - 1 tokens between steps.
        self.window = FullPrecisionBuffer() if representation is None else FullPrecisionBuffer(chunk=1)
        self.store = None
        self.seen = 0
        self.evicted = False  # until the first eviction, slot j holds the token at position j

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.representation is not None:
            self.store = self.representation.new_store(key_states.shape[-1], key_states.dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, new_valid: torch.Tensor | None = None, **kwargs):
        """Add ``(B, H, q, D)`` new keys/values; return the keys/values this step attends to.

        Args:
            new_valid: ``(B, q)`` bool, False for padding tokens; None when all are real.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.window.append(key_states, value_states, new_valid)
        self.seen += key_states.shape[-2]
        keys, values = self._attention_inputs()
        self._evict(batch=key_states.shape[0])
        self._settle()
        return keys, values

    def _parts(self):
        return [part for part in (self.store, self.window) if part is not None and len(part)]

    def _attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        kvs = [part.keys_values() for part in self._parts()]
        if len(kvs) == 1:
            return kvs[0]
        return torch.cat([k for k, _ in kvs], 2), torch.cat([v for _, v in kvs], 2)

    def valid(self) -> torch.Tensor | None:
        """``(B, S)`` bool validity of every slot, or None when all are real tokens."""
        parts = self._parts()
        masks = [part.valid() for part in parts]
        if all(m is None for m in masks):
            return None
        batch = next(m for m in masks if m is not None).shape[0]
        return torch.cat(
            [m if m is not None else torch.ones(batch, len(p), dtype=torch.bool, device=self.device) for m, p in zip(masks, parts)],
            1,
        )

    def _evict(self, batch: int) -> None:
        if self.selection is None:
            return
        valid = self.valid()
        if valid is None:
            valid = torch.ones(batch, len(self), dtype=torch.bool, device=self.device)
        keep = self.selection.select(valid)
        if keep is None:
            return
        self.evicted = True
        stored = len(self.store) if self.store is not None else 0
        if stored:
            self.store.compact(keep[:, :stored])
        self.window.compact(keep[:, stored:])

    def _settle(self) -> None:
        """Move the oldest window tokens into the store, whole blocks at a time."""
        if self.store is None:
            return
        ready = len(self.window) - self.representation.residual
        count = ready - ready % self.store.block
        if count > 0:
            self.store.append(*self.window.take_front(count))

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())

    @property
    def nbytes(self) -> int:
        return self.window.nbytes + (self.store.nbytes if self.store is not None else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.5 passes cache_position
            query_length = query_length.shape[0]
        stored = len(self)
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.selection, self.representation)

    def map_batch(self, fn) -> None:
        for part in self._parts():
            part.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")


def _layer_nbytes(layer) -> int:
    if isinstance(layer, CompressedLayer):
        return layer.nbytes
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)


class CompressedCache(Cache):
    """A ``Cache`` of :class:`CompressedLayer` s, one per full-attention layer of the model.

    Sliding-window layers of hybrid models (Gemma 3) keep transformers' own sliding-window layer:
    they already hold a bounded window.
    """

    def __init__(self, spec: str, config):
        methods = parse_spec(spec)
        selection, representation = _split_pipeline(spec, methods)
        text_config = config.get_text_config()
        types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        layers = []
        for layer_type in types:
            if layer_type == "full_attention":
                layers.append(CompressedLayer(selection, representation))
            elif layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window))
            else:
                raise ValueError(f"kvcompress supports full and sliding attention layers, not {layer_type!r}")
        super().__init__(layers=layers)
        self.spec = spec
        self._incoming_valid: torch.Tensor | None = None

    @property
    def compressed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return layer.update(key_states, value_states, new_valid=self._incoming_valid)
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache holds: codes, scales, zero points, masks, windows."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    @property
    def stored_tokens(self) -> int:
        """Slots held by the first compressed layer (tokens seen are ``get_seq_length()``)."""
        return len(self.compressed_layers[0])

    def observe_inputs(self, attention_mask: torch.Tensor | None, query_length: int):
        """Record which incoming tokens are padding; return a 4D mask when the cache must supply one.

        Args:
            attention_mask: the forward's ``(B, seen + q)`` padding mask, or None.
            query_length: ``q``, tokens in this forward.

        Returns:
            None (transformers' own mask is right), or a ``(B, 1, q, stored + q)`` bool mask.
        """
        if attention_mask is not None and attention_mask.dim() == 2:
            incoming = attention_mask[:, -query_length:].bool()
            self._incoming_valid = None if bool(incoming.all()) else incoming
        else:
            self._incoming_valid = None
        layers = self.compressed_layers
        stored_valid = layers[0].valid() if layers[0].is_initialized else None
        if stored_valid is None or not layers[0].evicted:
            return None  # every slot is real, or slots still map to sequence positions one to one
        if any(len(layer) != len(layers[0]) for layer in layers) or len(layers) != len(self.layers):
            raise NotImplementedError(
                "padded batches after eviction need all layers to hold the same tokens; "
                "run sequences one at a time for this model or method"
            )
        batch = stored_valid.shape[0]
        incoming = self._incoming_valid
        if incoming is None:
            incoming = torch.ones(batch, query_length, dtype=torch.bool, device=stored_valid.device)
        causal = torch.ones(query_length, query_length, dtype=torch.bool, device=stored_valid.device).tril()
        # A query always sees itself, so a padding query never gets an all-masked row (NaN in softmax).
        new = (causal & incoming[:, None, :]) | torch.eye(query_length, dtype=torch.bool, device=causal.device)
        old = stored_valid[:, None, :].expand(batch, query_length, stored_valid.shape[1])
        return torch.cat([old, new], 2)[:, None]  # (B, 1, q, S + q)


def _split_pipeline(spec: str, methods: list) -> tuple[Selection | None, Representation | None]:
    selections = [m for m in methods if isinstance(m, Selection)]
    representations = [m for m in methods if isinstance(m, Representation)]
    if len(selections) > 1 or len(representations) > 1:
        raise SpecError(
            f"{spec!r}: combine at most one eviction method with at most one storage method "
            f"(e.g. 'streaming:window=2048+kivi:bits=4')"
        )
    return (selections[0] if selections else None), (representations[0] if representations else None)


_HOOKED_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict):
    if args:  # positional call: bind to names so the mask and cache are found wherever they are
        kwargs = _bind_to_names(module.forward, args, kwargs)
        args = ()
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, CompressedCache):
        return None
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs["inputs_embeds"]
    mask = cache.observe_inputs(kwargs.get("attention_mask"), inputs.shape[1])
    if mask is not None:
        if module.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=module.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(module.dtype).min
            )
        kwargs["attention_mask"] = mask
    return args, kwargs


def _bind_to_names(forward, args: tuple, kwargs: dict) -> dict:
    signature = inspect.signature(forward)
    named = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def make_cache(method: str, model) -> CompressedCache:
    """Build a compressed cache for ``model`` from a method spec.

    Usable as ``model.generate(**inputs, past_key_values=cache)`` and in a plain forward loop.

    Args:
        method: a spec such as ``"streaming:sink=4,window=1024"``, ``"kivi:bits=2"``,
            ``"streaming:window=2048+kivi:bits=4"`` or ``"none"``.
        model: a transformers causal LM.

    Raises:
        SpecError: unknown method or parameter, or a bad value.
    """
    cache = CompressedCache(method, model.config)
    if model not in _HOOKED_MODELS:
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        _HOOKED_MODELS.add(model)
    return cache
