"""The one-pass decode path over float32 slots (``kvcompress::dense_attend``) against the segment path,
sdpa, and the plain-PyTorch reference through the model."""

import contextlib

import pytest
import torch

import kvcompress
from kvcompress import attention, buffer
from kvcompress.buffer import FullPrecisionBuffer, RaggedStore
from kvcompress.step import DenseSegment, Operands


def _assert_one_pass_equals_the_other_paths(query: torch.Tensor, operands: Operands) -> None:
    """The one-pass path applies and gives the output and observed attention of the segment path and of
    sdpa (float32 sums in another order: atol 1e-6, 1e-7 for the weights)."""
    one = attention.attend_one_pass(query, operands, 0.125)
    assert one is not None
    for other in (attention.attend_segments(query, operands, 0.125), attention.attend_dense(query, operands, 0.125)):
        torch.testing.assert_close(one.output, other.output, atol=1e-6, rtol=1e-5)
        if operands.observe:
            torch.testing.assert_close(one.observed, other.observed, atol=1e-7, rtol=1e-5)
        else:
            assert one.observed is None


@pytest.mark.parametrize("batch, heads, rep, slots", [(1, 3, 3, 300), (2, 3, 3, 77), (2, 2, 1, 5), (1, 1, 4, 40)])
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("observe", [0, 1])
def test_dense_one_pass_equals_the_segment_path_and_sdpa(batch, heads, rep, slots, holes, observe):
    """Output and observed attention of one decode query per row over a view of a buffer with spare room,
    with and without evicted-but-held slots (float32 sums in another order: atol 1e-6)."""
    torch.manual_seed(slots + rep)
    keys, values = torch.randn(2, batch, heads, slots + 9, 64)[:, :, :, :slots]
    valid = torch.rand(batch, heads, slots) > 0.3 if holes else None
    operands = Operands((DenseSegment(keys, values),), valid, heads, observe)
    _assert_one_pass_equals_the_other_paths(torch.randn(batch, heads * rep, 1, 64), operands)


@pytest.mark.parametrize("observe", [0, 1])
def test_ragged_heads_and_window_in_one_pass_equal_the_segment_path_and_sdpa(observe):
    """AdaKV's layout: heads holding different numbers of slots, each read where it is held (padding of the
    shorter heads never read), then the window with a padded row and an evicted slot."""
    torch.manual_seed(observe)
    batch, heads, rep = 2, 3, 3
    store = RaggedStore(lambda: FullPrecisionBuffer(chunk=1))
    store.append(torch.randn(batch, heads, 40, 64), torch.randn(batch, heads, 40, 64), torch.rand(batch, heads, 40) > 0.4)
    assert len(set(store.lengths().flatten().tolist())) > 1  # the heads really differ
    window_k, window_v = torch.randn(2, batch, heads, 12, 64)[:, :, :, :7]
    window_valid = torch.ones(batch, heads, 7, dtype=torch.bool)
    window_valid[0, :, 0] = False  # padding
    window_valid[1, 2, 3] = False  # evicted, still held
    valid = torch.cat([store.valid(), window_valid], -1)
    operands = Operands((store.segment(), DenseSegment(window_k, window_v)), valid, heads, observe)
    _assert_one_pass_equals_the_other_paths(torch.randn(batch, heads * rep, 1, 64), operands)


def test_dense_one_pass_declines_other_dtypes_and_two_segments():
    keys = torch.randn(1, 3, 8, 64)
    half = DenseSegment(keys.bfloat16(), keys.bfloat16())
    assert attention.attend_one_pass(torch.randn(1, 9, 1, 64).bfloat16(), Operands((half,), None, 3), 0.1) is None
    two = (DenseSegment(keys, keys), DenseSegment(keys, keys))
    assert attention.attend_one_pass(torch.randn(1, 9, 1, 64), Operands(two, None, 3), 0.1) is None


@pytest.mark.model
@pytest.mark.parametrize(
    "spec", ["h2o:budget=40,window=8,block=8", "streaming:window=48,sink=4", "tova:budget=40,block=8", "adakv:budget=40,block=8"]
)
def test_eviction_decodes_in_one_pass_and_matches_the_reference(smol, spec, monkeypatch):
    """``model.generate`` with an eviction cache takes the one-pass path at every layer of every decode
    step (H2O and TOVA scoring from its weights), evicts as it goes, and gives the logits of the reference
    path (sdpa, and observed attention from a separate pass)."""
    model, tokenizer = smol
    ids = tokenizer("Owls hunt at night and sleep through the day in hollow trees. " * 8, return_tensors="pt")["input_ids"]
    calls = []
    one = attention.dense_attend
    monkeypatch.setattr(attention, "dense_attend", lambda *a, **k: calls.append(1) or one(*a, **k))
    monkeypatch.setattr(buffer, "dense_attend", lambda *a, **k: calls.append(1) or one(*a, **k))
    scores, held = {}, {}
    for path in ("one pass", "reference"):
        cache = kvcompress.make_cache(spec, model)
        reference = attention.reference_path() if path == "reference" else contextlib.nullcontext()
        with torch.no_grad(), kvcompress.attach(model, cache), reference:
            out = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        scores[path] = torch.stack(out.scores, 1)
        held[path] = len(cache.compressed_layers[0])
    assert len(calls) == 11 * model.config.num_hidden_layers  # every decode step after the prompt, every layer
    assert held["one pass"] == held["reference"] < ids.shape[1]  # both evicted the same number of slots
    torch.testing.assert_close(scores["one pass"], scores["reference"], atol=2e-4, rtol=1e-4)
