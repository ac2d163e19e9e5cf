"""share_layers (MiniCache-style cross-layer merging): the merge itself, what each layer reads back,
and the specs it refuses. Exactness at threshold=1 and exact bytes are rows of the method table."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.methods.share_layers import slerp_merge
from kvcompress.models import cache_kwarg


def test_slerp_merge_interpolates_directions_and_keeps_norms():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 2.0]])
    for t, expected in [(0.0, [1.0, 0.0]), (1.0, [0.0, 1.0]), (0.5, [math.sqrt(0.5), math.sqrt(0.5)])]:
        direction, norms, cos = slerp_merge(a, b, t)
        torch.testing.assert_close(direction, torch.tensor([expected]))
        torch.testing.assert_close(norms, torch.tensor([[3.0, 2.0]]))
        torch.testing.assert_close(cos, torch.tensor([0.0]))
    direction, _, cos = slerp_merge(a, 5 * a, 0.6)  # parallel vectors: the shared direction is theirs
    torch.testing.assert_close(direction, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(cos, torch.tensor([1.0]))


@pytest.mark.model
def test_layers_read_back_their_norms_on_a_shared_direction(smol):
    model, tokenizer = smol
    ids = tokenizer("The tide rose over the harbour wall and the boats knocked together. " * 8, return_tensors="pt")["input_ids"]
    reference = DynamicCache(config=model.config)
    cache = kvcompress.make_cache("share_layers:start=0.5,t=0,threshold=0,residual=0", model)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): reference})
        with kvcompress.attach(model, cache):
            model(ids, use_cache=True, **{cache_kwarg(model): cache})
    pair = cache.storage.pairs[15]
    assert 0 < pair.retained.float().mean() < 1  # some tokens merge, some are kept as they are
    first, second = (cache.compressed_layers[i].store.keys_values()[0] for i in (15, 16))
    true_first, true_second = reference.layers[15].keys, reference.layers[16].keys
    torch.testing.assert_close(first, true_first, atol=1e-5, rtol=0)  # t=0: the direction is the first layer's
    # The second layer: its own norm on the first layer's direction, exact where retained.
    torch.testing.assert_close(second.norm(dim=-1), true_second.norm(dim=-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(second[pair.retained], true_second[pair.retained])
    merged = ~pair.retained
    expected = true_first / true_first.norm(dim=-1, keepdim=True) * true_second.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(second[merged], expected[merged], atol=1e-4, rtol=1e-5)
    assert [len(layer.store) for layer in cache.compressed_layers[:15]] == [ids.shape[1]] * 15  # shallow: untouched


@pytest.mark.parametrize("spec", ["snapkv:ratio=0.5+share_layers", "share_layers+kivi:bits=4", "lowrank:ratio=0.5+share_layers"])
def test_share_layers_combines_with_nothing(spec, tiny):
    with pytest.raises(kvcompress.SpecError, match="combines with no other method"):
        kvcompress.make_cache(spec, tiny)


@pytest.mark.parametrize("spec, message", [("share_layers:start=1", r"\[0, 1\)"), ("share_layers:threshold=2", "cosine"), ("share_layers:t=-0.1", "t must")])
def test_bad_parameters(spec, message, tiny):
    with pytest.raises(kvcompress.SpecError, match=message):
        kvcompress.make_cache(spec, tiny)
