"""Where pages live, and the keys they live under. Pure Python bookkeeping: no tensors, no vLLM.

Keys are a hash chain over whole blocks, as vLLM's own prefix cache keys its blocks: the key of block ``i``
of a sequence is ``sha256(key of block i-1, token ids of block i)``, and the chain starts at a root that
hashes what must match for a page to be reused (:func:`root_key`: the model's weights, the codec, the
geometry). So a key names a block *and its whole prefix*: two prompts share the pages of the blocks they
share from the start, and a page is never read for the same tokens after another prefix.

A store holds opaque bytes under keys (:class:`Store`). :class:`FolderStore` keeps one file per page in a
folder, bounded in bytes, least recently used out first; another backend (an object store, Redis) is a
class with the same four methods, handed to the connector (see the README, "vLLM connector").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"[0-9a-f]{64}")


def chain_key(parent: str, tokens: list[int]) -> str:
    """The key of a block of ``tokens`` after the block (or root) keyed ``parent``: 64 hex digits."""
    digest = hashlib.sha256(bytes.fromhex(parent))
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return digest.hexdigest()


def root_key(model: str, codec: str, geometry: dict[str, int]) -> str:
    """Where every chain of one model, codec and geometry starts (``model``: :func:`folder_identity`)."""
    text = json.dumps({"model": model, "codec": codec, "geometry": geometry}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def block_keys(root: str, token_ids: list[int], block: int, blocks: int | None = None) -> list[tuple[str, str, list[int]]]:
    """``(key, parent, tokens)`` of the first ``blocks`` whole blocks of ``token_ids`` (all of them by default)."""
    full = len(token_ids) // block if blocks is None else min(blocks, len(token_ids) // block)
    out, parent = [], root
    for i in range(full):
        tokens = [int(t) for t in token_ids[i * block : (i + 1) * block]]
        key = chain_key(parent, tokens)
        out.append((key, parent, tokens))
        parent = key
    return out


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def folder_identity(folder: str | Path) -> str:
    """A hash of a model folder's weights (every byte of its weight files) and ``config.json``: the
    identity pages are keyed by, the same for vLLM serving the folder and for kvcompress importing into it.

    Costs a pass over the weights at sha256's speed (0.5 GB, the default model in float32: about 1 s), so
    it is kept beside the weights in ``.kvcompress-identity.json``, recomputed when a file's size or time
    changes (a folder that cannot be written is hashed each time).
    """
    folder = Path(folder)
    files = sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern)}) + [folder / "config.json"]
    files = [f for f in files if f.is_file()]
    if not any(f.name != "config.json" for f in files):
        raise ValueError(f"{str(folder)!r} holds no weight files ({', '.join(_WEIGHT_FILES)}); pass the model's folder")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    record = folder / ".kvcompress-identity.json"
    try:
        held = json.loads(record.read_text())
        if held["files"] == stamp:
            return held["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    identity = digest.hexdigest()[:32]
    try:
        _write_atomic(record, json.dumps({"files": stamp, "identity": identity}).encode())
    except OSError:
        pass
    return identity


class Store(Protocol):
    """Bytes under keys (64 hex digits). A backend may drop any entry at any time (a later ``get`` misses);
    ``get`` returns what ``put`` was given or None, and counts as a use for the backend's eviction order.
    The reader (:meth:`kvcompress.vllm.codec.PageCodec.read`) checks every page it gets, so a backend need not."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def contains(self, key: str) -> bool: ...

    def discard(self, key: str) -> None: ...


class FolderStore:
    """Pages as files ``<folder>/<key[:2]>/<key>.page``, at most ``max_bytes`` of them (0: no bound).

    Writes go to a temporary file beside the page and are renamed over it, so a reader (another process
    included) sees a whole page or none. Use is a file's modification time (``get`` sets it): when a
    ``put`` takes the folder past ``max_bytes``, the least recently used pages are deleted until it holds
    at most 90 % of it (so the folder is not listed at every write). The bound is kept by each writing
    process from its own count, refreshed whenever it lists the folder: processes writing at once may
    overshoot by what the others wrote since.
    """

    TMP_AGE = 600  # seconds after which a temporary file is a crashed writer's, and deleted

    def __init__(self, folder: str | Path, max_bytes: int = 0):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0: no bound), got {max_bytes}")
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._held = self._scan()[0]  # bytes this process believes the folder holds

    def __repr__(self) -> str:
        return f"FolderStore({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"a store key is 64 lowercase hex digits, got {key!r}")
        return self.folder / key[:2] / f"{key}.page"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:
            return None
        return data

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def discard(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing it); a page larger than ``max_bytes`` is not stored."""
        if self.max_bytes and len(data) > self.max_bytes:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, data)
        self._held += len(data)
        if self.max_bytes and self._held > self.max_bytes:
            self._evict()

    @property
    def nbytes(self) -> int:
        """Bytes of the pages in the folder now (lists it)."""
        return self._scan()[0]

    def _scan(self) -> tuple[int, list[tuple[int, int, Path]]]:
        """``(total bytes, [(mtime_ns, size, path)] of every page)``; deletes stale temporary files."""
        entries, total, now = [], 0, time.time()
        for sub in os.scandir(self.folder):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # another process deleted it meanwhile
                    continue
                if entry.name.endswith(".tmp"):
                    if now - st.st_mtime > self.TMP_AGE:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                if entry.name.endswith(".page"):
                    entries.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
                    total += st.st_size
        return total, entries

    def _evict(self) -> None:
        total, entries = self._scan()
        target = self.max_bytes * 9 // 10
        for _, size, path in sorted(entries):  # least recently used first
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._held = total


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file beside it, renamed over it; nothing left on error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
