"""Keys of a context's prefixes by a hash chain over pages of token ids, as vLLM and transformers' continuous
batching key their blocks: the key of the first ``n`` tokens hashes the chain value of their full pages with
the tokens after them, so after one pass over the context any prefix's key costs a page of hashing.

``kvcompress serve`` keeps each compressed context under the key of all its tokens; a new context looks up
the keys of its prefixes at the lengths of the contexts kept, longest first, and continues the longest one
found (a conversation's earlier turns) where the method allows it (:func:`kvcompress.compress`).
"""

from __future__ import annotations

import hashlib
from array import array

from kvcompress.pages import PAGE


class PrefixKeys:
    """The keys of every prefix of ``ids`` (token ids), under ``seed`` (what else the key depends on: the
    model, the method). ``keys(n)`` is the key of ``ids[:n]``; ``keys(len(ids))`` of the whole."""

    def __init__(self, seed: bytes, ids: list[int], page: int = PAGE):
        self.ids, self.page = list(ids), page
        self.chain = [hashlib.sha256(seed).digest()]  # chain[i]: the first i full pages
        for start in range(0, len(self.ids) - page + 1, page):
            self.chain.append(hashlib.sha256(self.chain[-1] + _packed(self.ids[start : start + page])).digest())

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, length: int) -> str:
        if not 0 <= length <= len(self.ids):
            raise ValueError(f"a prefix of {length} tokens of a context of {len(self.ids)}")
        full = length // self.page
        rest = _packed(self.ids[full * self.page : length])
        return hashlib.sha256(self.chain[full] + rest + length.to_bytes(8, "little")).hexdigest()[:32]


def _packed(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()
