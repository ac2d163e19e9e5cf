"""Score-based eviction: shared top-k pruning on tensors, and each scorer against a plain
reference computed from an uncompressed run of the real model."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.generation import cache_kwarg, prefill
from kvcompress.methods.base import LayerView
from kvcompress.methods.knorm import KNorm
from kvcompress.methods.scored import pyramid_budgets
from kvcompress.methods.snapkv import SnapKV


def _view(scores, valid=None, keys=None):
    valid = torch.ones(scores.shape, dtype=torch.bool) if valid is None else valid
    return LayerView(valid, keys, scores, layer_idx=0, num_layers=1, state={})


def test_kept_slots_are_window_plus_top_scores():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 40)
    keep = SnapKV(ratio=0.5, window=4, kernel=1).select(_view(scores))
    for b in range(2):
        for h in range(3):
            others = scores[b, h, :36]
            expected = set(others.topk(20 - 4).indices.tolist()) | set(range(36, 40))
            assert set(keep[b, h].nonzero().flatten().tolist()) == expected


def test_budget_is_fixed_at_first_compression_and_block_sets_when_to_recompress():
    selection = SnapKV(ratio=0.5, window=2, kernel=1, block=4)
    view = _view(torch.rand(1, 1, 20))
    assert selection.select(view).sum() == 10
    assert view.state["budget"].item() == 10
    grown = _view(torch.rand(1, 1, 13))
    grown.state = view.state
    assert selection.select(grown) is None  # 13 <= 10 + block - 1
    grown = _view(torch.rand(1, 1, 14))
    grown.state = view.state
    assert selection.select(grown).sum() == 10


def test_padding_is_never_kept_and_rows_get_their_own_budget():
    scores = torch.rand(2, 1, 30)
    valid = torch.ones(2, 1, 30, dtype=torch.bool)
    valid[1, :, :10] = False
    keep = KNorm(ratio=0.5, window=2).select(_view(scores, valid, keys=torch.randn(2, 1, 30, 8)))
    assert keep[0].sum() == 15 and keep[1].sum() == 10
    assert not keep[1, :, :10].any()


def test_ratio_zero_keeps_everything():
    assert SnapKV(ratio=0).select(_view(torch.rand(1, 1, 50))) is None


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


def _kept_keys(cache, layer_idx):
    layer = cache.compressed_layers[layer_idx]
    keys, _ = layer._attention_inputs()
    return keys


def _assert_keeps(cache, ref_keys, expected_per_head, layer_idx):
    """The layer holds exactly the reference keys at the expected positions, in order."""
    held = _kept_keys(cache, layer_idx)
    for h, positions in enumerate(expected_per_head):
        torch.testing.assert_close(held[0, h], ref_keys[layer_idx][0, h, sorted(positions)], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ids(smol):
    _, tokenizer = smol
    text = "A lighthouse keeper logs every ship. The ship Aurora passed at dawn with a red flag. " * 6
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :90]


@pytest.mark.model
@pytest.mark.parametrize("layer_idx", [0, 17])
def test_snapkv_keeps_the_top_pooled_window_attention(smol, ids, layer_idx):
    model, _ = smol
    ref_keys, attentions = _reference(model, ids)
    cache = kvcompress.make_cache("snapkv:ratio=0.5,window=16,kernel=5", model)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), cache)
    n, budget, window = ids.shape[1], math.ceil(ids.shape[1] * 0.5), 16
    weights = attentions[layer_idx][0, :, -window:].sum(1)  # (Hq, S) attention of the last 16 queries
    per_kv = weights.view(3, 3, n).mean(1)  # GQA: average the 3 query heads of each KV head
    pooled = torch.nn.functional.avg_pool1d(per_kv[:, None], 5, stride=1, padding=2, count_include_pad=True)[:, 0]
    pooled = pooled / torch.nn.functional.avg_pool1d(torch.ones(1, 1, n), 5, 1, 2, count_include_pad=True)[0]
    expected = [set(pooled[h, : n - window].topk(budget - window).indices.tolist()) | set(range(n - window, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, layer_idx)


@pytest.mark.model
def test_h2o_keeps_heavy_hitters_of_all_prompt_queries(smol, ids):
    model, _ = smol
    ref_keys, attentions = _reference(model, ids)
    cache = kvcompress.make_cache("h2o:ratio=0.5", model)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), cache)
    n = ids.shape[1]
    budget = math.ceil(n * 0.5)
    recent = budget // 2
    received = attentions[5][0].sum(1).view(3, 3, n).mean(1)  # (H, S) summed over all queries
    expected = [set(received[h, : n - recent].topk(budget - recent).indices.tolist()) | set(range(n - recent, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, 5)


@pytest.mark.model
def test_knorm_keeps_the_smallest_key_norms(smol, ids):
    model, _ = smol
    ref_keys, _ = _reference(model, ids)
    cache = kvcompress.make_cache("knorm:ratio=0.75,window=8", model)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), cache)
    n, budget = ids.shape[1], math.ceil(ids.shape[1] * 0.25)
    norms = ref_keys[3][0].norm(dim=-1)  # (H, S)
    expected = [set((-norms[h, : n - 8]).topk(budget - 8).indices.tolist()) | set(range(n - 8, n)) for h in range(3)]
    _assert_keeps(cache, ref_keys, expected, 3)


@pytest.mark.model
def test_pyramidkv_layers_hold_their_budgets(smol, ids):
    model, _ = smol
    cache = kvcompress.make_cache("pyramidkv:ratio=0.5,window=4,beta=4", model)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), cache)
    budgets = [max(b, 4) for b in pyramid_budgets(math.ceil(ids.shape[1] * 0.5), 30, 4)]
    assert [len(layer) for layer in cache.compressed_layers] == budgets
    # A multi-token step after eviction, with layers of different lengths, equals token-by-token feeding.
    step = ids[:, :6]
    other = kvcompress.make_cache("pyramidkv:ratio=0.5,window=4,beta=4", model)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), other)
        together = model(step, use_cache=True, **{cache_kwarg(model): cache}).logits
        one_by_one = torch.cat([model(step[:, i : i + 1], use_cache=True, **{cache_kwarg(model): other}).logits for i in range(6)], 1)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
