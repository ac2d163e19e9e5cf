"""Pages of vLLM's KV cache in KIVI's quantized form: one page is one vLLM block (``T`` tokens) of every
attention layer, its keys and values, with a header that says which tokens it holds and a checksum.

Quantization is :mod:`kvcompress.methods.kivi`'s (``quantize``, ``pack``, ``dequantize``; Liu et al., KIVI,
https://arxiv.org/abs/2402.02750): keys per channel, the min and max over the block's ``T`` tokens; values
per token, over groups of ``group`` channels; 2, 4 or 8 bits, bit-packed.

Departures from KIVI and from kvcompress's own ``kivi`` method:
- A key group is the whole vLLM block (``T`` tokens, 128 by default on CPU), not ``group`` tokens: a page
  is decoded on its own, and one scale and minimum per channel per 128 tokens cost 2 bytes a token per
  head (fp16) where 32-token groups cost 8. Values keep KIVI's per-token groups of ``group`` channels.
- No full-precision residual: vLLM recomputes every token after the last page it loads (at least the
  prompt's last token, and the partial last block), and holds those exactly in its own cache; pages are
  only ever whole blocks of the past.
- Sinks (``sink=m``): the first ``m`` tokens of a sequence (in its first block only) are also held exactly
  (their keys, and their values' error after quantization), and their keys are left out of their block's
  per-channel statistics, as in :class:`kvcompress.methods.kivi.KIVIStore`. With ``m = 0`` nothing is kept
  exact.
- ``bits=16``: no quantization, the keys and values in the cache's dtype (for checking the plumbing, and
  as the uncompressed point of the benchmark).

The bytes of a page are a safetensors file (no pickle). Its header records the format, the page's key,
its parent's key and its token ids (so a page copied or renamed under another key is refused: the key is
the hash of the parent and the tokens, :func:`kvcompress.vllm.store.chain_key`), the codec, the geometry
``(layers, kv heads, head dim, block tokens)`` and a sha256 checksum of all of it
(:func:`kvcompress.persist.checksum`, the saved-cache file's). :meth:`PageCodec.read` refuses any page
whose checksum, key, codec, geometry, shapes or values are not what was asked for, with a
:class:`PageError`; a caller turns that into a miss.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kvcompress.methods.kivi import dequantize, pack, quantize, unpack
from kvcompress.persist import checksum
from kvcompress.vllm.store import chain_key

PAGE_FORMAT = "kvcompress-page/1"


class PageError(ValueError):
    """A page cannot be used: damaged, truncated, for another key, codec or model geometry."""


@dataclass(frozen=True)
class Geometry:
    """What a page's tensors are shaped by: attention layers, KV heads, head dim and tokens per block."""

    layers: int
    heads: int
    head_dim: int
    block: int

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "heads": self.heads, "head_dim": self.head_dim, "block": self.block}


@dataclass(frozen=True)
class PageCodec:
    """KIVI codes for one vLLM block of every layer: ``bits`` 2, 4, 8 (16: unquantized), ``group`` channels per
    value group (must divide the head dim), ``sink`` first tokens of a sequence held exactly (at most a block).
    """

    bits: int = 4
    group: int = 64
    sink: int = 0

    def __post_init__(self):
        if self.bits not in (2, 4, 8, 16):
            raise ValueError(f"bits must be 2, 4, 8 or 16 (unquantized), got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be a positive number of channels, got {self.group!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"sink must be a number of tokens >= 0, got {self.sink!r}")

    @property
    def name(self) -> str:
        """The codec as it enters keys and headers: two codecs with the same name read each other's pages."""
        return f"kivi-page:bits={self.bits},group={self.group},sink={self.sink}"

    def check(self, geometry: Geometry) -> None:
        """Raise ValueError, naming the fix, unless this codec can hold pages of ``geometry``."""
        if self.bits != 16 and geometry.head_dim % self.group:
            raise ValueError(f"group={self.group} must divide the head dim {geometry.head_dim}; use group={geometry.head_dim}")
        if self.sink > geometry.block:
            raise ValueError(f"sink={self.sink} is more than a block ({geometry.block} tokens); use sink <= {geometry.block}")

    def encode(self, keys: torch.Tensor, values: torch.Tensor, first: bool) -> dict[str, torch.Tensor]:
        """The tensors of pages: ``keys``, ``values`` ``(..., H, T, D)`` (any leading dims: layers, blocks),
        quantized per block; ``first``: these are the first blocks of their sequences, so ``sink`` tokens of
        them are kept exact. Returns CPU tensors with the same leading dims (see :meth:`decode`)."""
        keys, values = keys.detach().cpu(), values.detach().cpu()
        if self.bits == 16:
            return {"keys": keys.contiguous(), "values": values.contiguous()}
        meta = torch.bfloat16 if keys.dtype == torch.bfloat16 else torch.float16
        m = min(self.sink, keys.shape[-2]) if first else 0
        stats = None
        if m:  # the sinks' keys out of their block's per-channel statistics
            stats = torch.ones(keys.shape[:-1] + (1,), dtype=torch.bool)
            stats[..., :m, :] = False
        key_codes, key_scale, key_min = quantize(keys.float(), self.bits, dim=-2, valid=stats)  # scale (..., H, 1, D)
        chans = values.float().unflatten(-1, (-1, self.group))  # (..., H, T, D/g, g)
        value_codes, value_scale, value_min = quantize(chans, self.bits, dim=-1)
        page = {
            "key_codes": pack(key_codes, self.bits),  # (..., H, T, D*bits/8)
            "key_scale": key_scale.to(meta),  # (..., H, 1, D)
            "key_min": key_min.to(meta),
            "value_codes": pack(value_codes.flatten(-2), self.bits),  # (..., H, T, D*bits/8)
            "value_scale": value_scale.squeeze(-1).to(meta),  # (..., H, T, D/g)
            "value_min": value_min.squeeze(-1).to(meta),
        }
        if m:  # exact sink keys, and what the stored codes miss of the sinks' values
            stored = self._values(page["value_codes"][..., :m, :], page["value_scale"][..., :m, :], page["value_min"][..., :m, :])
            page["sink_keys"] = keys[..., :m, :].contiguous()
            page["sink_error"] = (values[..., :m, :].float() - stored).to(keys.dtype)
        return {k: v.contiguous() for k, v in page.items()}

    def _values(self, codes, scale, minimum) -> torch.Tensor:
        chans = unpack(codes, self.bits).unflatten(-1, (-1, self.group))  # (..., T, D/g, g)
        return dequantize(chans, scale[..., None], minimum[..., None], torch.float32).flatten(-2)

    def decode(self, page: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(..., H, T, D)`` in ``dtype`` from what :meth:`encode` made."""
        if self.bits == 16:
            return page["keys"].to(dtype), page["values"].to(dtype)
        keys = dequantize(unpack(page["key_codes"], self.bits), page["key_scale"], page["key_min"], torch.float32)
        values = self._values(page["value_codes"], page["value_scale"], page["value_min"])
        if "sink_keys" in page:
            m = page["sink_keys"].shape[-2]
            keys[..., :m, :] = page["sink_keys"].float()
            values[..., :m, :] += page["sink_error"].float()
        return keys.to(dtype), values.to(dtype)

    def expected_shapes(self, geometry: Geometry, sinks: bool) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape in a page of ``geometry`` (``sinks``: a first block with sink tokens)."""
        lead = (geometry.layers, geometry.heads)
        t, d = geometry.block, geometry.head_dim
        if self.bits == 16:
            return {"keys": (*lead, t, d), "values": (*lead, t, d)}
        packed = d * self.bits // 8
        shapes = {
            "key_codes": (*lead, t, packed), "key_scale": (*lead, 1, d), "key_min": (*lead, 1, d),
            "value_codes": (*lead, t, packed), "value_scale": (*lead, t, d // self.group),
            "value_min": (*lead, t, d // self.group),
        }
        if sinks:
            m = min(self.sink, t)
            shapes.update(sink_keys=(*lead, m, d), sink_error=(*lead, m, d))
        return shapes

    def write(self, page: dict[str, torch.Tensor], key: str, parent: str, tokens: list[int], geometry: Geometry) -> bytes:
        """The bytes of one page (a safetensors file) holding ``page`` (one block: leading dims ``(L, H)``)."""
        metadata = {
            "format": PAGE_FORMAT,
            "key": key,
            "parent": parent,
            "tokens": json.dumps([int(t) for t in tokens]),
            "codec": self.name,
            "geometry": json.dumps(geometry.as_dict(), sort_keys=True),
        }
        metadata["checksum"] = checksum(page, metadata)
        return save_tensors(page, metadata=metadata)

    def read(self, data: bytes, key: str, geometry: Geometry) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The tensors and token ids of the page ``data`` if it is the page ``key`` of this codec and
        ``geometry``, intact.

        Raises:
            PageError: anything else (truncated, a flipped byte, another key, codec or geometry, shapes
                or dtypes that do not fit, a NaN); the message says which.
        """
        metadata = _metadata(data)
        if metadata.get("format") != PAGE_FORMAT:
            raise PageError(f"not a {PAGE_FORMAT} page (format {metadata.get('format')!r})")
        try:
            page = load_tensors(data)
        except Exception as err:  # safetensors raises several types for damaged bytes
            raise PageError(f"damaged page ({err})") from None
        if metadata.get("checksum") != checksum(page, metadata):
            raise PageError("damaged page: its contents do not match its checksum")
        try:
            tokens = json.loads(metadata["tokens"])
            recorded = json.loads(metadata["geometry"])
            parent = metadata["parent"]
        except (KeyError, ValueError) as err:
            raise PageError(f"damaged page header ({err!r})") from None
        if metadata.get("key") != key or chain_key(parent, tokens) != key:
            raise PageError(f"the page holds {metadata.get('key')!r}, not {key!r} (a foreign or renamed entry)")
        if metadata.get("codec") != self.name:
            raise PageError(f"the page was written by codec {metadata.get('codec')!r}, not {self.name!r}")
        if recorded != geometry.as_dict() or len(tokens) != geometry.block:
            raise PageError(f"the page is for geometry {recorded}, not {geometry.as_dict()}")
        expected = self.expected_shapes(geometry, sinks="sink_keys" in page)
        if {k: tuple(t.shape) for k, t in page.items()} != expected:
            raise PageError(f"the page holds {sorted(page)} shaped otherwise than {expected}")
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in page.values()):
            raise PageError("the page holds NaN or infinite values")
        return page, tokens


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (an 8-byte little-endian header length, then JSON)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > len(data) - 8:
            raise ValueError(f"header of {length} bytes in {len(data)}")
        header = json.loads(data[8 : 8 + length])
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not an object")
        return metadata
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise PageError(f"damaged or truncated page ({err})") from None
