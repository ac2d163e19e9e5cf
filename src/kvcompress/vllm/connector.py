"""``KVCompressConnector``: vLLM's KV connector (``KVConnectorBase_V1``, vLLM 0.32) that saves the blocks vLLM
computes for a prompt as KIVI-quantized pages (:mod:`kvcompress.vllm.codec`) in a store
(:mod:`kvcompress.vllm.store`), and loads them into vLLM's paged cache for any later prompt, in this process
or another, that starts with the same tokens.

The only module of kvcompress that imports vLLM. Enable it with::

    --kv-transfer-config '{"kv_connector": "KVCompressConnector", "kv_role": "kv_both",
      "kv_connector_module_path": "kvcompress.vllm.connector", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"store_path": "/var/kv", "bits": 4, "sink": 4, "max_bytes": "20GiB"}}'

``kv_connector_extra_config``: ``store_path`` (the folder; required unless a subclass's :meth:`make_store` says otherwise), ``bits`` (2, 4, 8, or 16 for
unquantized pages; default 4), ``group`` (channels per value group; default 64, must divide the head dim),
``sink`` (first tokens of a sequence kept exact; default 0), ``max_bytes`` (the folder's bound, a number
or ``"20GiB"``; default 0, no bound), ``model_identity`` (what keys the pages instead of a hash of the
model folder's weights, for a model vLLM loads from elsewhere than a local folder).

Scheduler side (vLLM's engine core): :meth:`get_num_new_matched_tokens` walks the prompt's hash chain
(:func:`kvcompress.vllm.store.block_keys`) from the first block vLLM has not computed, reading and checking
each page (:meth:`kvcompress.vllm.codec.PageCodec.read`) until one is missing or fails a check; the pages
that pass are a hit, never more than the prompt less its last token (vLLM must compute one token to
sample from). A page that fails a check is deleted, so the next save writes it again.
:meth:`update_state_after_alloc` notes which of vLLM's blocks the hit pages go to, and
:meth:`build_connector_meta` hands the worker this step's loads and the prompt blocks this step
completes (:class:`Save`): a block is saved once it is whole and computed, unless the store has it.

Worker side: :meth:`start_load_kv` decodes each page and writes its keys and values into every layer's
block before the forward; :meth:`save_kv_layer` quantizes, after each layer's attention, the blocks to
save, and :meth:`wait_for_save` writes one page per block (all layers) at the end of the step. A page that
fails its checks at load time (deleted or damaged since the scheduler read it) is reported through
:meth:`get_block_ids_with_load_errors`, with the blocks after it: vLLM recomputes them when
``kv_load_failure_policy`` is ``"recompute"``, and fails the request with ``"fail"`` (its default) --
neither gives a wrong answer.

Limits: vLLM's CPU attention backend (``CPU_ATTN``: a layer's cache ``(blocks, kv heads, block, 2 x head
dim)``, keys then values within a block and head) is the layout it reads and writes, and it refuses another
with that said; one worker (no tensor or pipeline parallelism); prompt tokens only (answers are not saved);
no multimodal prompts (their blocks are never hits); loads and saves are synchronous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from kvcompress.vllm.codec import Geometry, PageCodec, PageError
from kvcompress.vllm.store import FolderStore, Store, block_keys, folder_identity, root_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """``20GiB``, ``"500MB"``, ``1000000`` -> bytes; ValueError naming the forms otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"max_bytes must be a number of bytes or a size such as '20GiB' or '500MB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


@dataclass
class Load:
    """Put the page ``key`` into vLLM's block ``block_id`` (request ``req_id``'s)."""

    req_id: str
    block_id: int
    key: str


@dataclass
class Save:
    """Write vLLM's block ``block_id`` as the page ``key`` (``parent``'s child, holding ``tokens``; ``first``: a
    sequence's first block, where the codec keeps its sinks)."""

    block_id: int
    key: str
    parent: str
    tokens: list[int]
    first: bool


@dataclass
class KVCompressMetadata(KVConnectorMetadata):
    """One step's work for the worker, in the order the scheduler decided it."""

    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)


@dataclass
class _Tracked:
    """What the scheduler side keeps of a request while it runs."""

    prompt: list[int]
    keys: list[tuple[str, str, list[int]]]  # (key, parent, tokens) of each whole prompt block
    block_ids: list[int] = field(default_factory=list)
    saved: set[int] = field(default_factory=set)  # prompt blocks saved, planned or found in the store
    hit: tuple[int, int] | None = None  # (tokens vLLM computed, tokens the store holds after them) at the lookup


class KVCompressConnector(KVConnectorBase_V1):
    """kvcompress's compressed KV tier for vLLM (see the module docstring)."""

    OPTIONS = ("store_path", "bits", "group", "sink", "max_bytes", "model_identity")  # of kv_connector_extra_config

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"KVCompressConnector: unknown kv_connector_extra_config keys {unknown}; it takes {', '.join(self.OPTIONS)}")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError("KVCompressConnector runs on one worker: tensor_parallel_size and pipeline_parallel_size must be 1")
        model = vllm_config.model_config
        self.block = vllm_config.cache_config.block_size
        self.geometry = Geometry(model.get_num_layers(parallel), model.get_num_kv_heads(parallel), model.get_head_size(), self.block)
        self.codec = PageCodec(bits=int(extra.get("bits", 4)), group=int(extra.get("group", 64)), sink=int(extra.get("sink", 0)))
        self.codec.check(self.geometry)
        self.store = self.make_store(extra)
        if role == KVConnectorRole.SCHEDULER:
            identity = extra.get("model_identity") or _model_identity(model.model)
            self.root = root_key(identity, self.codec.name, self.geometry.as_dict())
            self._requests: dict[str, _Tracked] = {}
            self._loads: list[Load] = []
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                logger.warning('KVCompressConnector: with kv_load_failure_policy "%s" a page deleted or damaged between '
                               'lookup and load fails its request; "recompute" recomputes it',
                               self._kv_transfer_config.kv_load_failure_policy)
        else:
            self._caches: list[torch.Tensor] = []  # each layer's (blocks, H, T, 2D), in layer order
            self._layer_index: dict[str, int] = {}
            self._encoded: dict[int, list[dict[str, torch.Tensor]]] = {}  # layer -> a page's tensors per save
            self._load_errors: set[int] = set()
        logger.info("KVCompressConnector: %s pages of %s in %r", self.codec.name, self.geometry.as_dict(), self.store)

    def make_store(self, extra: dict[str, Any]) -> Store:
        """The store pages go to, from ``kv_connector_extra_config``: a :class:`FolderStore` at ``store_path``
        bounded by ``max_bytes``. Another backend (an object store, Redis) is a subclass that returns its own
        :class:`kvcompress.vllm.store.Store` here, named by ``kv_connector`` and ``kv_connector_module_path``.
        Both sides call it: the scheduler reads pages, the worker reads and writes them. A subclass that takes
        options of its own adds their names to :attr:`OPTIONS`."""
        if "store_path" not in extra:
            raise ValueError('KVCompressConnector needs kv_connector_extra_config {"store_path": "<folder>"}')
        return FolderStore(extra["store_path"], parse_bytes(extra.get("max_bytes", 0)))

    # ---------------------------------------------------------------- scheduler side

    def _tracked(self, request: Request) -> _Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            prompt = list(request.prompt_token_ids or [])
            tracked = self._requests[request.request_id] = _Tracked(prompt, block_keys(self.root, prompt, self.block))
        return tracked

    def _readable(self, key: str) -> bool:
        """Whether the page ``key`` is in the store and passes every check (a failing one is deleted)."""
        data = self.store.get(key)
        if data is None:
            return False
        try:
            self.codec.read(data, key, self.geometry)
        except PageError as err:
            logger.warning("KVCompressConnector: page %s is a miss and is deleted: %s", key[:12], err)
            self.store.discard(key)
            return False
        return True

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.mm_features or request.prompt_token_ids is None:
            return 0, False
        tracked = self._tracked(request)
        if tracked.hit is not None and tracked.hit[0] == num_computed_tokens:  # asked again: side-effect free
            return tracked.hit[1], False
        start = num_computed_tokens // self.block
        usable = (len(tracked.prompt) - 1) // self.block  # the last prompt token is always computed
        end = start
        while end < usable and self._readable(tracked.keys[end][0]):
            end += 1
        found = max(0, end * self.block - num_computed_tokens)
        tracked.hit = (num_computed_tokens, found)
        return found, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        if num_external_tokens == 0:
            return
        tracked = self._tracked(request)
        computed, found = tracked.hit
        block_ids = blocks.get_block_ids()[0]
        for i in range(computed // self.block, (computed + found) // self.block):
            self._loads.append(Load(request.request_id, block_ids[i], tracked.keys[i][0]))
            tracked.saved.add(i)  # it came from the store
        tracked.hit = None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVCompressMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan_saves(meta, tracked, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after a preemption: the request's whole block list
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            self._plan_saves(meta, tracked, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
        return meta

    def _plan_saves(self, meta: KVCompressMetadata, tracked: _Tracked, computed: int, scheduled: int) -> None:
        """Save the prompt blocks this step completes that the store does not hold yet."""
        done = min(computed + scheduled, len(tracked.keys) * self.block)
        for i in range(computed // self.block, done // self.block):
            if i in tracked.saved or i >= len(tracked.block_ids):
                continue
            tracked.saved.add(i)
            key, parent, tokens = tracked.keys[i]
            if not self.store.contains(key):
                meta.saves.append(Save(tracked.block_ids[i], key, parent, tokens, first=i == 0))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        g = self.geometry
        names = sorted(kv_caches, key=_layer_number)
        for name in names:
            shape = tuple(kv_caches[name].shape)
            if len(shape) != 4 or shape[1:] != (g.heads, g.block, 2 * g.head_dim):
                raise RuntimeError(
                    f"KVCompressConnector reads vLLM's CPU attention layout (blocks, {g.heads} kv heads, {g.block}, "
                    f"2 x {g.head_dim}); layer {name} holds {shape}: run vLLM on the CPU backend"
                )
        if len(names) != g.layers:
            raise RuntimeError(f"KVCompressConnector expected {g.layers} attention layers, vLLM registered {len(names)}")
        cache_dtype = self._vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise RuntimeError(f"KVCompressConnector reads caches in the model's dtype; vLLM's kv_cache_dtype is {cache_dtype!r}: leave it 'auto'")
        self._caches = [kv_caches[name] for name in names]
        self._layer_index = {name: i for i, name in enumerate(names)}
        self._key_at, self._value_at = _cpu_block_layout(g, self._caches[0].dtype)

    def _read_blocks(self, cache: torch.Tensor, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(n, H, T, D)`` of the blocks ``block_ids`` of one layer's cache (copies)."""
        g = self.geometry
        index = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
        flat = cache.index_select(0, index).flatten(1)  # (n, H * T * 2D): a block's memory
        shape = (len(block_ids), g.heads, g.block, g.head_dim)
        return flat[:, self._key_at].view(shape), flat[:, self._value_at].view(shape)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        failed: set[str] = set()
        for load in meta.loads:
            if load.req_id in failed:  # what follows a failed page is not a hit either
                self._load_errors.add(load.block_id)
                continue
            data = self.store.get(load.key)
            try:
                if data is None:
                    raise PageError("no longer in the store")
                page, _ = self.codec.read(data, load.key, self.geometry)
            except PageError as err:
                logger.warning("KVCompressConnector: page %s failed to load, vLLM recomputes from it: %s", load.key[:12], err)
                failed.add(load.req_id)
                self._load_errors.add(load.block_id)
                continue
            keys, values = self.codec.decode(page, self._caches[0].dtype)  # (L, H, T, D)
            for layer, cache in enumerate(self._caches):
                block = cache[load.block_id].view(-1)  # the block's memory, laid out as vLLM's kernel keeps it
                block[self._key_at] = keys[layer].flatten()
                block[self._value_at] = values[layer].flatten()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: start_load_kv wrote every layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.saves or layer_name not in self._layer_index:
            return
        keys, values = self._read_blocks(kv_layer, [s.block_id for s in meta.saves])  # (n, H, T, D)
        pages: list[dict[str, torch.Tensor] | None] = [None] * len(meta.saves)
        for first in (True, False):
            rows = [j for j, s in enumerate(meta.saves) if s.first == first]
            if rows:
                encoded = self.codec.encode(keys[rows], values[rows], first=first)
                for n, j in enumerate(rows):
                    pages[j] = {name: tensor[n] for name, tensor in encoded.items()}
        self._encoded[self._layer_index[layer_name]] = pages

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        encoded, self._encoded = self._encoded, {}
        if not meta.saves or not encoded:
            return
        if len(encoded) != self.geometry.layers:
            logger.warning("KVCompressConnector: %d of %d layers saved this step; its pages are not written", len(encoded),
                           self.geometry.layers)
            return
        for j, save in enumerate(meta.saves):
            page = {name: torch.stack([encoded[layer][j][name] for layer in range(self.geometry.layers)])
                    for name in encoded[0][j]}  # (L, H, ...)
            self.store.put(save.key, self.codec.write(page, save.key, save.parent, save.tokens, self.geometry))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors


def _cpu_block_layout(g: Geometry, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each key and value element of a block lies in the block's memory, as vLLM's CPU kernel writes it:
    ``(H * T * D,)`` positions of keys and of values, in ``(h, t, d)`` order, in a block's ``H * T * 2D`` elements.

    The layout inside a block depends on the kernel's instruction set (with AVX-512, keys are stored
    channel-major, ``(H, D, T)``, values ``(H, T, D)``), so it is read off vLLM's own op rather than assumed:
    one block is written with each of ``h + 1``, ``t + 1``, ``d + 1`` (small integers, exact in bf16) as keys,
    then as values, and each element's coordinates are read back from where they landed.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, g.block, g.head_dim, "auto")
    shape = (g.block, g.heads, g.head_dim)  # the op's (tokens, H, D)
    coordinates = torch.meshgrid(*(torch.arange(n) for n in (g.heads, g.block, g.head_dim)), indexing="ij")  # (H, T, D) each
    slots = torch.arange(g.block, dtype=torch.long)
    positions = []
    for part in (0, 1):  # keys, then values
        landed = []
        for coordinate in coordinates:
            block = torch.zeros(1, g.heads, g.block, 2 * g.head_dim, dtype=dtype)
            key_cache, value_cache = block.view(1, g.heads, 2 * g.block, g.head_dim).chunk(2, dim=2)
            written = (coordinate + 1).permute(1, 0, 2).to(dtype).contiguous()  # (T, H, D)
            zeros = torch.zeros(shape, dtype=dtype)
            ops.cpu_attn_reshape_and_cache(*((written, zeros) if part == 0 else (zeros, written)), key_cache, value_cache, slots, isa)
            landed.append(block.flatten().to(torch.long))
        where = landed[0].nonzero().flatten()  # the H * T * D positions this part occupies
        if where.numel() != g.heads * g.block * g.head_dim:
            raise RuntimeError(f"KVCompressConnector could not read vLLM's CPU block layout (isa {isa})")
        h, t, d = (c[where] - 1 for c in landed)
        at = torch.empty(g.heads * g.block * g.head_dim, dtype=torch.long)
        at[(h * g.block + t) * g.head_dim + d] = where
        positions.append(at)
    return positions[0], positions[1]


def _layer_number(name: str) -> tuple[int, str]:
    """Sort key of a layer name such as ``model.layers.12.self_attn.attn``: its number, then the name."""
    match = re.search(r"\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def _model_identity(model: str) -> str:
    """:func:`kvcompress.vllm.store.folder_identity` of the folder vLLM serves, or an error that names the fix."""
    if not Path(model).is_dir():
        raise ValueError(
            f"KVCompressConnector keys pages by the model folder's weights, and {model!r} is not a local folder: serve "
            'the model from a folder, or set kv_connector_extra_config {"model_identity": "<a name for these weights>"}'
        )
    return folder_identity(model)
