"""A ``kvcompress compress`` file into the connector's store, so vLLM starts from a context compressed before.

vLLM's paged prefix holds every token of a prompt's prefix, so only a context that kept every token can
become pages: one saved with ``none`` or ``kivi:...`` (no eviction). Eviction methods (``snapkv``,
``streaming``, ...) are refused, and so are ``lowrank`` and the sharing methods (their tokens are not keys
and values of every layer and head). The context's keys and values are read back in full precision from the
file (KIVI's codes dequantized, its exact residual window as it is) and encoded again with the store's codec
in vLLM's blocks: a KIVI context's values re-quantize to the same codes when bits and channel groups match,
its keys (KIVI's key groups are 32 tokens, a page's a whole block) take a second rounding.

Pages are keyed by the file's context token ids (``context.ids``, the context as ``kvcompress compress``
tokenized it, chat template included) after the model folder's :func:`kvcompress.vllm.store.folder_identity`:
a vLLM prompt that starts with exactly those ids finds them. Whole blocks only; the tail is vLLM's to compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress.vllm.codec import Geometry, PageCodec
from kvcompress.vllm.store import FolderStore, block_keys, folder_identity, root_key


class ImportRefused(ValueError):
    """A saved context that cannot become vLLM pages; the message says why and what to do."""


@dataclass(frozen=True)
class Imported:
    """What :func:`import_context` did: pages written, pages the store already held, tokens left to vLLM."""

    written: int
    present: int
    tail: int


def import_context(path: str | Path, store: FolderStore, codec: PageCodec, block: int, model=None, tokenizer=None,
                   model_folder: str | Path | None = None) -> Imported:
    """Write the pages of the saved context ``path`` into ``store``, for vLLM serving ``model_folder`` (the
    folder ``model`` was loaded from, by default) with blocks of ``block`` tokens and this ``codec`` (the
    connector's ``bits``, ``group``, ``sink``).

    Raises:
        ImportRefused: the file's method evicts tokens or does not store plain keys and values, it holds
            several rows or padding, or the model was not loaded from a local folder.
        kvcompress.persist.CacheFileError: the file is damaged or for another model (:func:`kvcompress.load_cache`).
    """
    from kvcompress import load_cache, load_model
    from kvcompress.methods.kivi import KIVI
    from kvcompress.persist import read_header
    from kvcompress.registry import parse_spec

    spec = read_header(path)["spec"]
    pipeline = parse_spec(spec)
    if pipeline.selection is not None:
        raise ImportRefused(
            f"{str(path)!r} was compressed with {spec!r}, which evicts tokens: vLLM's paged prefix needs the keys and "
            "values of every token, so only a context that kept them all can be imported; compress it with 'kivi:bits=4' or 'none'"
        )
    if pipeline.representation is not None and not (isinstance(pipeline.representation, KIVI) and pipeline.inner is None):
        raise ImportRefused(
            f"{str(path)!r} was compressed with {spec!r}, which does not hold each token's keys and values per layer and "
            "head (low-rank coordinates or shared heads and layers); compress it with 'kivi:bits=4' or 'none'"
        )
    if model is None:
        model, tokenizer = load_model(device="cpu")
    folder = Path(model_folder or model.config._name_or_path)
    if not folder.is_dir():
        raise ImportRefused(f"the model was not loaded from a local folder ({str(folder)!r}); pass model_folder, the folder vLLM serves")
    cache = load_cache(path, model, tokenizer)
    if cache.context is None:
        raise ImportRefused(f"{str(path)!r} holds no context token ids; compress it again with `kvcompress compress`")
    ids, mask = cache.context
    if ids.shape[0] != 1 or not bool(mask.all()):
        raise ImportRefused(f"{str(path)!r} holds {ids.shape[0]} rows or padding; import a context of one row")
    layers = cache.compressed_layers
    config = model.config.get_text_config()
    if len(layers) != config.num_hidden_layers:
        raise ImportRefused(f"{str(path)!r}: {len(layers)} of {config.num_hidden_layers} layers hold compressed tokens")
    dense = [layer.dense_keys_values() for layer in layers]  # (1, H, S, D) each, every token in full precision
    heads, dim = dense[0][0].shape[1], dense[0][0].shape[3]
    geometry = Geometry(len(layers), heads, dim, block)
    codec.check(geometry)
    root = root_key(folder_identity(folder), codec.name, geometry.as_dict())
    written = present = 0
    chain = block_keys(root, ids[0].tolist(), block)
    for i, (key, parent, tokens) in enumerate(chain):
        if store.contains(key):
            present += 1
            continue
        span = slice(i * block, (i + 1) * block)
        keys = torch.stack([k[0, :, span] for k, _ in dense])  # (L, H, T, D)
        values = torch.stack([v[0, :, span] for _, v in dense])
        store.put(key, codec.write(codec.encode(keys, values, first=i == 0), key, parent, tokens, geometry))
        written += 1
    return Imported(written, present, ids.shape[1] - len(chain) * block)
