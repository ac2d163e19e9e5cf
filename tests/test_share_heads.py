"""Head sharing: grouping by calibration, merged storage, per-head validity, exact bytes."""

import pytest
import torch

import kvcompress
from kvcompress.buffer import FullPrecisionBuffer
from kvcompress.methods.share_heads import ShareHeadsStore, head_gram, ward_groups
from kvcompress.registry import SpecError, parse_spec


def test_ward_groups_merges_the_most_similar_heads():
    torch.manual_seed(0)
    base = torch.randn(500, 4, 8)
    x = base.clone()
    x[:, 2] = x[:, 0] + 0.05 * torch.randn(500, 8)  # head 2 nearly copies head 0
    joint = x.flatten(1)  # (T, H*D)
    gram = head_gram(joint.mean(0), torch.cov(joint.T, correction=0), 4)
    torch.testing.assert_close(gram, torch.einsum("thd,tgd->hg", x, x).double() / 500, rtol=1e-4, atol=1e-4)
    assert ward_groups(gram, 3).tolist() == [0, 1, 0, 2]
    assert ward_groups(gram, 4).tolist() == [0, 1, 2, 3]
    assert ward_groups(gram, 1).tolist() == [0, 0, 0, 0]


def test_one_group_per_head_stores_every_head_exactly():
    keys, values = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    store = ShareHeadsStore(torch.arange(3), 3, FullPrecisionBuffer())
    store.append(keys, values, None, None)
    k, v = store.keys_values()
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_merged_heads_share_the_mean_of_their_valid_heads():
    keys, values = torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    valid = torch.ones(1, 3, 8, dtype=torch.bool)
    valid[0, 2, 5] = False  # head 2 evicted token 5: the group's slot holds head 0's alone
    store = ShareHeadsStore(torch.tensor([0, 1, 0]), 2, FullPrecisionBuffer())
    store.append(keys, values, valid, None)
    k, _ = store.keys_values()
    expected = (keys[:, 0] + keys[:, 2]) / 2
    expected[:, 5] = keys[:, 0, 5]
    torch.testing.assert_close(k[:, 0], expected)
    torch.testing.assert_close(k[:, 2], expected)
    assert torch.equal(k[:, 1], keys[:, 1])
    assert torch.equal(store.valid(), valid)
    # 2 merged heads x 64 reserved tokens x 16 dims x fp32, K and V, + (1, 3, 8) bool mask, + the
    # int64 group of each head and the fp32 (2, 3) membership
    assert store.nbytes == 2 * 2 * 64 * 16 * 4 + 3 * 8 + 3 * 8 + 2 * 3 * 4
    keep = valid.clone()
    keep[:, :, :2] = False
    index = store.compact(keep)
    assert index.shape == (1, 3, 6) and torch.equal(store.valid(), valid[:, :, 2:])


def test_groups_must_be_positive():
    with pytest.raises(SpecError, match="groups must be >= 1"):
        parse_spec("share_heads:groups=0")


@pytest.mark.model
def test_more_groups_than_heads_names_the_range(smol):
    model, _ = smol
    with pytest.raises(SpecError, match="between 1 and the model's 3 KV heads"):
        kvcompress.make_cache("share_heads:groups=4", model)


@pytest.mark.model
def test_grouping_of_the_default_model_merges_each_layers_closest_pair(smol):
    """With 3 KV heads and 2 groups, Ward's first merge is the pair whose union spreads least: the
    pair with the smallest expected squared distance, summed over keys and values (each normalised
    by its layer's total) — computed here by brute force from the calibration."""
    from kvcompress.calibration import load_or_build

    model, _ = smol
    cache = kvcompress.make_cache("share_heads:groups=2", model)
    calibration = load_or_build(model)
    merged_pairs = set()
    for layer, group_of in cache.storage.group_of.items():
        distance = {}
        for kind in ("keys", "values"):
            mean, cov = getattr(calibration, f"{kind}_mean")[layer].double(), getattr(calibration, f"{kind}_cov")[layer].double()
            moment = (cov + torch.outer(mean, mean)).view(3, 64, 3, 64)
            gram = torch.stack([torch.stack([moment[i, :, j].trace() for j in range(3)]) for i in range(3)])
            for i, j in ((0, 1), (0, 2), (1, 2)):  # E|x_i - x_j|^2 over the layer's total E|x|^2
                distance[i, j] = distance.get((i, j), 0) + float(gram[i, i] + gram[j, j] - 2 * gram[i, j]) / float(gram.trace())
        pair = min(distance, key=distance.get)
        assert group_of[pair[0]] == group_of[pair[1]] and group_of.unique().numel() == 2, (layer, distance, group_of)
        merged_pairs.add(pair)
    assert len(cache.storage.group_of) == 30
    assert len(merged_pairs) > 1  # the closest pair is not the same in every layer: groups are per layer
