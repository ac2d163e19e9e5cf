"""transformers' own quantized KV cache as benchmark rows beside kvcompress's: ``peer:quanto:bits=4``.

transformers ships ``QuantizedCache`` (https://huggingface.co/docs/transformers/kv_cache), a KIVI-like
cache: the newest ``residual`` tokens in full precision, every older one quantized in groups of
``group`` by a backend package, ``optimum-quanto`` (``quanto``: 2 or 4 bits) or ``hqq`` (1, 2, 3, 4
or 8 bits). A row is measured exactly as a kvcompress row: the context prefilled into the cache,
decode and perplexity scored by plain forwards at true positions, retrieval with the question read
after the cached context. Bytes are those of every tensor the cache holds: the backend's packed
codes, scales and zero points (read from the quantized tensors' own parts) and the full-precision
residual.

Departures from KIVI worth knowing when reading the rows: transformers re-quantizes the whole cache
(dequantized, concatenated with the residual) every ``residual`` tokens, and dequantizes all of it
for every step, so its decode holds a full-precision copy of the context while it runs.

Spec: ``peer:<backend>[:key=value,...]`` with ``bits`` (default 4), ``group`` (64) and ``residual``
(128), transformers' defaults. The backends are optional: a row whose backend is not installed, or
does not import, is refused with the pip command, before any model loads.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from importlib import metadata

import torch

PREFIX = "peer:"
BACKENDS = {  # backend -> (module to import, distribution, bits it takes)
    "quanto": ("optimum.quanto", "optimum-quanto", (2, 4)),
    "hqq": ("hqq", "hqq", (1, 2, 3, 4, 8)),
}
DEFAULTS = {"bits": 4, "group": 64, "residual": 128}


class PeerUnavailable(RuntimeError):
    """A ``peer:`` row cannot run here: a bad spec, or its backend is not installed or does not import."""


def parse_peer_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``peer:quanto:bits=2,group=32`` -> ``("quanto", {"bits": 2, "group": 32, "residual": 128})``.

    Raises:
        PeerUnavailable: an unknown backend, parameter or value.
    """
    backend, _, params = spec[len(PREFIX) :].partition(":")
    if backend not in BACKENDS:
        raise PeerUnavailable(f"{spec!r}: unknown peer backend {backend!r}; peers: {', '.join(f'peer:{b}:bits=4' for b in BACKENDS)}")
    values = dict(DEFAULTS)
    for item in (p.strip() for p in params.split(",") if p.strip()):
        key, eq, raw = item.partition("=")
        if not eq or key.strip() not in DEFAULTS or not raw.strip().isdigit():
            raise PeerUnavailable(f"{spec!r}: parameters are {', '.join(f'{k}=<int>' for k in DEFAULTS)}, not {item!r}")
        values[key.strip()] = int(raw)
    bits = BACKENDS[backend][2]
    if values["bits"] not in bits:
        raise PeerUnavailable(f"{spec!r}: {backend} takes bits {', '.join(map(str, bits))}, not {values['bits']}")
    if values["group"] < 1 or values["residual"] < 1:
        raise PeerUnavailable(f"{spec!r}: group and residual must be at least 1")
    return backend, values


def check_backend(backend: str) -> str:
    """Import the backend's package; return its version.

    Raises:
        PeerUnavailable: not installed, or it fails to import (the error says why).
    """
    module, dist, _ = BACKENDS[backend]
    try:
        importlib.import_module(module)
        return metadata.version(dist)
    except ImportError as err:  # PackageNotFoundError is an ImportError too
        raise PeerUnavailable(
            f"peer:{backend} rows need the package {dist}, which does not import here ({err}): pip install {dist}"
        ) from None


def resolve_peer(spec: str, parts: tuple[str, ...]) -> PeerCacheMethod:
    """A ``peer:`` spec as a row measuring ``parts``, its backend checked.

    Raises:
        PeerUnavailable: see :func:`parse_peer_spec` and :func:`check_backend`.
    """
    backend, values = parse_peer_spec(spec)
    return PeerCacheMethod(spec, backend, values["bits"], values["group"], values["residual"], parts, check_backend(backend))


def tensor_nbytes(held) -> int:
    """Bytes of every tensor in ``held``: a tensor (a quantized tensor subclass by its inner tensors,
    e.g. quanto's codes, scales and shifts), or a dict, list or tuple of them (hqq's codes and meta)."""
    if isinstance(held, torch.Tensor):
        if hasattr(held, "__tensor_flatten__") and type(held) is not torch.Tensor and not isinstance(held, torch.nn.Parameter):
            names, _ = held.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(held, name)) for name in names)
        return held.numel() * held.element_size()
    if isinstance(held, dict):
        return sum(tensor_nbytes(v) for v in held.values())
    if isinstance(held, (list, tuple)):
        return sum(tensor_nbytes(v) for v in held)
    return 0


@dataclass(frozen=True)
class PeerCacheMethod:
    """transformers' ``QuantizedCache`` with a backend, as a benchmark row."""

    spec: str
    backend: str
    bits: int
    group: int
    residual: int
    parts: tuple[str, ...]
    version: str
    source: str = "peer"

    def versions(self) -> dict[str, str]:
        """The backend's version, part of the rows' fingerprint."""
        return {BACKENDS[self.backend][1]: self.version}

    def new_cache(self, model):
        from transformers import QuantizedCache

        return QuantizedCache(self.backend, model.config, nbits=self.bits, q_group_size=self.group, residual_length=self.residual)

    def session(self, model, cache) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def compressing(self, model) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def nbytes(self, cache) -> int:
        return sum(
            tensor_nbytes((layer._quantized_keys, layer._quantized_values, layer.keys, layer.values))
            if hasattr(layer, "_quantized_keys")
            else tensor_nbytes((layer.keys, layer.values))
            for layer in cache.layers
        )

    @torch.no_grad()
    def answer(self, model, tokenizer, context: str, question: str, max_new_tokens: int, prefill_chunk: int | None = None) -> str:
        """The context prefilled into the cache (quantized as it goes), then the question and answer
        by ``model.generate`` continuing that cache: the question is read after the cached context."""
        from kvcompress.bench.feed import fill_context
        from kvcompress.generation import split_prompt
        from kvcompress.models import cache_kwarg

        before, after = split_prompt(tokenizer, context, question)
        ctx = tokenizer(before, return_tensors="pt")["input_ids"].to(model.device)  # (1, C)
        asked = tokenizer(after, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)  # (1, q)
        cache = self.new_cache(model)
        fill_context(self, model, ctx, cache, prefill_chunk)
        ids = torch.cat([ctx, asked], 1)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **{cache_kwarg(model): cache},
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
