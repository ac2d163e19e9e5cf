"""The ``retrieval`` allocation: heads measured once per model, a split set by the target compression."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.ragged import RaggedStore
from kvcompress.calibration import CalibrationError, load_or_build, retrieval_heads
from kvcompress.methods.budgets import Retrieval

CONTEXT = "The history of the city begins with a small harbour and a market. " * 10


def test_the_best_scoring_heads_keep_everything_and_the_others_share_the_rest():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])  # (L=2, H=3)
    policy = Retrieval(sink=4)
    average, basis = torch.full((1, 3, 1), 50), torch.full((1, 3, 1), 100)
    budgets = torch.stack(
        [policy.layer_budget(average, layer, 2, 8, basis, scores) for layer in range(2)]
    )  # (L, 1, H, 1)
    budgets = budgets[:, 0, :, 0]
    # s = 12; floor(6 * (50 - 12) / (100 - 12)) = 2 retrieval heads, the two best, keep all 100 tokens;
    # the other four share 6 * 50 - 2 * 100 = 100
    assert budgets.tolist() == [[25, 100, 25], [100, 25, 25]]
    assert int(budgets.sum()) == 6 * 50
    fewer = torch.stack([policy.layer_budget(torch.full((1, 3, 1), 40), i, 2, 8, basis, scores) for i in range(2)])
    assert fewer[:, 0, :, 0].tolist() == [[28, 100, 28], [28, 28, 28]]  # floor(1.9) = 1: never 2 heads short of all
    everything = torch.stack(
        [policy.layer_budget(torch.full((1, 3, 1), 100), i, 2, 8, basis, scores) for i in range(2)]
    )
    assert bool((everything == 100).all())  # no compression: every head keeps everything
    scores[1] = -torch.inf  # a layer this cache does not compress (a hybrid model's sliding layer)
    first = policy.layer_budget(average, 0, 2, 8, basis, scores)[0, :, 0]
    assert first.tolist() == [25, 100, 25]  # 3 heads compete: 1 retrieval head keeps all, 2 share 3 * 50 - 100


@pytest.mark.model
def test_retrieval_heads_are_few_and_measured_on_synthetic_lists(smol):
    model, tokenizer = smol
    before = model.config._attn_implementation
    scores = retrieval_heads(model, tokenizer, samples=1, pairs=12)
    assert model.config._attn_implementation == before  # eager attention only while measuring
    assert scores.shape == (30, 3) and bool((scores >= 0).all())
    assert float(scores.max()) > 20 * float(scores.median())  # a few heads copy, most do not


@pytest.mark.model
def test_scores_of_an_earlier_measure_are_not_read(smol, tmp_path):
    """A file whose retrieval scores another version of the measure made holds none as far as the
    allocation is concerned: the default file is measured again, an explicit one is refused; a file
    written before measures had versions holds the first one's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvcompress.calibration import Calibration

    model, _ = smol
    calibration = load_or_build(model)
    calibration.retrieval = torch.rand(30, 3)
    path = calibration.save(tmp_path / "calibration.safetensors")
    assert torch.equal(Calibration.load(path, model).retrieval, calibration.retrieval)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["retrieval_measure"]  # a file written before measures had versions: the first measure's scores
    save_file(tensors, str(path), metadata=meta)
    assert torch.equal(Calibration.load(path, model).retrieval, calibration.retrieval)
    meta["retrieval_measure"] = "another"
    save_file(tensors, str(path), metadata=meta)
    assert Calibration.load(path, model).retrieval is None
    with pytest.raises(CalibrationError, match="another measure"):
        kvcompress.make_cache(f"knorm:ratio=0.9,allocation=retrieval,calibration={path}", model)


@pytest.mark.model
def test_retrieval_heads_keep_more_and_the_rest_is_freed(smol, tmp_path):
    model, tokenizer = smol
    calibration = load_or_build(model)
    calibration.retrieval = torch.zeros(30, 3)
    calibration.retrieval[[2, 7], [0, 2]] = 1.0  # two retrieval heads: floor(90 * (17 - 12) / (165 - 12)) = 2 at ratio 0.9
    path = calibration.save(tmp_path / "calibration.safetensors")
    spec = f"knorm:ratio=0.9,window=8,sink=4,allocation=retrieval,calibration={path}"
    cache = kvcompress.compress(model, tokenizer, CONTEXT, spec)
    seen = cache.get_seq_length()
    for layer in cache.compressed_layers:
        assert isinstance(layer.store, RaggedStore)
        valid = layer.valid()  # None: every head holds all its slots
        kept = valid.sum(-1)[0] if valid is not None else torch.full((3,), len(layer))  # (H,)
        retrieval = calibration.retrieval[layer.layer_idx] > 0
        others = kept[~retrieval].tolist()
        assert len(set(others)) == 1 and 12 <= others[0] < seen // 2  # one share, at least sinks and window
        assert kept[retrieval].tolist() == [seen] * int(retrieval.sum())  # every token
    uniform = kvcompress.compress(model, tokenizer, CONTEXT, "knorm:ratio=0.9,window=8,sink=4")
    assert cache.nbytes < 2 * uniform.nbytes < kvcompress.compress(model, tokenizer, CONTEXT, "none").nbytes
    assert seen == uniform.get_seq_length()
    calibration.retrieval = None
    bare = calibration.save(tmp_path / "bare.safetensors")
    with pytest.raises(CalibrationError, match="no retrieval-head scores"):
        kvcompress.make_cache(f"knorm:ratio=0.9,allocation=retrieval,calibration={bare}", model)


@pytest.mark.model
def test_a_layer_of_retrieval_heads_is_quantized_like_the_others(smol, tmp_path):
    """With KIVI, a layer whose heads all keep every token (so it never evicts) still moves its tokens
    into the quantized store: only the residual and a block at most stay in full precision."""
    model, tokenizer = smol
    calibration = load_or_build(model)
    calibration.retrieval = torch.zeros(30, 3)
    calibration.retrieval[2] = 1.0  # every head of layer 2
    path = calibration.save(tmp_path / "calibration.safetensors")
    spec = f"knorm:ratio=0.85,window=8,sink=4,allocation=retrieval,calibration={path}+kivi:bits=4,group=16,residual=16"
    cache = kvcompress.compress(model, tokenizer, CONTEXT, spec)
    layer = cache.compressed_layers[2]
    assert layer.valid() is None  # nothing evicted here: every head keeps every token
    assert len(layer.store) > 0 and len(layer.window) < 16 + 16
    assert len(layer.store) + len(layer.window) == cache.get_seq_length()
