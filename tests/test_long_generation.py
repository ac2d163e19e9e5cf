"""Decoding-time compression: a long generation runs in bounded cache memory."""

from dataclasses import replace

import pytest
import torch
from transformers import StoppingCriteria

import kvcompress
from kvcompress.methods.budgets import pyramid_budgets
from kvcompress.models import cache_kwarg


class RecordBytes(StoppingCriteria):
    """Records ``cache.nbytes`` after every decode step; never stops generation."""

    def __init__(self, cache):
        self.cache, self.history = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.history.append(self.cache.nbytes)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, spec, new_tokens):
    cache = kvcompress.make_cache(spec, model)
    record = RecordBytes(cache)
    prompt = torch.randint(3, 128, (1, 16))
    with torch.no_grad(), kvcompress.attach(model, cache):
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=[record],
            **{cache_kwarg(model): cache},
        )
    return out, cache, record.history


def test_long_streaming_generation_stays_bounded(tiny):
    sink, window = 4, 256
    out, cache, history = _generate(tiny, f"streaming:sink={sink},window={window}", 3_000)
    assert out.shape[1] == 16 + 3_000
    assert cache.get_seq_length() == 16 + 3_000 - 1  # the last token is produced, not yet cached
    assert cache.stored_tokens == sink + window
    # Per layer (2), in 32-token pages: the sinks' page (its other 28 slots evicted) and the window's 256
    # tokens over 8 or 9 pages (the oldest partly evicted, the newest partly filled); it never gathers
    # (its holes stay under two pages). A page: K and V of 2 KV heads of dim 32 in fp32, the kernel's two
    # addresses per head, and the evicted slots' bool mask.
    page = 2 * 32 * 2 * 32 * 4 + 2 * 8 * 2 + 2 * 32
    assert max(history[window:]) == 2 * 10 * page
    assert min(history[window:]) == 2 * 9 * page


def test_long_generation_with_kivi_grows_at_the_quantized_rate(tiny):
    _, cache, history = _generate(tiny, "kivi:bits=2,group=32,residual=32", 2_000)
    full_precision = 2 * 2 * 2 * 32 * 4  # bytes per token, uncompressed
    # Growth over 1,024 steps (a whole number of groups) is the quantized cost per token.
    growth = (history[-1] - history[-1 - 1024]) / 1024
    # Per layer and head: 2-bit key and value codes (8 + 8 B), key scale + min per channel per 32
    # tokens (2 * 32 * 2 B / 32 = 4 B), value scale + min per token for one 32-channel group (4 B), and the
    # page table's two 8-byte addresses (a key block's and a value block's) per 32-token page (0.5 B).
    per_token_2bit = 2 * 2 * (8 + 8 + 4 + 4 + 16 / 32)
    assert growth == per_token_2bit
    assert growth < full_precision / 5


@pytest.mark.parametrize("method", ["snapkv", "h2o", "tova", "knorm", "pyramidkv", "adakv"])
def test_long_generation_with_eviction_stays_bounded(tiny, method):
    budget, block = 64, 32
    _, cache, history = _generate(tiny, f"{method}:budget={budget},block={block}", 800)
    assert cache.get_seq_length() == 16 + 800 - 1
    # PyramidKV: budgets shrink with depth, but no layer keeps fewer than its 32-token window.
    budgets = [max(b, 32) for b in pyramid_budgets(budget, 2, 20)] if method == "pyramidkv" else [budget, budget]
    bound = 0
    for layer, layer_budget in zip(cache.compressed_layers, budgets):  # cut back every `block` tokens
        valid = layer.valid()
        real = int(valid.sum()) if valid is not None else 2 * len(layer)
        assert real <= 2 * (layer_budget + block - 1)  # 2 KV heads (AdaKV: shared between them)
        # Per KV head at most budget + block - 1 kept tokens and, in 32-token pages (all but AdaKV's ragged
        # heads), under two pages of evicted slots that wait, masked, for a gather; K and V (2 x 32 fp32),
        # a validity byte and a float32 score (room for it 64 slots at a time) per slot, the kernel's two
        # addresses per page; plus the layer's int64 budget per head.
        slots = _round_up(layer_budget + block - 1 + (63 if method != "adakv" else 0), 64)
        bound += 2 * slots * (2 * 32 * 4 + 4 + 1) + 2 * 2 * 8 * slots // 32 + 2 * 8
    assert max(history[200:]) <= bound
    assert history[-1] < 2 * 2 * (16 + 800) * 2 * 32 * 4 / 5  # under a fifth of the uncompressed cache


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv"])
def test_layers_ask_the_selection_only_when_a_head_could_be_over_its_budget(tiny, monkeypatch, method):
    """Until a head (AdaKV: a row's heads together) could pass its budget plus the block's slack, a layer
    does not ask its selection (``Selected.quiet``): the same tokens and bytes at every step as a layer
    that asks at every step, and a layer asks at the prompt and then once per block."""
    from kvcompress.methods.scored import ScoredEviction

    asked = []
    select = ScoredEviction.select
    monkeypatch.setattr(ScoredEviction, "select", lambda self, view: asked.append(1) or select(self, view))
    spec, steps = f"{method}:budget=48,block=16", 160
    torch.manual_seed(3)
    quiet = _generate(tiny, spec, steps)
    asked_quiet, asked[:] = len(asked), []
    monkeypatch.setattr(ScoredEviction, "select", lambda self, view: asked.append(1) or replace(select(self, view), quiet=None))
    torch.manual_seed(3)
    every = _generate(tiny, spec, steps)
    assert torch.equal(quiet[0], every[0]) and quiet[2] == every[2]
    assert len(asked) >= 2 * steps  # 2 layers, every step
    assert asked_quiet <= 2 * (1 + steps // 16 + 1)


def test_a_ragged_layer_reads_the_pages_its_heads_hold_after_they_move(tiny):
    """A ragged layer works out its heads' page tables once per change; giving repeated rows their own
    pages (``unshare``) is a change: the tables then name the copies, not the pages the rows shared."""
    torch.manual_seed(0)
    _, cache, _ = _generate(tiny, "adakv:budget=24,block=16", 57)
    cache.batch_repeat_interleave(2)
    first_pages = lambda store: [[inner.pool.data[inner.tables[0][0]][0].data_ptr() for inner in row] for row in store.rows]  # noqa: E731
    for layer in cache.compressed_layers:
        store = layer.store
        before = store.segment()
        assert store.segment() is before  # nothing changed: the same segment
        shared = before.tables[0][:, 0].view(2, -1)  # (rows, heads) each head's first key page
        assert torch.equal(shared[0], shared[1]) and shared[0].tolist() == first_pages(store)[0]
    cache.unshare()
    for layer in cache.compressed_layers:
        after = layer.store.segment().tables[0][:, 0].view(2, -1)
        assert not bool((after[0] == after[1]).any())  # each row reads its own copy
        assert after.tolist() == first_pages(layer.store)


@pytest.mark.parametrize("spec", [
    "snapkv:ratio=0.5,window=16,allocation=retrieval",
    "snapkv:ratio=0.5,window=16,allocation=retrieval+kivi:bits=4,group=16,residual=16",
    "h2o:ratio=0.5,allocation=adaptive,block=16+kivi:bits=4,group=16,residual=16",
])
def test_the_observed_attention_follows_each_token_when_a_ragged_layer_settles(smol, monkeypatch, spec):
    """Moving window tokens into a ragged store puts each head's after its own stored ones (the store's
    length is the longest head's): the attention each token has received, which the next eviction ranks,
    moves with it. Per head, the valid slots' observed attention reads the same, in order, before and after."""
    from kvcompress.cache import CompressedLayer

    model, tokenizer = smol
    settle = CompressedLayer._settle_ragged
    compared = []

    def per_head(layer):
        valid = layer.valid()
        attention = layer.scoring.attention
        valid = torch.ones_like(attention, dtype=torch.bool) if valid is None else valid
        assert attention.shape == valid.shape
        return [attention[b, h][valid[b, h]] for b in range(valid.shape[0]) for h in range(valid.shape[1])]

    def checked(layer):
        if layer.scoring.attention is None:
            return settle(layer)
        before, stored = per_head(layer), len(layer.store)
        settle(layer)
        after = per_head(layer)
        compared.append(len(layer.store) > stored and bool((layer.store.lengths() < len(layer.store)).any()))
        for old, new in zip(before, after):
            torch.testing.assert_close(new, old, rtol=0, atol=0)

    monkeypatch.setattr(CompressedLayer, "_settle_ragged", checked)
    text = "A lighthouse keeper logs every ship. The ship Aurora passed at dawn with a red flag. " * 12
    prompt = tokenizer(text, return_tensors="pt")["input_ids"][:, :160]
    cache = kvcompress.make_cache(spec, model)
    with torch.no_grad(), kvcompress.attach(model, cache):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                       **{cache_kwarg(model): cache})
    assert sum(compared) >= 4  # settles that moved tokens into heads of different lengths were compared
