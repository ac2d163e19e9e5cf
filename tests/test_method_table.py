"""The shared table: every method passes the same assertions on the real default model.

A new method adds one row to ``TABLE``: a spec with compression off, a spec that compresses, and the
exact bytes its cache must hold after ``tokens`` tokens (batch 1, fp32).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.buffer import CHUNK
from kvcompress.generation import prefill
from kvcompress.methods.budgets import pyramid_budgets
from kvcompress.models import cache_kwarg
from kvcompress.pages import PAGE

LAYERS, KV_HEADS, HEAD_DIM, FP32 = 30, 3, 64, 4
FP_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * FP32  # K and V, every layer: 46,080 B
# A page of one layer: PAGE tokens' K and V, and the kernel's page table (a key and a value address per head).
PAGE_BYTES = PAGE * FP_TOKEN // LAYERS + 2 * 8 * KV_HEADS


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def none_bytes(tokens):
    return LAYERS * _pages(tokens) * PAGE_BYTES  # every token in 32-token pages, the last one partly empty


def _pages(slots):
    return -(-slots // PAGE)


def evicting_window(prompt, tokens, budget, block, slack):
    """``(slots, holes, since, moved)`` of a layer whose tokens are all in pages (kvcompress.paged), after
    ``tokens``: cut back to ``budget`` tokens after the prompt (compacted into exact pages) and whenever
    more than ``budget + slack`` have collected, ``since`` tokens ago. A decode step's cut masks the
    evicted slots (``holes``: a bool mask over the pages is held) and frees the pages with no kept slot
    (none at these lengths: fewer tokens are evicted than a page holds), and compacts once masked
    slots add up to two pages. ``moved``: the last token's cut compacted the layer."""
    slots = count = prompt
    holes, since, moved = False, 0, False
    if count > budget:  # the prompt is cut straight to the budget
        slots = count = budget
        moved = True
    for _ in range(tokens - prompt):
        slots, count, since, moved = slots + 1, count + 1, since + 1, False
        if count > budget + slack:
            count, since = budget, 0
            if slots - budget >= 2 * PAGE:
                slots, holes, moved = budget, False, True
            else:
                holes = True
    return slots, holes, since, moved


def streaming_bytes(sink, window, prompt=120):
    def formula(tokens):
        slots, holes, _, _ = evicting_window(prompt, tokens, sink + window, 1, 0)
        return LAYERS * _pages(slots) * (PAGE_BYTES + (KV_HEADS * PAGE if holes else 0))

    return formula


def kivi_bytes(bits, group, residual, prompt=120, sink=0):
    def formula(tokens):
        settled = max(0, (tokens - residual) // group * group)
        window = tokens - settled
        # The window holds no spare capacity after the prompt, nor right after its oldest group settled;
        # in between, a decode step that found it full grew it to what it holds before the next settling.
        capacity = window if tokens == prompt or window == residual else residual + group
        full_precision = FP_TOKEN * capacity
        per_layer_head = (
            2 * settled * HEAD_DIM * bits // 8  # packed key and value codes
            + 2 * (settled // group) * HEAD_DIM * 2  # key scale and min: fp16 per channel per group
            + 2 * settled * (HEAD_DIM // group) * 2  # value scale and min: fp16 per token per group
            + (2 * sink * HEAD_DIM * FP32 if settled else 0)  # the sinks' exact keys and value errors
            + 16 * (settled // group)  # the page table: a page holds one key group; its key and value blocks' addresses per head
        )
        return full_precision + LAYERS * KV_HEADS * per_layer_head

    return formula


def scored_bytes(ratio, block, scores, budgets=None, prompt=120, queries=False):
    """Bytes of a score-based eviction cache: its window (:func:`evicting_window`) with capacity
    reserved a chunk at a time; methods that score by attention hold a float32 score per slot, in room
    for a chunk of slots at a time (the slots exactly right after a cut that moved them),
    methods that score with queries hold the fp32 queries (9 heads) and int64 positions of the tokens
    seen since the last compression, and every layer holds its int64 budget per head."""

    def formula(tokens):
        total = 0
        for budget in budgets or [math.ceil(prompt * (1 - ratio))] * LAYERS:
            slots, holes, since, moved = evicting_window(prompt, tokens, budget, block, block - 1)
            observed = slots if moved else _round_up(slots, CHUNK)
            total += _pages(slots) * PAGE_BYTES + (4 * KV_HEADS * observed if scores else 0) + 8 * KV_HEADS
            total += KV_HEADS * PAGE * _pages(slots) if holes else 0
            total += (9 * HEAD_DIM * FP32 + 8) * since if queries else 0
        return total

    return formula


def lowrank_bytes(rank, residual, sink=4, bits=None, group=None, prompt=120):
    """``lowrank`` with one joint basis per layer (``E = 192``) and key rank = value rank = ``rank``:
    a full-precision window plus its int32 positions; stored latents (full precision, 64 tokens
    reserved at a time, or KIVI-quantized in blocks of ``group``), their int32 positions (64 reserved at a
    time), and
    full-precision copies of the first ``sink`` tokens, and the int64 basis group of each head. The
    window's capacity as in :func:`kivi_bytes`."""

    def formula(tokens):
        ready = max(0, tokens - residual)
        stored = ready - ready % (group or 1)
        window = tokens - stored
        capacity = window if tokens == prompt or window == residual else residual + (group or 1)
        if bits is None:
            latents = _round_up(stored, CHUNK) * 2 * rank * FP32
        else:
            latents = 2 * stored * rank * bits // 8 + 2 * (stored // group) * rank * 2 + 2 * stored * (rank // group) * 2
            latents += 16 * (stored // group)  # KIVI's page table: two 8-byte addresses per page (a group) of the one latent head
        sinks = (2 * KV_HEADS * sink * HEAD_DIM * FP32 + KV_HEADS * sink * 8) if stored else 0  # + int64 slots
        per_layer = latents + KV_HEADS * _round_up(stored, CHUNK) * 4 + sinks + KV_HEADS * 8  # positions: 64 slots of room at a time
        return FP_TOKEN * capacity + LAYERS * (KV_HEADS * window * 4 + per_layer)

    return formula


def share_heads_bytes(groups, residual):
    def formula(tokens):
        stored = max(0, tokens - residual)  # merged heads, in pages of 32 tokens of the `groups` merged heads
        grouping = KV_HEADS * 8 + groups * KV_HEADS * FP32  # int64 group of each head, fp32 (G, H) membership
        pages = _pages(stored) * groups * (PAGE * 2 * HEAD_DIM * FP32 + 16)  # and two 8-byte addresses per page and head
        return FP_TOKEN * (tokens - stored) + LAYERS * (pages + grouping)

    return formula


def share_layers_bytes(residual, pairs=7, unpaired=16):
    """``share_layers:start=0.5,threshold=-1``: of 30 layers, 15..28 form 7 pairs that store one fp32
    direction per token for K and for V plus each layer's norm (2 + 2 values) and a bool retained flag
    (none is retained at threshold -1); the other 16 layers store their settled tokens as they are,
    in pages with their page tables; every layer keeps the ``residual`` newest in full precision."""

    def formula(tokens):
        settled = max(0, tokens - residual)
        capacity = _round_up(settled, CHUNK)
        per_pair = KV_HEADS * (capacity * (2 * HEAD_DIM + 4) * FP32 + settled)
        per_unpaired = _pages(settled) * PAGE_BYTES
        return FP_TOKEN * (tokens - settled) + pairs * per_pair + unpaired * per_unpaired

    return formula


@dataclass
class Row:
    name: str
    off: str  # compression configured but inactive at the test lengths: must equal the baseline
    on: str  # compresses at the test lengths
    nbytes: Callable[[int], int] | None  # exact bytes held by `on` after that many tokens (None: own test)
    # Quantization groups are formed over a layer's slots, shared by the whole batch, so a padded
    # row's groups do not start where they start when it runs alone: its low-bit codes differ.
    padding_exact: bool = True


TABLE = [
    Row("none", off="none", on="none", nbytes=none_bytes),
    Row("streaming", off="streaming:window=100000", on="streaming:sink=4,window=48", nbytes=streaming_bytes(4, 48)),
    Row("kivi-2", off="kivi:bits=2,residual=100000", on="kivi:bits=2,group=32,residual=32", nbytes=kivi_bytes(2, 32, 32), padding_exact=False),
    Row("kivi-4", off="kivi:bits=4,residual=100000", on="kivi:bits=4,group=32,residual=32", nbytes=kivi_bytes(4, 32, 32), padding_exact=False),
    Row("kivi-8", off="kivi:bits=8,residual=100000", on="kivi:bits=8,group=16,residual=16", nbytes=kivi_bytes(8, 16, 16), padding_exact=False),
    Row(
        "kivi-4-sink",
        off="kivi:bits=4,residual=100000,sink=4",
        on="kivi:bits=4,group=32,residual=32,sink=4",
        nbytes=kivi_bytes(4, 32, 32, sink=4),
        padding_exact=False,
    ),
    Row(
        "streaming+kivi",
        off="streaming:window=100000+kivi:bits=4,residual=100000",
        on="streaming:sink=4,window=64+kivi:bits=4,group=32,residual=32",
        nbytes=None,  # depends on which blocks still hold a kept token: test_nbytes_of_streaming_with_kivi
        padding_exact=False,
    ),
    Row("snapkv", off="snapkv:ratio=0", on="snapkv:ratio=0.5,window=16", nbytes=scored_bytes(0.5, 32, True)),
    Row("h2o", off="h2o:ratio=0", on="h2o:ratio=0.5", nbytes=scored_bytes(0.5, 1, True)),
    Row("tova", off="tova:ratio=0", on="tova:ratio=0.5", nbytes=scored_bytes(0.5, 1, True)),
    Row("knorm", off="knorm:ratio=0", on="knorm:ratio=0.5,window=16", nbytes=scored_bytes(0.5, 32, False)),
    Row("keydiff", off="keydiff:ratio=0", on="keydiff:ratio=0.5,window=16", nbytes=scored_bytes(0.5, 32, False)),
    Row(
        "expected_attention",
        off="expected_attention:ratio=0",
        on="expected_attention:ratio=0.5,window=16",
        nbytes=scored_bytes(0.5, 32, False, queries=True),
    ),
    # Its replay runs in kvcompress.prefill (the padded-batch row); a plain forward scores by the window.
    # Heads hold what one ranking over the model gives them (allocation=global, ragged): the budgets and
    # freed bytes are test_kvzip's test_replay_keeps_a_planted_fact_that_the_window_scores_lose.
    Row("kvzip", off="kvzip:ratio=0", on="kvzip:ratio=0.5,window=16", nbytes=None),
    Row(
        "pyramidkv",
        off="pyramidkv:ratio=0",
        on="pyramidkv:ratio=0.5,window=16",
        nbytes=scored_bytes(0.5, 32, True, budgets=[max(b, 16) for b in pyramid_budgets(60, LAYERS, 20)]),
    ),
    Row(
        "adakv",
        off="adakv:ratio=0",
        on="adakv:ratio=0.5,window=16",
        nbytes=None,  # heads hold what their scores earn: test_adakv_keeps_the_reference_allocation_and_frees_the_rest
    ),
    Row(
        "retrieval",
        off="snapkv:ratio=0,allocation=retrieval",
        on="snapkv:ratio=0.5,window=16,allocation=retrieval",
        nbytes=None,  # retrieval heads keep more: test_retrieval_heads_keep_more_and_the_rest_is_freed
    ),
    Row(
        "adakv+kivi",
        off="adakv:ratio=0+kivi:bits=4,residual=100000",
        # 8-bit: at 4 bits the shifted quantization groups of the padded row alone flip its second word
        on="adakv:ratio=0.5,window=16+kivi:bits=8,group=16,residual=16",
        nbytes=None,  # blocks live while any head keeps a token: covered by the exactness of each part
        padding_exact=False,
    ),
    Row(
        "retrieval+kivi-sink",
        off="snapkv:ratio=0,allocation=retrieval+kivi:bits=4,residual=100000,sink=4",
        on="snapkv:ratio=0.5,window=16,allocation=retrieval+kivi:bits=8,group=16,residual=16,sink=4",
        nbytes=None,  # ragged heads, each with its own sinks: covered by the exactness of each part
        padding_exact=False,
    ),
    Row(
        "snapkv+kivi",
        off="snapkv:ratio=0+kivi:bits=4,residual=100000",
        on="snapkv:ratio=0.5,window=16+kivi:bits=4,group=16,residual=16",
        nbytes=None,  # blocks live while any head keeps a token: covered by the exactness of each part
        padding_exact=False,
    ),
    Row("lowrank", off="lowrank:ratio=0", on="lowrank:ratio=0.5,residual=32", nbytes=lowrank_bytes(96, 32)),
    Row(
        "lowrank+kivi",
        off="lowrank:ratio=0+kivi:bits=4,residual=100000",
        on="lowrank:ratio=0.5,residual=32+kivi:bits=4,group=32,residual=32",
        nbytes=lowrank_bytes(96, 32, bits=4, group=32),
        padding_exact=False,
    ),
    Row("share_heads", off="share_heads:groups=3", on="share_heads:groups=2,residual=32", nbytes=share_heads_bytes(2, 32)),
    Row("share_layers", off="share_layers:threshold=1", on="share_layers:threshold=-1,residual=32", nbytes=share_layers_bytes(32)),
    # residual=0: after eviction a batch's window length is its longest row's, so with a residual a
    # padded row would keep a different number of its tokens in full precision than alone.
    Row(
        "snapkv+lowrank",
        off="snapkv:ratio=0+lowrank:ratio=0",
        on="snapkv:ratio=0.5,window=16+lowrank:ratio=0.5,residual=0",
        nbytes=None,  # each part's bytes are exact (test_lowrank); which tokens live depends on scores
    ),
]
IDS = [row.name for row in TABLE]

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prompt(smol):
    _, tokenizer = smol
    text = "The history of the city begins with a small harbour and a market. " * 12
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :120]


def _decode_logits(model, cache, prompt, steps):
    """Prefill ``prompt`` then greedily decode ``steps`` tokens one at a time; all logits."""
    kwarg = {cache_kwarg(model): cache}
    attached = kvcompress.attach(model, cache) if isinstance(cache, kvcompress.CompressedCache) else contextlib.nullcontext()
    with torch.no_grad(), attached:
        out = model(prompt, use_cache=True, **kwarg)
        logits = [out.logits[:, -1]]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, use_cache=True, **kwarg)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    return out, torch.stack(logits, 1)


@pytest.fixture(scope="module")
def baseline(smol, prompt):
    model, _ = smol
    return _decode_logits(model, DynamicCache(config=model.config), prompt, 20)[1]


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_compression_off_equals_uncompressed(row, smol, prompt, baseline):
    model, _ = smol
    _, logits = _decode_logits(model, kvcompress.make_cache(row.off, model), prompt, 20)
    # Decode steps take the one-pass kernel, which sums in another order than sdpa: after 30 layers,
    # logits of magnitude ~20 differ by up to ~3e-5 (any real difference is orders of magnitude more).
    torch.testing.assert_close(logits, baseline, atol=1e-4, rtol=0)


@pytest.mark.parametrize("row", [r for r in TABLE if r.nbytes is not None], ids=lambda r: r.name)
@pytest.mark.parametrize("tokens", [120, 150])
def test_nbytes_equals_formula(row, tokens, smol, prompt):
    model, _ = smol
    cache = kvcompress.make_cache(row.on, model)
    _decode_logits(model, cache, prompt, tokens - prompt.shape[1])
    assert cache.get_seq_length() == tokens
    assert cache.nbytes == row.nbytes(tokens)


def test_nbytes_of_streaming_with_kivi(smol, prompt):
    """4 sinks + 64 recent of 150 tokens over 32-token KIVI blocks and a 32-token residual."""
    model, _ = smol
    cache = kvcompress.make_cache("streaming:sink=4,window=64+kivi:bits=4,group=32,residual=32", model)
    _decode_logits(model, cache, prompt, 150 - prompt.shape[1])
    # Kept positions: 0-3 and 86-149. Residual (full precision): the newest 32..63 tokens, whole
    # blocks of 32 leave it. Blocks held: [0,32) for the sinks, then every block touching 86-149.
    layer = cache.compressed_layers[0]
    assert layer.valid().sum().item() == KV_HEADS * (4 + 64)
    held_quantized = len(layer.store)
    window = len(layer.window)
    assert 32 <= window < 64
    assert held_quantized % 32 == 0
    quantized_bytes = kivi_bytes(4, 32, 0)(held_quantized)
    expected = FP_TOKEN * window + quantized_bytes + LAYERS * KV_HEADS * held_quantized  # + (1, H, N) bool masks
    assert cache.nbytes == expected
    assert cache.nbytes < none_bytes(150) / 3


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_left_padded_batch_matches_each_sequence_alone(row, smol):
    model, tokenizer = smol
    prompts = [
        "Write one sentence about the sea. The sea is wide, the waves are tall, and the sailors " * 2,
        "List three colours: red,",
    ]
    batched = kvcompress.generate(model, tokenizer, prompts, method=row.on, max_new_tokens=8)
    alone = [kvcompress.generate(model, tokenizer, p, method=row.on, max_new_tokens=8) for p in prompts]
    assert batched[0] == alone[0]  # the longest prompt has no padding
    if row.padding_exact:
        assert batched[1] == alone[1]
    else:  # quantized: same first words, since padding itself is masked and kept out of the statistics
        assert batched[1].split()[:2] == alone[1].split()[:2]


def test_eviction_keeps_true_positions(smol, prompt):
    """After eviction, new tokens see exactly the kept entries, at their true positions."""
    model, _ = smol
    sink, window, new = 4, 48, 5
    cache = kvcompress.make_cache(f"streaming:sink={sink},window={window}", model)
    continuation = torch.tensor([[504, 1876, 282, 260, 3465]])
    with torch.no_grad():
        with kvcompress.attach(model, cache):
            prefill(model, prompt, torch.ones_like(prompt), cache)
            ours = model(continuation, use_cache=True, **{cache_kwarg(model): cache}).logits

        n = prompt.shape[1]
        kept = torch.tensor(list(range(sink)) + list(range(n - window, n)))
        reference = DynamicCache(config=model.config)
        model(prompt, use_cache=True, **{cache_kwarg(model): reference})
        for layer in reference.layers:  # evict by hand: keep the same entries
            layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
        true_positions = torch.arange(n, n + new)[None]
        expected = model(continuation, position_ids=true_positions, use_cache=True, **{cache_kwarg(model): reference}).logits
        for layer in reference.layers:
            layer.keys, layer.values = layer.keys[:, :, : len(kept)], layer.values[:, :, : len(kept)]
        wrong = model(
            continuation, position_ids=torch.arange(len(kept), len(kept) + new)[None], use_cache=True,
            **{cache_kwarg(model): reference},
        ).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - wrong).abs().max() > 1e-2
    assert cache.stored_tokens == sink + window
    assert cache.get_seq_length() == n + new


# Held once per cache, whatever its length (`fixed_nbytes`), or the model's: not the layer's bytes.
SHARED = ("selection", "storage", "rotary", "head_scores", "basis")


def _held_storage_bytes(obj, seen_objects, storages, skip=SHARED):
    """Bytes of every tensor storage reachable from ``obj``'s attributes (each storage once)."""
    if id(obj) in seen_objects:
        return
    seen_objects.add(id(obj))
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else vars(obj).items()
    for name, value in items:
        if name in skip:
            continue
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (dict, list, tuple)) or (hasattr(value, "__dict__") and type(value).__module__.startswith("kvcompress")):
            _held_storage_bytes(value, seen_objects, storages, skip)


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_nbytes_is_the_memory_the_cache_holds(row, smol, prompt):
    """Every tensor storage a cache layer keeps alive, counted once, is what ``nbytes`` reports: no
    stale buffer, no view pinning a larger tensor."""
    model, _ = smol
    cache = kvcompress.make_cache(row.on, model)
    _decode_logits(model, cache, prompt, 150 - prompt.shape[1])
    storages = {}
    for layer in cache.layers:
        _held_storage_bytes(layer, set(), storages)
    assert sum(storages.values()) == cache.nbytes


@pytest.mark.parametrize("row", [r for r in TABLE if r.name in ("none", "streaming", "h2o")], ids=lambda r: r.name)
@pytest.mark.parametrize("tokens", [1, PAGE - 1, PAGE, PAGE + 1])
def test_page_boundaries_change_nothing(row, tokens, smol, prompt):
    """A context of 1, a page less one, a page and a page plus one token, then decoding across the next
    boundary: the same logits as an uncompressed cache (compression configured but off)."""
    model, _ = smol
    context = prompt[:, :tokens]
    _, expected = _decode_logits(model, DynamicCache(config=model.config), context, 3)
    cache = kvcompress.make_cache(row.off, model)
    _, logits = _decode_logits(model, cache, context, 3)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert len(cache.compressed_layers[0].window.tables[0]) == -(-(tokens + 3) // PAGE)


def test_every_tensor_an_expected_attention_cache_holds_is_counted(tiny):
    """From the cache itself, shared parts included: ``nbytes + fixed_nbytes`` is every byte it keeps alive,
    and its rotary tables are the model's, built once for every cache of it."""
    spec = "expected_attention:ratio=0.5,window=8"
    cache = kvcompress.make_cache(spec, tiny)
    ids = torch.randint(3, 128, (1, 60))
    with kvcompress.attach(tiny, cache), torch.no_grad():
        tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **{cache_kwarg(tiny): cache})
    storages = {}
    _held_storage_bytes(cache, set(), storages, skip=())
    rotary = cache.compressed_layers[0].rotary
    assert rotary.nbytes > 0 and cache.fixed_nbytes == rotary.nbytes
    assert sum(storages.values()) == cache.nbytes + cache.fixed_nbytes
    other = kvcompress.make_cache(spec, tiny)
    assert all(layer.rotary is rotary for layer in other.compressed_layers)  # shared, not built again


def _evicts(spec: str, model) -> bool:
    return kvcompress.make_cache(spec, model).pipeline.selection is not None


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_a_copied_context_continues_as_one_chunk_more(row, smol):
    """A conversation's next turn: a copy of the compressed earlier context, continued with the rest of the
    longer one, holds what compressing the longer one holds when its chunks split it at the same token,
    and the earlier cache (read by a fork) is unchanged. Evicting methods refuse, with the reason."""
    model, tokenizer = smol
    earlier = "The keeper of Elm wrote every ship's name in a book of stone.\n" * 6
    longer = earlier + "The book was lost in the flood of the ninth winter, and the names with it.\n" * 3
    ids, first = (tokenizer(t)["input_ids"] for t in (longer, earlier))
    assert ids[: len(first)] == first and len(ids) - len(first) <= len(first)
    turn = kvcompress.compress(model, tokenizer, earlier, row.on, templated=True)
    if _evicts(row.on, model):
        with pytest.raises(ValueError, match="evicts"):
            kvcompress.compress(model, tokenizer, longer, turn.copy(), templated=True)
        return
    turn.fork()  # a server's answers read it: it is read-only now, and its copy is not
    before = turn.nbytes
    continued = kvcompress.compress(model, tokenizer, longer, turn.copy(), templated=True)
    whole = kvcompress.compress(model, tokenizer, longer, row.on, prefill_chunk=len(first), templated=True)
    assert continued.get_seq_length() == whole.get_seq_length() == len(ids)
    assert continued.nbytes == whole.nbytes and turn.nbytes == before
    assert torch.equal(continued.context[0], whole.context[0])
    for mine, theirs in zip(continued.compressed_layers, whole.compressed_layers):
        mine.trim(), theirs.trim()  # as saving does: the tokens, not the room reserved for more
        a, b = mine.state(), theirs.state()
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor) and a[name].is_floating_point():
                torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0, msg=f"{row.name}: {name}")
            else:
                assert torch.equal(a[name], b[name]) if isinstance(a[name], torch.Tensor) else a[name] == b[name], name
    with pytest.raises(ValueError, match="forks"):
        kvcompress.compress(model, tokenizer, longer, turn, templated=True)
