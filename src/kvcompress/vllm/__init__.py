"""kvcompress as vLLM's compressed KV tier: a KV connector that saves vLLM's blocks as KIVI-quantized pages
to a store and loads them back for any later prompt that starts with the same tokens.

- :mod:`kvcompress.vllm.codec`: a page (one vLLM block of every layer) in KIVI's codes, to and from bytes.
- :mod:`kvcompress.vllm.store`: the hash-chain keys, the :class:`Store` interface and :class:`FolderStore`.
- :mod:`kvcompress.vllm.connector`: the connector, ``KVCompressConnector``; the only module that imports
  vLLM (nothing here does, nor does ``import kvcompress``).
- :mod:`kvcompress.vllm.importer`: a ``kvcompress compress`` file into the store
  (``python -m kvcompress.vllm import``).
"""

from kvcompress.vllm.codec import Geometry, PageCodec, PageError
from kvcompress.vllm.store import FolderStore, Store, block_keys, chain_key, folder_identity, root_key

__all__ = [
    "FolderStore", "Geometry", "PageCodec", "PageError", "Store", "block_keys", "chain_key", "folder_identity", "model_folder",
    "root_key",
]


def model_folder(name: str | None = None) -> str:
    """The local folder for vLLM to serve: a built-in model's (``None``: the default model), converted from its
    GGUF once into the user cache, as :func:`kvcompress.load_model` does; any other ``name`` as it is."""
    from kvcompress.models import BUILTIN_MODELS, DEFAULT_MODEL, converted_folder

    name = name or DEFAULT_MODEL
    return str(converted_folder(name)) if name in BUILTIN_MODELS else name
