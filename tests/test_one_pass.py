"""The one-pass decode path over float32 slots (``kvcompress::paged_attend``) against the segment path,
sdpa, and the plain-PyTorch reference through the model."""

import contextlib

import pytest
import torch

import kvcompress
from kvcompress import attention, kernels, native, paged, ragged
from kvcompress.pages import PagePool
from kvcompress.paged import PagedBuffer
from kvcompress.ragged import RaggedStore
from kvcompress.step import DenseSegment, Operands
from conftest import assert_each_path_adds_to_a_running_observation, requires_kernels


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
    if operands.observe:
        assert_each_path_adds_to_a_running_observation(query, operands, one.observed)



@requires_kernels
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


@requires_kernels
@pytest.mark.parametrize("observe", [0, 1])
def test_ragged_heads_and_window_in_one_pass_equal_the_segment_path_and_sdpa(observe):
    """AdaKV's layout: heads holding different numbers of slots, each in its own pages of 8 slots (a head's
    last page partly filled, padding of the shorter heads never read), then the window with a padded row and
    an evicted slot."""
    torch.manual_seed(observe)
    batch, heads, rep = 2, 3, 3
    pool = PagePool(page=8)
    store = RaggedStore(lambda: PagedBuffer(pool, addressed=False))
    store.append(torch.randn(batch, heads, 40, 64), torch.randn(batch, heads, 40, 64), torch.rand(batch, heads, 40) > 0.4)
    assert len(set(store.lengths().flatten().tolist())) > 1  # the heads really differ
    assert {len(s) % 8 for row in store.rows for s in row} != {0}  # some head's last page is partly filled
    window_k, window_v = torch.randn(2, batch, heads, 12, 64)[:, :, :, :7]
    window_valid = torch.ones(batch, heads, 7, dtype=torch.bool)
    window_valid[0, :, 0] = False  # padding
    window_valid[1, 2, 3] = False  # evicted, still held
    valid = torch.cat([store.valid(), window_valid], -1)
    operands = Operands((store.segment(), DenseSegment(window_k, window_v)), valid, heads, observe)
    _assert_one_pass_equals_the_other_paths(torch.randn(batch, heads * rep, 1, 64), operands)


@requires_kernels
@pytest.mark.parametrize("observe", [0, 1])
def test_a_store_in_pages_and_a_window_in_one_pass_equal_the_segment_path_and_sdpa(observe):
    """A store held in pages of 8 slots (its last page partly filled, an evicted slot masked), then the
    layer's window with a padded row (``share_layers``' unpaired layers), in one ``paged_attend`` call."""
    torch.manual_seed(observe)
    batch, heads, rep = 2, 3, 3
    store = PagedBuffer(PagePool(page=8), extents=True)
    store.append(torch.randn(batch, heads, 21, 64), torch.randn(batch, heads, 21, 64), None)
    window_k, window_v = torch.randn(2, batch, heads, 5, 64)
    valid = torch.ones(batch, heads, 21 + 5, dtype=torch.bool)
    valid[0, :, 21] = False  # padding
    valid[1, 1, 3] = False  # evicted, still held
    operands = Operands((store.segment(), DenseSegment(window_k, window_v)), valid, heads, observe)
    _assert_one_pass_equals_the_other_paths(torch.randn(batch, heads * rep, 1, 64), operands)


@requires_kernels  # without the kernels every call declines
def test_dense_one_pass_declines_other_dtypes_and_two_segments():
    keys = torch.randn(1, 3, 8, 64)
    half = DenseSegment(keys.bfloat16(), keys.bfloat16())
    assert attention.attend_one_pass(torch.randn(1, 9, 1, 64).bfloat16(), Operands((half,), None, 3), 0.1) is None
    two = (DenseSegment(keys, keys), DenseSegment(keys, keys))
    assert attention.attend_one_pass(torch.randn(1, 9, 1, 64), Operands(two, None, 3), 0.1) is None


PROMPT = "Owls hunt at night and sleep through the day in hollow trees. " * 8


def _generate_on_both_paths(smol, spec: str, prompt: str = PROMPT, new_tokens: int = 12) -> tuple:
    """``new_tokens`` greedy tokens after ``prompt`` through ``model.generate``, on the fast paths and on the
    reference path (sdpa, and observed attention from a separate pass); asserts their logits agree, returns
    both caches."""
    model, tokenizer = smol
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    scores, caches = [], []
    for path in ("one pass", "reference"):
        cache = kvcompress.make_cache(spec, model)
        reference = attention.reference_path() if path == "reference" else contextlib.nullcontext()
        with torch.no_grad(), kvcompress.attach(model, cache), reference:
            out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))
        caches.append(cache)
    torch.testing.assert_close(scores[0], scores[1], atol=2e-4, rtol=1e-4)
    return tuple(caches)


@requires_kernels
@pytest.mark.model
@pytest.mark.parametrize(
    "spec", ["h2o:budget=40,window=8,block=8", "streaming:window=48,sink=4", "tova:budget=40,block=8", "adakv:budget=40,block=8",
             "share_heads:groups=2,residual=16"]
)
def test_eviction_decodes_in_one_pass_and_matches_the_reference(smol, spec, monkeypatch):
    """``model.generate`` with an eviction cache (or merged heads in pages, ``share_heads``) takes the one-pass
    path at every layer of every decode step (H2O and TOVA scoring from its weights), evicts as it goes, and
    gives the logits of the reference path (sdpa, and observed attention from a separate pass)."""
    model, tokenizer = smol
    calls = []
    one = kernels.paged_attend
    for module in (attention, kernels, ragged, paged):  # pages alone, a window alone, ragged heads' or a store's pages and a window
        monkeypatch.setattr(module, "paged_attend", lambda *a, **k: calls.append(1) or one(*a, **k))
    caches = _generate_on_both_paths(smol, spec)
    assert len(calls) == 11 * model.config.num_hidden_layers  # every decode step after the prompt, every layer
    held = [len(cache.compressed_layers[0]) for cache in caches]
    assert held[0] == held[1]
    if not spec.startswith("share_heads"):  # merged heads keep every token
        assert held[0] < len(tokenizer(PROMPT)["input_ids"])  # both evicted the same number of slots


@pytest.mark.parametrize("observe", [-1, 300, 32])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernel", [pytest.param("C", marks=requires_kernels), "torch"])
def test_prompt_observed_in_the_same_pass_equals_sdpa_and_a_second_pass(observe, padded, kernel, monkeypatch):
    """A prompt whose queries are all observed (H2O), or the last 300 or 32 of them (SnapKV's window): the
    observed queries get their output and the attention each slot received from one chunked pass (each
    row in the C kernel, or in torch operations where it is not built), the others go to sdpa; together
    they equal sdpa's output and the separate pass of the reference, with a left-padded row and slots
    held before the step (float32: atol 1e-6)."""
    if kernel == "torch":
        monkeypatch.setattr(native, "load", lambda name: None)
    torch.manual_seed(observe + padded)
    batch, heads, rep, held, new = 2, 3, 3, 20, 400
    keys, values = torch.randn(2, batch, heads, held + new, 64)
    valid = None
    if padded:
        valid = torch.ones(batch, heads, held + new, dtype=torch.bool)
        valid[0, :, : held + 30] = False  # row 0: padding, then its prompt starts 30 tokens into the step
        valid[1, 1, 5] = False  # an evicted slot, still held
    operands = Operands((DenseSegment(keys, values),), valid, heads, observe)
    query = torch.randn(batch, heads * rep, new, 64)
    fused = attention.attend_observing(query, operands, 0.125)
    reference = attention.attend_dense(query, operands, 0.125)
    rows = slice(None) if valid is None else valid[..., -new:].repeat_interleave(rep, 1)  # padding queries' output is not used
    torch.testing.assert_close(fused.output[rows], reference.output[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.observed, reference.observed, atol=1e-6, rtol=1e-5)
    assert fused.observed.sum() > 0


@pytest.mark.model
@pytest.mark.parametrize("spec", ["h2o:budget=96", "snapkv:budget=96"])
def test_a_scored_prompt_is_observed_in_its_own_pass_and_matches_the_reference(smol, monkeypatch, spec):
    """Through ``model.generate``: a long prompt whose queries a scorer observes (all of them for H2O, the
    window for SnapKV) takes the one chunked pass at every layer, and the tokens then kept and the logits
    equal those of the reference path (sdpa, and the prompt's attention from a separate pass)."""
    model, tokenizer = smol
    prompt = PROMPT * 3
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    assert prompt_tokens > attention.SEGMENT_QUERIES
    calls = []
    fused = attention.attend_observing
    monkeypatch.setattr(attention, "attend_observing", lambda *a, **k: calls.append(1) or fused(*a, **k))
    caches = _generate_on_both_paths(smol, spec, prompt, new_tokens=4)
    kept = [[layer.state() for layer in cache.compressed_layers] for cache in caches]
    assert kept[0][0]["window.n"] < prompt_tokens  # it evicted
    assert len(calls) == model.config.num_hidden_layers  # the prompt, once per layer; decode steps go elsewhere
    for ours, theirs in zip(*kept):  # the same slots kept, the same scores
        torch.testing.assert_close(_held(ours), _held(theirs), atol=1e-4, rtol=1e-4)


def _held(state: dict) -> dict:
    """A layer's tensors, its window's keys and values cut to the slots it holds (spare room holds anything)."""
    n = state["window.n"]
    return {name: value[..., :n, :] if name in ("window.k", "window.v") else value
            for name, value in state.items() if isinstance(value, torch.Tensor)}


@requires_kernels
@pytest.mark.model
def test_ragged_kivi_heads_decode_in_one_pass_and_match_the_reference(smol, monkeypatch):
    """``adakv+kivi``: every head of a ragged layer holds its own KIVI codes; each decode step reads every
    head's codes and window slots in one kernel call per layer (no keys or values rebuilt, no call per
    head), and ``model.generate`` gives the logits of the reference path (sdpa over dequantized keys and
    values)."""
    from kvcompress.methods import kivi

    model, _ = smol
    calls, heads = [], []
    one, kernel = kivi.KIVISegment.attend_one, kivi.kivi_attend_pages
    monkeypatch.setattr(kivi.KIVISegment, "attend_one", lambda *a, **k: calls.append(1) or one(*a, **k))  # a store's heads alike
    monkeypatch.setattr(kivi, "kivi_attend_pages", lambda *a, **k: heads.append(len(a[1])) or kernel(*a, **k))
    caches = _generate_on_both_paths(smol, "adakv:budget=48,window=8,block=8+kivi:bits=4,group=16,residual=16")
    store = caches[0].compressed_layers[0].store
    assert isinstance(store, RaggedStore) and len(set(store.lengths().flatten().tolist())) > 1
    # A layer step takes this path once every head holds codes (before, a head's tokens are all in the window).
    assert len(heads) > 11 * model.config.num_hidden_layers // 2
    assert heads == [model.config.num_key_value_heads] * len(heads) and not calls
