"""Score-based eviction: shared top-k pruning on tensors, and each scorer against a plain
reference computed from an uncompressed run of the real model."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.generation import prefill
from kvcompress.methods.adakv import AdaKV
from kvcompress.methods.budgets import pyramid_budgets
from kvcompress.methods.knorm import KNorm
from kvcompress.methods.snapkv import SnapKV
from kvcompress.models import cache_kwarg
from kvcompress.pages import PAGE
from kvcompress.protocols import LayerView


def _view(scores, valid=None, keys=None, budget=None):
    valid = torch.ones(scores.shape, dtype=torch.bool) if valid is None else valid
    return LayerView(valid, scores, None, None, budget, layer_idx=0, num_layers=1, dense=lambda: (keys, None))


def test_kept_slots_are_window_plus_top_scores():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 40)
    keep = SnapKV(ratio=0.5, window=4, kernel=1).select(_view(scores)).keep
    for b in range(2):
        for h in range(3):
            others = scores[b, h, :36]
            expected = set(others.topk(20 - 4).indices.tolist()) | set(range(36, 40))
            assert set(keep[b, h].nonzero().flatten().tolist()) == expected


def test_budget_is_fixed_at_first_compression_and_block_sets_when_to_recompress():
    selection = SnapKV(ratio=0.5, window=2, kernel=1, block=4)
    first = selection.select(_view(torch.rand(1, 1, 20)))
    assert first.keep.sum() == 10
    assert first.budget.item() == 10
    grown = selection.select(_view(torch.rand(1, 1, 13), budget=first.budget))
    assert grown.keep is None and grown.budget is first.budget  # 13 <= 10 + block - 1
    assert selection.select(_view(torch.rand(1, 1, 14), budget=first.budget)).keep.sum() == 10


def test_padding_is_never_kept_and_rows_get_their_own_budget():
    scores = torch.rand(2, 1, 30)
    valid = torch.ones(2, 1, 30, dtype=torch.bool)
    valid[1, :, :10] = False
    keep = KNorm(ratio=0.5, window=2).select(_view(scores, valid, keys=torch.randn(2, 1, 30, 8))).keep
    assert keep[0].sum() == 15 and keep[1].sum() == 10
    assert not keep[1, :, :10].any()


def test_ratio_zero_keeps_everything():
    assert SnapKV(ratio=0).select(_view(torch.rand(1, 1, 50))).keep is None


def test_pyramid_budgets_shrink_with_depth_and_keep_the_average():
    budgets = pyramid_budgets(100, 30, beta=20)
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 5
    assert abs(sum(budgets) / 30 - 100) < 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("snapkv:ratio=1.0", r"must be in \[0, 1\)"),
        ("knorm:ratio=-0.1", r"must be in \[0, 1\)"),
        ("snapkv:kernel=4", "odd number"),
        ("h2o:block=0", "block must be >= 1"),
        ("pyramidkv:beta=0.5", "beta must be >= 1"),
        ("tova:budget=-3", "budget must be >= 0"),
        ("snapkv:0.5+h2o:0.5", "at most one eviction method"),
    ],
)
def test_bad_parameters_are_rejected(spec, message, tiny):
    with pytest.raises(kvcompress.SpecError, match=message):
        kvcompress.make_cache(spec, tiny)


def _reference(model, ids):
    """Keys (B, H, S, D) per layer and eager attention weights (B, Hq, S, S) of an uncompressed run."""
    cache = DynamicCache(config=model.config)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True, output_attentions=True, **{cache_kwarg(model): cache})
    finally:
        model.set_attn_implementation("sdpa")
    return [layer.keys for layer in cache.layers], out.attentions


def _compressed(model, ids, spec):
    """The reference run's keys and attentions, and ``spec``'s cache after prefilling ``ids``."""
    ref_keys, attentions = _reference(model, ids)
    cache = kvcompress.make_cache(spec, model)
    with torch.no_grad(), kvcompress.attach(model, cache):
        prefill(model, ids, torch.ones_like(ids), cache)
    return ref_keys, attentions, cache


def _kept_keys(cache, layer_idx):
    keys, _ = cache.compressed_layers[layer_idx].dense_keys_values()
    return keys


def _assert_keeps(cache, ref_keys, expected_per_head, layer_idx):
    """The layer holds exactly the reference keys at the expected positions, in order."""
    held = _kept_keys(cache, layer_idx)
    valid = cache.compressed_layers[layer_idx].valid()  # None: every slot of every head is a kept token
    for h, positions in enumerate(expected_per_head):
        keys = held[0, h] if valid is None else held[0, h][valid[0, h]]
        torch.testing.assert_close(keys, ref_keys[layer_idx][0, h, sorted(positions)], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ids(smol):
    _, tokenizer = smol
    text = "A lighthouse keeper logs every ship. The ship Aurora passed at dawn with a red flag. " * 6
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :90]


def _snapkv_scores(attention, window, kernel):
    """SnapKV's scores from eager weights ``(1, Hq, S, S)``: the last ``window`` queries' attention,
    averaged over the query heads of each KV head, average-pooled (edges averaged over real slots)."""
    n = attention.shape[-1]
    per_kv = attention[0, :, -window:].sum(1).view(3, 3, n).mean(1)  # (H, S); GQA: 3 query heads per KV head
    pad = kernel // 2
    pooled = torch.nn.functional.avg_pool1d(per_kv[:, None], kernel, stride=1, padding=pad, count_include_pad=True)[:, 0]
    return pooled / torch.nn.functional.avg_pool1d(torch.ones(1, 1, n), kernel, 1, pad, count_include_pad=True)[0]


def _adakv_reference(scores, budget, window, alpha):
    """Plain-Python AdaKV on ``(H, S)`` scores: every head keeps its window and its top
    ``ceil(alpha * budget)``; the rest of ``H * budget`` goes to the best remaining scores of any head."""
    heads, n = scores.shape
    floor = math.ceil(alpha * budget)
    kept = []
    for h in range(heads):
        order = sorted(range(n - window), key=lambda s: -float(scores[h, s]))
        kept.append(set(range(n - window, n)) | set(order[: max(0, floor - window)]))
    rest = sorted(
        ((h, s) for h in range(heads) for s in range(n) if s not in kept[h]), key=lambda hs: -float(scores[hs])
    )
    for h, s in rest[: heads * budget - sum(map(len, kept))]:
        kept[h].add(s)
    return kept


def test_adakv_shares_the_layer_budget_between_heads():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 40)
    scores[:, 0] *= 0.1  # head 0's attention is weak everywhere: it should give most of its share away
    keep = AdaKV(ratio=0.5, window=4, kernel=1, alpha=0.25).select(_view(scores)).keep
    for b in range(2):
        expected = _adakv_reference(scores[b], budget=20, window=4, alpha=0.25)
        assert [set(keep[b, h].nonzero().flatten().tolist()) for h in range(3)] == expected
    counts = keep.sum(-1)  # (B, H)
    assert (counts.sum(-1) == 3 * 20).all()
    assert (counts[:, 0] == 5).all() and (counts[:, 1:] > 20).all()  # head 0 keeps only its safeguard


def test_adakv_with_alpha_one_is_snapkv():
    scores = torch.rand(1, 3, 50)
    ada = AdaKV(ratio=0.5, window=4, alpha=1.0).select(_view(scores)).keep
    assert torch.equal(ada, SnapKV(ratio=0.5, window=4).select(_view(scores)).keep)


@pytest.mark.model
def test_adakv_keeps_the_reference_allocation_and_frees_the_rest(smol, ids):
    model, _ = smol
    ref_keys, attentions, cache = _compressed(model, ids, "adakv:ratio=0.5,window=16,kernel=5,alpha=0.2")
    budget, window = math.ceil(ids.shape[1] * 0.5), 16
    ragged = 0
    for layer_idx in (0, 17):
        expected = _adakv_reference(_snapkv_scores(attentions[layer_idx], window, 5), budget, window, 0.2)
        _assert_keeps(cache, ref_keys, expected, layer_idx)
        store = cache.compressed_layers[layer_idx].store
        assert store.lengths()[0].tolist() == [len(e) for e in expected]
        ragged += len(set(store.lengths()[0].tolist())) > 1
    assert ragged  # the heads really hold different numbers of tokens
    # Only the kept tokens' pages are held: each head in its own pages of 32 slots of K and V fp32 (its last
    # page partly filled), the (B, H) int64 budget, the float32 scores of the longest head's slots (the
    # window is empty right after the cut), and the (B, H, S) bool validity of the heads' slots once a
    # step has worked it out (None where every head holds as many).
    layers = cache.compressed_layers
    joined = [layer.store.valid() for layer in layers]
    expected_bytes = sum(
        sum(-(-n // PAGE) for n in layer.store.lengths().flatten().tolist()) * PAGE * 2 * 64 * 4
        + 3 * 8 + 4 * 3 * len(layer) + (0 if mask is None else mask.numel())
        for layer, mask in zip(layers, joined)
    )
    assert all(len(layer.window) == 0 for layer in layers)
    assert cache.nbytes == expected_bytes
    assert sum(int(layer.store.lengths().sum()) for layer in layers) == 30 * 3 * budget


@pytest.mark.model
@pytest.mark.parametrize("layer_idx", [0, 17])
def test_snapkv_keeps_the_top_pooled_window_attention(smol, ids, layer_idx):
    model, _ = smol
    ref_keys, attentions, cache = _compressed(model, ids, "snapkv:ratio=0.5,window=16,kernel=5")
    n, budget, window = ids.shape[1], math.ceil(ids.shape[1] * 0.5), 16
    pooled = _snapkv_scores(attentions[layer_idx], window, kernel=5)
    expected = [set(pooled[h, : n - window].topk(budget - window).indices.tolist()) | set(range(n - window, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, layer_idx)


@pytest.mark.model
def test_h2o_keeps_heavy_hitters_of_all_prompt_queries(smol, ids):
    model, _ = smol
    ref_keys, attentions, cache = _compressed(model, ids, "h2o:ratio=0.5")
    n = ids.shape[1]
    budget = math.ceil(n * 0.5)
    recent = budget // 2
    received = attentions[5][0].sum(1).view(3, 3, n).mean(1)  # (H, S) summed over all queries
    expected = [set(received[h, : n - recent].topk(budget - recent).indices.tolist()) | set(range(n - recent, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, 5)


@pytest.mark.model
def test_knorm_keeps_the_smallest_key_norms(smol, ids):
    model, _ = smol
    ref_keys, _, cache = _compressed(model, ids, "knorm:ratio=0.75,window=8")
    n, budget = ids.shape[1], math.ceil(ids.shape[1] * 0.25)
    norms = ref_keys[3][0].norm(dim=-1)  # (H, S)
    expected = [set((-norms[h, : n - 8]).topk(budget - 8).indices.tolist()) | set(range(n - 8, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, 3)


@pytest.mark.model
def test_keydiff_keeps_the_keys_least_like_the_average_direction(smol, ids):
    model, _ = smol
    ref_keys, _, cache = _compressed(model, ids, "keydiff:ratio=0.75,window=8")
    n, budget = ids.shape[1], math.ceil(ids.shape[1] * 0.25)
    unit = ref_keys[7][0] / ref_keys[7][0].norm(dim=-1, keepdim=True)  # (H, S)
    anchor = unit.mean(1, keepdim=True)
    similarity = (unit * anchor).sum(-1) / anchor.norm(dim=-1)  # (H, S) cosine to the anchor
    expected = [set((-similarity[h, : n - 8]).topk(budget - 8).indices.tolist()) | set(range(n - 8, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, 7)


@pytest.mark.model
def test_pyramidkv_layers_hold_their_budgets(smol, ids):
    model, _ = smol
    cache = kvcompress.make_cache("pyramidkv:ratio=0.5,window=4,beta=4", model)
    with torch.no_grad(), kvcompress.attach(model, cache):
        prefill(model, ids, torch.ones_like(ids), cache)
    budgets = [max(b, 4) for b in pyramid_budgets(math.ceil(ids.shape[1] * 0.5), 30, 4)]
    held = [len(layer) if layer.valid() is None else int(layer.valid()[0, 0].sum()) for layer in cache.compressed_layers]
    assert held == budgets  # (a layer whose cut frees no capacity masks its evicted slots instead)
    # A multi-token step after eviction, with layers of different lengths, equals token-by-token feeding.
    step = ids[:, :6]
    other = kvcompress.make_cache("pyramidkv:ratio=0.5,window=4,beta=4", model)
    with torch.no_grad():
        with kvcompress.attach(model, other):
            prefill(model, ids, torch.ones_like(ids), other)
            one_by_one = torch.cat([model(step[:, i : i + 1], use_cache=True, **{cache_kwarg(model): other}).logits for i in range(6)], 1)
        with kvcompress.attach(model, cache):
            together = model(step, use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)


def test_expected_attention_scores_are_the_gaussian_moments_of_rotated_queries(tiny):
    """With one future position the average rotation is that position's: the expected logit of a key
    is the mean of the rotated queries' dot products plus half their variance (over ``D``)."""
    from kvcompress.calibration import Rotary
    from kvcompress.methods.expected_attention import ExpectedAttention

    torch.manual_seed(0)
    rotary, dim, m = Rotary(tiny), 32, 20
    positions = torch.arange(40, 40 + m)[None]  # (1, m): the queries' positions, past the sinks
    pre = torch.randn(1, 4, m, dim)  # 4 query heads (2 per KV head), before rotary
    queries = rotary.rotate(pre, positions[:, None])  # what attention saw
    keys, values = torch.randn(1, 2, 30, dim), torch.randn(1, 2, 30, dim)
    view = LayerView(torch.ones(1, 2, 30, dtype=torch.bool), None, queries, positions, None, 0, 1, lambda: (keys, values), rotary)
    scores = ExpectedAttention(ratio=0.5, future=1, vnorm=False).score(view)
    future = rotary.rotate(pre, torch.tensor([[[40 + m]]]))  # (1, 4, m, D) at the next position
    dots = torch.einsum("bgmd,bgsd->bgms", future, keys.repeat_interleave(2, 1))  # (1, 4, m, S)
    logits = dots.mean(2) / math.sqrt(dim) + dots.var(2, unbiased=False) / (2 * dim)
    expected = logits.softmax(-1).view(1, 2, 2, 30).mean(2)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    weighted = ExpectedAttention(ratio=0.5, future=1).score(view)
    torch.testing.assert_close(weighted, expected * values.norm(dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
def test_expected_attention_scores_each_head_of_a_ragged_layer_over_its_own_tokens(tiny, rows):
    """In a ragged layer (the retrieval allocation, AdaKV) heads hold different numbers of tokens in the
    slots of the longest one, the newest at the end. A head's scores are a softmax over its own tokens
    only: equal to scoring that head's tokens alone, and 0 on padding, whether few or most slots are real."""
    from kvcompress.calibration import Rotary
    from kvcompress.methods.expected_attention import ExpectedAttention

    torch.manual_seed(0)
    rotary, dim, m, slots = Rotary(tiny), 32, 12, 48
    positions = torch.arange(60, 60 + m)[None].expand(rows, m)
    queries = torch.randn(rows, 6, m, dim)  # 6 query heads, 2 per KV head
    keys, values = torch.randn(rows, 3, slots, dim), torch.randn(rows, 3, slots, dim)
    valid = torch.zeros(rows, 3, slots, dtype=torch.bool)
    valid[:, 0] = True  # a head holding every slot
    valid[:, 1, :5] = valid[:, 1, -8:] = True  # a short head: 5 stored tokens, then padding, then its window
    valid[:, 2, 10:] = True  # a head with most slots real, padded at the front
    if rows == 2:
        valid[1, 1, 2:5] = False  # the second row's short head holds fewer tokens
    view = LayerView(valid, None, queries, positions, None, 0, 1, lambda: (keys, values), rotary)
    method = ExpectedAttention(ratio=0.5)
    scores = method.score(view)
    assert not scores.masked_fill(valid, 0).any()  # padding scores 0
    for row in range(rows):
        for head in range(3):
            mine = valid[row, head]
            alone = LayerView(
                torch.ones(1, 1, int(mine.sum()), dtype=torch.bool), None, queries[row : row + 1, 2 * head : 2 * head + 2],
                positions[row : row + 1], None, 0, 1,
                lambda: (keys[row : row + 1, head : head + 1, mine], values[row : row + 1, head : head + 1, mine]), rotary,
            )
            torch.testing.assert_close(scores[row, head, mine], method.score(alone)[0, 0], atol=1e-6, rtol=1e-5)


def test_a_prompt_cut_that_keeps_every_token_releases_its_queries(tiny):
    """A scorer that reads queries (Expected Attention) holds those seen since the last compression. The
    prompt's cut is one even where the layer keeps every token (a budget above the prompt; a layer of
    retrieval heads): the prompt's queries are released then, not held until the first decoding cut."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (1, 40))
    cache = kvcompress.make_cache("expected_attention:budget=64", tiny)
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        tiny(ids, use_cache=True, **{cache_kwarg(tiny): cache})
        assert all(layer.scoring.queries is None for layer in cache.compressed_layers)
        assert cache.nbytes == sum(layer.window.nbytes + layer.scoring.budget.nbytes for layer in cache.compressed_layers)
        for i in range(3):  # decoding collects the queries the next cut will score with
            tiny(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(tiny): cache})
        assert all(layer.scoring.queries.shape[2] == 3 for layer in cache.compressed_layers)
