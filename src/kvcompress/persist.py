"""Saved caches: one safetensors file per compressed context, and the checks that make a file safe to
reload.

:func:`save_cache` (called by :meth:`kvcompress.cache.CompressedCache.save`) writes every tensor a cache
holds under ``layers.<i>.<name>`` (the names its layers' ``STATE`` lists, see :mod:`kvcompress.state`;
a paged layer saves its pages as one window, :class:`kvcompress.paged.PagedBuffer`), the method spec,
the model's identity and the tokenizer's fingerprint, and a sha256 checksum over all of it. The file is
written beside its path and renamed over it, so a reader never sees half a file.

:func:`load` (:func:`kvcompress.load_cache`) trusts nothing it reads: the format version, the checksum, the header's fields, the
model's identity and calibration, then every entry against what the spec builds for the model
(:func:`_check_restored`). Any failure is a :class:`CacheFileError` of one line that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvcompress.calibration import CalibrationError
from kvcompress.models import (
    identity_differences,
    model_identity,
    model_name,
    tokenizer_fingerprint,
)
from kvcompress.registry import SpecError
from kvcompress.state import Value, load_sliding_state, sliding_state

# This module knows the file, not the cache's classes: kvcompress.cache calls it (save_cache, load) with a
# cache, and hands `load` the function that builds an empty cache from a spec (make_cache).

CACHE_FORMAT = "kvcompress-cache/2"  # /2: a checksum in the header (/1 files are refused, naming the version)


class CacheFileError(ValueError):
    """A saved cache cannot be loaded: missing, damaged, not a kvcompress cache, or for another model."""


def _fixed_fingerprint(storage) -> str:
    """A hash of what a storage derived from the model (bases, head groups): a reloaded cache must get the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(storage.fixed_state().items() if storage is not None else []):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_replacing(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file at ``.{name}.tmp`` beside ``path`` and rename it over ``path`` (atomic),
    with the permissions of the file it replaces. On any exception, KeyboardInterrupt included (the CLI
    turns SIGTERM into one), the temporary file is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        if path.is_file():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of every header field but ``checksum`` and of every tensor's name, dtype, shape and bytes, in
    name order: :func:`load` refuses a file whose contents do not give the checksum it holds.

    One pass over the bytes, at sha256's speed: for a 4,096-token context of the default model saved
    uncompressed (``none``, 189 MB in float32) 0.22 s to save and again to load, and 0.05 s for the same
    context in ``kivi:bits=4`` (34 MB), measured on one busy CPU core; a whole ``load_cache`` of the 189 MB
    file, the checks of :func:`_check_restored` included, took 0.45 s.
    """
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_cache(cache, path: str | Path, tokenizer=None) -> Path:
    """Write the cache to a safetensors file (no pickle): every tensor it holds, the method spec,
    the model's identity, and, when known, the compressed context's token ids and the tokenizer's
    fingerprint, with a checksum of all of it (see :func:`checksum`). The file's size is about
    :attr:`kvcompress.cache.CompressedCache.nbytes`; reload it with :func:`kvcompress.load_cache`.

    The file is written beside ``path`` and renamed over it, so a reader never sees half a file; a
    file it replaces keeps its permissions, and an error or interrupt leaves ``path`` as it was.

    Raises:
        RuntimeError: a forward is using the cache (save between steps).
        CacheFileError: ``path`` exists and is not a regular file (a folder, a FIFO, a device).
    """
    if cache.attached_to is not None and any(l.scoring.held is not None for l in cache.compressed_layers):
        raise RuntimeError("the cache holds a question-aware step that is not compressed yet; save it after the question")
    tensors, scalars, seen_storage = {}, {}, set()
    for layer in cache.compressed_layers:
        layer.trim()  # a file holds the tokens, not the room reserved for more
    for i, layer in enumerate(cache.layers):
        entries = layer.state() if _compressed(layer) else sliding_state(layer)
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu").contiguous()
                if value.untyped_storage().data_ptr() in seen_storage:  # safetensors refuses shared storage
                    value = value.clone()
                seen_storage.add(value.untyped_storage().data_ptr())
                tensors[f"layers.{i}.{name}"] = value
            else:
                scalars[f"layers.{i}.{name}"] = value
    if cache.context is not None:
        tensors["context.ids"], tensors["context.mask"] = (t.to("cpu").contiguous() for t in cache.context)
    metadata = {
        "format": CACHE_FORMAT,
        "spec": cache.spec,
        "model": cache.model_name or "",
        "identity": json.dumps(cache.identity),
        "storage": _fixed_fingerprint(cache.storage),
        "tokenizer": json.dumps(tokenizer_fingerprint(tokenizer)) if tokenizer is not None else "",
        "dtype": str(next((l.dtype for l in cache.compressed_layers if l.is_initialized), "")),
        "seen": str(cache.get_seq_length()),
        "pages": str(cache.held_pages),
        "scalars": json.dumps(scalars),
    }
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():
        raise CacheFileError(f"{str(path)!r} exists and is not a regular file (a folder, a FIFO, a device); save to a new path")
    metadata["checksum"] = checksum(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_replacing(path, tensors, metadata)
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The header of a saved cache without loading its tensors: ``spec``, ``model`` (the name it was
    loaded under), ``seen`` (tokens), ... as strings.

    Raises:
        CacheFileError: the file is missing, damaged, or not a kvcompress cache.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"no saved cache at {str(path)!r}; make one with `kvcompress compress --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CacheFileError(f"{str(path)!r} is damaged or truncated ({err}); compress the context again") from None
    found = meta.get("format", "")
    if found != CACHE_FORMAT and found.startswith(CACHE_FORMAT.split("/")[0] + "/"):
        raise CacheFileError(
            f"{str(path)!r} is in cache format {found}, which this kvcompress does not read (it reads {CACHE_FORMAT}); "
            "compress the context again"
        )
    if found != CACHE_FORMAT:
        raise CacheFileError(f"{str(path)!r} is not a kvcompress cache ({CACHE_FORMAT}); make one with `kvcompress compress`")
    return meta


def context_tokens(path: str | Path) -> int | None:
    """Tokens of the context a saved cache holds, read from its file's index without loading a tensor (None:
    the file does not say, or cannot be read; :func:`load` tells why)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("context.ids").get_shape()[-1]) if "context.ids" in f.keys() else None
    except Exception:  # a damaged file: loading it reports the damage
        return None


def load(path: str | Path, model, tokenizer, build):
    """Reload a cache written by :func:`save_cache` for ``model`` (and ``tokenizer``, when both recorded and
    given, checked too), into the empty cache ``build(spec, model)`` returns (:func:`kvcompress.make_cache`).

    Nothing in the file is used before its checksum is verified (:func:`checksum`); then what it holds is
    checked against its spec and the model (:func:`_check_restored`).

    Raises:
        CacheFileError: the file is missing, truncated or damaged, not a kvcompress cache (or one of another
            format version), holds what its spec and the model do not imply, or was made for another model,
            tokenizer or calibration; the message names the fix.
    """
    path = Path(path)
    meta = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CacheFileError(f"{str(path)!r} is damaged or truncated ({err}); compress the context again") from None
    if meta.get("checksum") != checksum(tensors, meta):
        raise CacheFileError(f"{str(path)!r} is damaged: its contents do not match its checksum; compress the context again")
    try:
        identity, scalars, seen = json.loads(meta["identity"]), json.loads(meta["scalars"]), int(meta["seen"])
        dtype = _float_dtype(meta["dtype"]) if meta["dtype"] else model.dtype
        fingerprint = json.loads(meta["tokenizer"]) if meta["tokenizer"] else None
        if not isinstance(identity, dict) or not isinstance(scalars, dict):
            raise ValueError("identity and scalars must be JSON objects")
    except (KeyError, ValueError, TypeError) as err:
        raise CacheFileError(f"{str(path)!r} has a damaged header ({err!r}); compress the context again") from None
    differ = identity_differences(identity, model_identity(model))
    if differ:
        raise CacheFileError(
            f"{str(path)!r} was saved for another model than {model_name(model)} ({'; '.join(differ)}); load it with "
            "the model it was made with, or compress the context again"
        )
    if tokenizer is not None and fingerprint and fingerprint != tokenizer_fingerprint(tokenizer):
        raise CacheFileError(f"{str(path)!r} was saved with another tokenizer; load it with the model's own tokenizer")
    try:
        cache = build(meta["spec"], model)
    except (SpecError, CalibrationError) as err:
        raise CacheFileError(f"{str(path)!r}: its method spec {meta['spec']!r} cannot be built for this model ({err})") from None
    if meta["storage"] != _fixed_fingerprint(cache.storage):
        raise CacheFileError(
            f"{str(path)!r} was compressed with another calibration of this model than the one found now; "
            "compress the context again (or pass the calibration it used)"
        )
    try:
        _restore(cache, tensors, scalars, dtype, model.device)
        _check_restored(cache, tensors, scalars, dtype, seen)
    except Exception as err:  # whatever restoring mismatched entries raises (KeyError, RuntimeError, ...)
        detail = f"no entry {err.args[0]!r}" if isinstance(err, KeyError) else (str(err).splitlines() or [type(err).__name__])[0]
        raise CacheFileError(
            f"{str(path)!r} does not hold what its spec {cache.spec!r} stores for this model ({detail}); compress the context again"
        ) from None
    cache.model_name = meta.get("model") or model_name(model)
    return cache


def _float_dtype(name: str) -> torch.dtype:
    """The floating-point dtype a header names (``"torch.float16"``); ValueError for any other text."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype")
    return dtype


def _restore(cache, tensors: dict[str, torch.Tensor], scalars: dict[str, Value], dtype: torch.dtype, device) -> None:
    """Put a file's entries (``layers.<i>.<name>``, ``context.ids``/``context.mask``) into a cache :func:`kvcompress.make_cache` built."""
    for i, layer in enumerate(cache.layers):
        prefix = f"layers.{i}."
        entries = {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        entries.update({k[len(prefix) :]: v for k, v in scalars.items() if k.startswith(prefix)})
        if _compressed(layer):
            layer.load_state(entries, dtype, device)
        else:
            load_sliding_state(layer, entries)
    if "context.ids" in tensors:
        cache.context = (tensors["context.ids"].to(device), tensors["context.mask"].to(device))


def _check_restored(cache, tensors: dict[str, torch.Tensor], scalars: dict[str, Value], dtype: torch.dtype,
                    seen: int) -> None:
    """Raise ValueError unless a restored cache holds what its spec and model imply: exactly the entries its
    layers hold (no more: a ``kivi`` file read as ``none`` would drop its store), every float finite, every
    compressed layer at the header's ``seen`` tokens, each part's keys and values ``(B, H, n, D)`` with ``H``,
    ``D`` the model's KV heads and head dim, ``n`` its length and the header's dtype, and the context's
    ``(B, C)`` ids in the vocabulary. Costs one dequantization of the cache, a part at a time."""
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ValueError(f"{bad} holds NaN or infinite values")
    held = {f"layers.{i}.{name}" for i, layer in enumerate(cache.layers)
            for name in (layer.state() if _compressed(layer) else sliding_state(layer))}
    saved = {name for name in (*tensors, *scalars) if name.startswith("layers.")}
    if held != saved:
        raise ValueError(f"entries missing: {sorted(held - saved)[:3]}; entries no layer of it holds: {sorted(saved - held)[:3]}")
    heads, dim, rows = cache.identity["kv_heads"], cache.identity["head_dim"], set()
    for layer in cache.compressed_layers:
        if layer.seen != seen or len(layer) > seen:
            raise ValueError(f"layer {layer.layer_idx} holds {len(layer)} slots of {layer.seen} tokens seen, the header says {seen}")
        for part in layer._parts():
            keys, values = part.segment().dense()
            valid = part.valid()
            rows.add(keys.shape[0])
            if (keys.shape[1:] != (heads, len(part), dim) or values.shape[:3] != keys.shape[:3] or keys.dtype != dtype
                    or (valid is not None and valid.shape != keys.shape[:3])):
                raise ValueError(f"layer {layer.layer_idx} holds keys {tuple(keys.shape)} {keys.dtype}, values {tuple(values.shape)}, "
                                 f"not ({heads} heads, {len(part)} slots, head dim {dim}) in {dtype}")
        layer.trim()  # forget what the check worked out (a ragged store's joined validity): it holds what was saved
    if cache.context is not None:
        ids, mask = cache.context
        rows.add(ids.shape[0])
        if ids.dim() != 2 or mask.shape != ids.shape or bool(((ids < 0) | (ids >= cache.identity["vocab_size"])).any()):
            raise ValueError(f"context ids {tuple(ids.shape)} and mask {tuple(mask.shape)} are not (rows, tokens) ids of the vocabulary")
    if len(rows) > 1:
        raise ValueError(f"its parts hold different numbers of rows: {sorted(rows)}")


def _compressed(layer) -> bool:
    """A kvcompress layer (it lists its own entries), not one of transformers' sliding-window layers."""
    return hasattr(layer, "load_state")
