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

import contextlib
import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvcompress import attention
from kvcompress.attention import summed_attention
from kvcompress.buffer import FullPrecisionBuffer, RaggedBuffer
from kvcompress.methods.base import LayerView, Representation, Selection
from kvcompress.registry import SpecError, parse_spec


class CompressedLayer(CacheLayerMixin):
    """One full-attention layer: a full-precision window plus an optional compressed store.

    Slots are ordered ``[store | window]``, each in position order per row and head.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        selection: Selection | None = None,
        representation: Representation | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
    ):
        super().__init__()
        self.selection, self.representation = selection, representation
        self.layer_idx, self.num_layers = layer_idx, num_layers
        # With a store, the window never holds more than residual + block - 1 tokens between steps.
        self.window = FullPrecisionBuffer() if representation is None else FullPrecisionBuffer(chunk=1)
        self.store = None
        self.positions: torch.Tensor | None = None  # (B, H, n) int32 window positions, if the store needs them
        self.seen = 0
        self.evicted = False  # until the first eviction, slot j holds the token at position j
        self.scores: torch.Tensor | None = None  # (B, H, S) float32 attention accumulated for the selection
        self.state: dict = {}  # the selection's per-layer state
        self.hold = False  # question-aware: compress after the next step, not this one
        self._pending = False  # compression waits for this step's queries (see after_attention)
        self.step_latent = None  # this step's stored values as latents, for the kvcompress attention

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.representation is not None:
            self.store = self.representation.new_store(key_states.shape[-1], key_states.dtype, self.layer_idx)
        elif self.selection is not None and self.selection.ragged:
            self.store = RaggedBuffer()  # heads keep different numbers of tokens: held without padding
        self.is_initialized = True

    def update(
        self,
        key_states,
        value_states,
        *args,
        new_valid: torch.Tensor | None = None,
        new_positions: torch.Tensor | None = None,
        latent: bool = False,
        **kwargs,
    ):
        """Add ``(B, H, q, D)`` new keys/values; return the keys/values this step attends to.

        Args:
            new_valid: ``(B, q)`` bool, False for padding tokens; None when all are real.
            new_positions: ``(B, q)`` or ``(1, q)`` positions the model gave the tokens; None for
                ``seen .. seen + q - 1``. Kept only for a representation that ``needs_positions``.
            latent: the ``kvcompress`` attention will run; when the store offers latent values,
                the returned values are the window's only and ``step_latent`` holds the store's.
        """
        if self._pending:
            raise RuntimeError(
                f"{self.selection.name} scores tokens by attention and needs the model's attention "
                "implementation to be 'kvcompress' (make_cache sets it; something changed it back)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new, _ = key_states.shape
        if new_valid is not None:
            new_valid = new_valid[:, None, :].expand(batch, heads, new)  # (B, H, q)
        self.window.append(key_states, value_states, new_valid)
        if self.representation is not None and self.representation.needs_positions:
            if new_positions is None:
                new_positions = torch.arange(self.seen, self.seen + new, device=self.device)[None]
            positions = new_positions.to(self.device, torch.int32)[:, None, :].expand(batch, heads, new)  # (B, H, q)
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        self.seen += new
        if self.selection is not None and self.selection.observe:
            zeros = torch.zeros(batch, heads, new, dtype=torch.float32, device=self.device)
            self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], -1)
        inputs = self._latent_inputs() if latent else None
        self.step_latent = None if inputs is None else inputs[1]
        if inputs is None:
            keys, values = self._attention_inputs()
        else:  # values of the stored tokens stay latent: the attention mixes them (LatentValues.mix)
            keys, values = inputs[0], key_states[:, :, :0]
            if len(self.window):
                window_keys, values = self.window.keys_values()
                keys = torch.cat([keys, window_keys], 2)
        # What the kvcompress attention masks with: this step's slots, before compression.
        self.step_valid = self.valid()
        self.step_needs_mask = self.evicted or self.step_valid is not None
        if self.selection is not None and self.selection.observe and not self.hold:
            self._pending = True  # compress once attention has given this step's queries
        elif not self.hold:
            self._compress(keys)
        return keys, values

    def after_attention(self, queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Called by the ``kvcompress`` attention with this step's ``(B, Hq, q, D)`` queries."""
        if not self._pending:
            return
        self._pending = False
        observe = self.selection.observe
        last = queries if observe < 0 else queries[:, :, -observe:]
        valid = self.step_valid  # the slots attention just saw: nothing changed since update
        if valid is None:
            valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        self.scores += summed_attention(last, keys, valid, scaling)
        self._compress(keys, in_place=True)  # attention is done: no view of the window is in use

    def _latent_inputs(self):
        """The store's rebuilt keys and latent values, when its representation mixes values in latent space."""
        representation = self.representation  # None with a store of its own (AdaKV's ragged heads)
        if representation is None or not representation.mixes_latent_values or not len(self.store):
            return None
        return self.store.latent_inputs()

    def _compress(self, keys: torch.Tensor, in_place: bool = False) -> None:
        self._evict(keys, in_place)
        self._settle()

    def _parts(self):
        return [part for part in (self.store, self.window) if part is not None and len(part)]

    def _attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        kvs = [part.keys_values() for part in self._parts()]
        if len(kvs) == 1:
            return kvs[0]
        return torch.cat([k for k, _ in kvs], 2), torch.cat([v for _, v in kvs], 2)

    def valid(self) -> torch.Tensor | None:
        """``(B, H, S)`` bool validity of every slot, or None when all are real tokens."""
        parts = self._parts()
        masks = [part.valid() for part in parts]
        if all(m is None for m in masks):
            return None
        shape = next(m for m in masks if m is not None).shape[:2]
        return torch.cat(
            [m if m is not None else torch.ones(*shape, len(p), dtype=torch.bool, device=self.device) for m, p in zip(masks, parts)],
            -1,
        )

    def _evict(self, keys: torch.Tensor, in_place: bool = False) -> None:
        if self.selection is None:
            return
        valid = self.valid()
        if valid is None:
            valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=self.device)
        view = LayerView(valid, keys, self.scores, self.layer_idx, self.num_layers, self.state)
        keep = self.selection.select(view)
        if keep is None:
            return
        self.evicted = True
        if isinstance(self.store, RaggedBuffer):  # every kept token moves to the flattened store
            kept = [self.store.assign(*self._attention_inputs(), keep)]
            self.window = FullPrecisionBuffer(chunk=self.selection.block)  # holds one block until the next cut
        else:
            stored = len(self.store) if self.store is not None else 0
            kept = [self.store.compact(keep[..., :stored])] if stored else []
            window_index = self.window.compact(keep[..., stored:], in_place)  # (B, H, n) old slot of each
            if self.positions is not None:
                self.positions = self.positions.gather(-1, window_index)
            kept.append(window_index + stored)
        if self.scores is not None:
            index = torch.cat(kept, -1)  # (B, H, S') the old slot of each slot held now
            self.scores = torch.zeros(index.shape, device=self.device) if self.selection.reset_scores else self.scores.gather(-1, index)

    def _settle(self) -> None:
        """Move the oldest window tokens into the store, whole blocks at a time."""
        if self.representation is None:
            return
        ready = len(self.window) - self.representation.residual
        count = ready - ready % self.store.block
        if count > 0:
            extra = {}
            if self.positions is not None:
                extra["positions"], self.positions = self.positions[..., :count], self.positions[..., count:]
            self.store.append(*self.window.take_front(count), **extra)

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())

    @property
    def nbytes(self) -> int:
        held = self.window.nbytes + (self.store.nbytes if self.store is not None else 0)
        held += self.positions.numel() * self.positions.element_size() if self.positions is not None else 0
        return held + (self.scores.numel() * self.scores.element_size() if self.scores is not None else 0)

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
        self.__init__(self.selection, self.representation, self.layer_idx, self.num_layers)

    def map_batch(self, fn) -> None:
        for part in self._parts():
            part.map_batch(fn)
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.positions is not None:
            self.positions = fn(self.positions)

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
                layers.append(CompressedLayer(selection, representation, len(layers), len(types)))
            elif layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window))
            else:
                raise ValueError(f"kvcompress supports full and sliding attention layers, not {layer_type!r}")
        super().__init__(layers=layers)
        self.spec = spec
        self.query_heads = text_config.num_attention_heads
        self.needs_attention = selection is not None and selection.observe != 0
        self.representation = representation
        self._incoming_valid: torch.Tensor | None = None
        self.incoming_positions: torch.Tensor | None = None  # position_ids of this forward, set by the pre-hook
        self.own_attention = False  # this forward runs the kvcompress attention (set by the pre-hook)

    @contextlib.contextmanager
    def deferred(self):
        """Question-aware compression: tokens fed inside this block are compressed together with
        the next step (the question), so attention-based scores see the question's queries."""
        for layer in self.compressed_layers:
            layer.hold = True
        try:
            yield self
        finally:
            for layer in self.compressed_layers:
                layer.hold = False

    @property
    def compressed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return layer.update(
                key_states, value_states, new_valid=self._incoming_valid, new_positions=self.incoming_positions,
                latent=self.own_attention,
            )
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache holds: codes, scales, zero points, masks, windows."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    @property
    def fixed_nbytes(self) -> int:
        """Bytes held once per cache whatever its length (low-rank bases, rotary tables), not in ``nbytes``."""
        return self.representation.fixed_nbytes if self.representation is not None else 0

    @property
    def stored_tokens(self) -> int:
        """Slots held by the first compressed layer (tokens seen are ``get_seq_length()``)."""
        return len(self.compressed_layers[0])

    def observe_inputs(self, attention_mask: torch.Tensor | None, query_length: int, build_mask: bool = True):
        """Record which incoming tokens are padding; return a 4D mask when the cache must supply one.

        Args:
            attention_mask: the forward's ``(B, seen + q)`` padding mask, or None.
            query_length: ``q``, tokens in this forward.
            build_mask: False when the ``kvcompress`` attention builds each layer's mask itself.

        Returns:
            None (transformers' own mask is right), or a ``(B, Hq, q, stored + q)`` bool mask.
        """
        if attention_mask is not None and attention_mask.dim() == 2:
            incoming = attention_mask[:, -query_length:].bool()
            self._incoming_valid = None if bool(incoming.all()) else incoming
        else:
            self._incoming_valid = None
        layers = self.compressed_layers
        if not build_mask:
            return None
        stored_valid = layers[0].valid() if layers[0].is_initialized else None
        if stored_valid is None or not layers[0].evicted:
            return None  # every slot is real, or slots still map to sequence positions one to one
        if any(len(layer) != len(layers[0]) for layer in layers) or len(layers) != len(self.layers):
            raise NotImplementedError(
                "padded batches after eviction need all layers to hold the same tokens; "
                "run sequences one at a time for this model or method"
            )
        batch, heads, _ = stored_valid.shape
        incoming = self._incoming_valid
        if incoming is None:
            incoming = torch.ones(batch, query_length, dtype=torch.bool, device=stored_valid.device)
        valid = torch.cat([stored_valid, incoming[:, None, :].expand(batch, heads, query_length)], -1)
        return attention.allowed(valid, query_length).repeat_interleave(self.query_heads // heads, dim=1)



def _split_pipeline(spec: str, methods: list) -> tuple[Selection | None, Representation | None]:
    selections = [m for m in methods if isinstance(m, Selection)]
    representations = [m for m in methods if isinstance(m, Representation)]
    if len(selections) > 1 or len(representations) > 2:
        raise SpecError(
            f"{spec!r}: combine at most one eviction method with at most one storage method, or a transform "
            f"and a storage method (e.g. 'streaming:window=2048+kivi:bits=4', 'lowrank:ratio=0.5+kivi:bits=4')"
        )
    if len(methods) > 1 and any(r.standalone for r in representations):
        names = ", ".join(r.name for r in representations if r.standalone)
        raise SpecError(f"{spec!r}: {names} combines with no other method (its storage is shared between layers)")
    if len(representations) == 2:  # a transform (lowrank) whose output the second one stores (kivi)
        if representations[1].takes_inner:
            raise SpecError(f"{spec!r}: {representations[1].name} transforms tokens and cannot store another method's output")
        try:
            representations[0].chain(representations[1])
        except ValueError as err:
            raise SpecError(f"{spec!r}: {err}") from None
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
    cache.incoming_positions = kwargs.get("position_ids")  # None: the model numbers them from seen
    own_attention = module.config._attn_implementation == attention.NAME
    cache.own_attention = own_attention
    mask = cache.observe_inputs(kwargs.get("attention_mask"), inputs.shape[1], build_mask=not own_attention)
    if own_attention:
        kwargs["kvcompress_cache"] = cache  # that attention builds each layer's mask itself
    elif mask is not None:
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
        model: a transformers causal LM. Methods that score tokens by attention, or mix low-rank
            values in latent space, switch it to the ``kvcompress`` attention implementation (same
            results as ``sdpa``).

    Raises:
        SpecError: unknown method or parameter, or a bad value.
        kvcompress.calibration.CalibrationError: a method's calibration is missing or for another model.
    """
    cache = CompressedCache(method, model.config)
    if cache.representation is not None:
        cache.representation.prepare(model)  # e.g. lowrank loads (or builds) the model's calibration
    latent = cache.representation is not None and cache.representation.mixes_latent_values
    if (cache.needs_attention or latent) and model.config._attn_implementation != attention.NAME:
        model.set_attn_implementation(attention.NAME)
    if model not in _HOOKED_MODELS:
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        _HOOKED_MODELS.add(model)
    return cache
