"""KIVI quantization: packing, error vs bits, exact bytes, block-wise freeing, attention on the codes."""

import contextlib

import pytest
import torch

from kvcompress.methods.kivi import KIVI, pack, quantize, unpack
from kvcompress.step import DenseSegment, Operands
from conftest import assert_each_path_adds_to_a_running_observation, requires_kernels


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_and_packed_size(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 2, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def _store_with(bits, keys, values, valid=None):
    store = KIVI(bits=bits, group=32).new_store(0, keys.shape[-1], keys.dtype)
    store.append(keys, values, valid, None)
    return store


def test_reconstruction_error_shrinks_with_bits():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 128, 64), torch.randn(2, 3, 128, 64)
    keys[..., 5] *= 20  # an outlier channel, the case per-channel key quantization is for
    errors = []
    for bits in (2, 4, 8):
        k, v = _store_with(bits, keys, values).keys_values()
        errors.append(((k - keys).norm() / keys.norm() + (v - values).norm() / values.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_keys_are_quantized_per_channel():
    # One channel 1000x larger: per-channel scales keep the small channels accurate.
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 32, 64)
    keys[..., 0] *= 1000
    k, _ = _store_with(4, keys, torch.randn(1, 1, 32, 64)).keys_values()
    small = (k[..., 1:] - keys[..., 1:]).abs().max()
    assert small < 0.5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nbytes_is_exact(bits):
    batch, heads, tokens, dim, group = 2, 3, 96, 64, 32
    store = _store_with(bits, torch.randn(batch, heads, tokens, dim), torch.randn(batch, heads, tokens, dim))
    codes = 2 * batch * heads * tokens * dim * bits // 8
    key_meta = 2 * batch * heads * (tokens // group) * dim * 2  # fp16 scale + min per channel per group
    value_meta = 2 * batch * heads * tokens * (dim // group) * 2  # fp16 scale + min per token per group
    table = 16 * batch * heads * (tokens // group)  # the page table: a key and a value block's address per page (a group) and head
    assert store.nbytes == codes + key_meta + value_meta + table


def test_padding_is_excluded_from_key_statistics():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 32, 64)
    valid = torch.ones(1, 1, 32, dtype=torch.bool)
    valid[..., :4] = False
    padded = keys.clone()
    padded[..., :4, :] = 1e4  # garbage in padding slots must not widen the scale
    k, _ = _store_with(4, padded, torch.randn(1, 1, 32, 64), valid).keys_values()
    assert (k[..., 4:, :] - keys[..., 4:, :]).abs().max() < 0.5


def test_compact_frees_only_whole_blocks():
    store = _store_with(4, torch.randn(1, 2, 96, 64), torch.randn(1, 2, 96, 64))
    per_block = store.nbytes // 3
    keep = torch.ones(1, 2, 96, dtype=torch.bool)
    keep[..., 32:64] = False  # the whole second block
    keep[0, 1, 70] = False  # one token of the third, in one head
    index = store.compact(keep)
    assert len(store) == 64
    assert index[0, 0].tolist() == list(range(32)) + list(range(64, 96))
    assert store.valid().sum() == 127 and not store.valid()[0, 1, 32 + 6]
    assert store.nbytes == 2 * per_block + 2 * 64  # plus the (1, 2, 64) bool validity mask


def _runs(store):
    """Each row's pages as (address, pages) per allocation: what moved and what stayed."""
    return [[(run.data_ptr(), store.layout.count(run)) for run in table] for table in store.tables]


def test_codes_are_written_in_pages_that_never_move():
    """A prompt is one allocation of pages per row, a group leaving the window one new page: pages already
    held are never copied (``moved`` stays 0), and every page read back equals the whole tensors encoded."""
    torch.manual_seed(0)
    store = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    keys, values = torch.randn(2, 3, 96, 64), torch.randn(2, 3, 96, 64)
    store.append(keys[:, :, :64], values[:, :, :64], None, None)
    prompt = _runs(store)
    assert prompt == [[(prompt[0][0][0], 2)], [(prompt[1][0][0], 2)]]  # (address, pages): one run per row
    store.append(keys[:, :, 64:], values[:, :, 64:], None, None)  # the next group
    assert _runs(store)[0][0] == prompt[0][0] and _runs(store)[1][0] == prompt[1][0] and store.pages == 3
    assert store.moved == 0
    whole = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    whole.append(keys, values, None, None)
    for name, tensor in whole.tensors.items():
        assert torch.equal(store.tensors[name], tensor), name
    layout = store.layout
    assert store.nbytes == 2 * 3 * layout.page_bytes + 16 * 2 * 3 * 3 and layout.page_bytes == 3 * layout.head_bytes  # + its table


def test_a_saved_layout_round_trips_through_pages():
    """Setting :attr:`tensors` (a saved store read back) writes pages that give the same tensors back."""
    torch.manual_seed(0)
    store = KIVI(bits=2, group=16).new_store(0, 64, torch.float32)
    store.append(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), None, None)
    saved = store.tensors
    again = KIVI(bits=2, group=16).new_store(0, 64, torch.float32)
    again.tensors = saved
    assert again.pages == 4 and all(torch.equal(again.tensors[name], t) for name, t in saved.items())
    torch.testing.assert_close(again.keys_values(), store.keys_values(), atol=0, rtol=0)


def test_an_evicted_page_is_freed_and_a_split_run_moves_once():
    """The first eviction inside a prompt's run splits it into single pages (its kept pages copied once, so
    the freed page's memory goes); a later eviction of a page frees it with nothing copied."""
    torch.manual_seed(0)
    store = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    store.append(torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64), None, None)
    page = store.layout.page_bytes
    assert store.nbytes == 4 * page + 16 * 2 * 4  # and the page table: 16 bytes per page and head
    keep = torch.ones(1, 2, 128, dtype=torch.bool)
    keep[..., 32:64] = False
    store.compact(keep)
    assert store.nbytes == 3 * page + 16 * 2 * 3 and store.moved == 3 * page and len(store.tables[0]) == 3
    held = _runs(store)
    keep = torch.ones(1, 2, 96, dtype=torch.bool)
    keep[..., :32] = False
    store.compact(keep)
    assert store.nbytes == 2 * page + 16 * 2 * 2 and store.moved == 3 * page and _runs(store)[0] == held[0][1:]


def test_repeated_rows_share_pages_until_unshared():
    """Beam search or a batch of one repeated context: rows read the same pages (the bytes once) until
    ``unshare`` gives each its own copy; the codes are unchanged either way."""
    torch.manual_seed(0)
    store = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    store.append(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), None, None)
    before = store.tensors
    store.map_batch(lambda t: t.repeat_interleave(3, dim=0))
    assert store.nbytes == 2 * store.layout.page_bytes + 16 * 3 * 3 * 2  # and the table of 3 rows, 3 heads, 2 pages
    store.unshare()
    assert store.nbytes == 3 * 2 * store.layout.page_bytes + 16 * 3 * 3 * 2 and store.moved == 2 * 2 * store.layout.page_bytes
    assert all(torch.equal(store.tensors[name], t.expand(3, *t.shape[1:])) for name, t in before.items())


def test_kivi_decode_steps_move_no_page(tiny):
    """Through the model: no decode step of ``kivi`` copies a held page of its store, while the store grows
    one page per group (what a step copies of the full-precision window is bounded by the window)."""
    import kvcompress

    cache = kvcompress.make_cache("kivi:bits=4,group=16,residual=16", tiny)
    ids = torch.randint(3, 128, (1, 100))
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        out = tiny(ids, past_key_values=cache, use_cache=True)
        layer = cache.compressed_layers[0]
        start, first = layer.store.pages, _runs(layer.store)[0][0]
        for _ in range(48):
            out = tiny(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert layer.store.pages == start + 3 and _runs(layer.store)[0][0] == first
    assert layer.store.moved == 0


def test_sinks_are_held_exactly_and_out_of_their_blocks_statistics():
    """``sink=4``: the first 4 slots read back exactly, and their outlier keys no longer widen the
    per-channel scales of the other tokens of the first block; 2 x (B, H, 4, D) fp32 more bytes."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    keys[:, :, 0] *= 50  # an attention sink's key: an outlier in every channel
    stores = {}
    for sink in (0, 4):
        stores[sink] = KIVI(bits=4, group=32, sink=sink).new_store(0, 64, torch.float32)
        stores[sink].append(keys, values, None, None)
    k, v = stores[4].keys_values()
    assert torch.equal(k[:, :, :4], keys[:, :, :4])
    torch.testing.assert_close(v[:, :, :4], values[:, :, :4])
    error = {sink: (store.keys_values()[0] - keys)[:, :, 4:32].abs().mean() for sink, store in stores.items()}
    assert error[4] < error[0] / 5  # the block's other tokens: scales of ordinary keys, not of the outlier's
    later = {sink: (store.keys_values()[0] - keys)[:, :, 32:] for sink, store in stores.items()}
    assert torch.equal(later[4], later[0])  # the next block as before
    assert stores[4].nbytes == stores[0].nbytes + 2 * 2 * 3 * 4 * 64 * 4
    stores[4].append(keys[:, :, :32], values[:, :, :32], None, None)  # a later block's first tokens are no sinks
    assert stores[4].sinks["keys"].shape[2] == 4 and torch.equal(stores[4].keys_values()[0][:, :, :4], keys[:, :, :4])


def test_sinks_leave_with_their_block():
    torch.manual_seed(0)
    store = KIVI(bits=4, group=32, sink=4).new_store(0, 64, torch.float32)
    store.append(torch.randn(1, 2, 96, 64), torch.randn(1, 2, 96, 64), None, None)
    keep = torch.ones(1, 2, 96, dtype=torch.bool)
    keep[..., 40:64] = False
    store.compact(keep)
    assert store.sinks  # the first block is held
    keep = torch.ones(1, 2, 64, dtype=torch.bool)
    keep[..., :32] = False  # the first block goes in every head
    store.compact(keep)
    assert not store.sinks and len(store) == 32


def test_sink_must_fit_in_a_group():
    with pytest.raises(ValueError, match="sink must be between 0 and group=16"):
        KIVI(bits=4, group=16, sink=17)


def test_quantize_all_invalid_group_is_finite():
    x = torch.randn(1, 4, 8)
    codes, scale, lo = quantize(x, 2, dim=1, valid=torch.zeros(1, 4, 1, dtype=torch.bool))
    assert torch.isfinite(scale).all() and torch.isfinite(lo).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim, group", [(64, 32), (64, 16), (48, 24), (96, 32)])
@pytest.mark.parametrize("rows", [3, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@requires_kernels
def test_kernel_over_codes_matches_the_dequantized_reference(bits, dim, group, rows, dtype):
    """The C kernel's logits and value mixing equal attention on dequantized keys and values, up to
    float32 sums taken in another order (logits reach ~1e3 with the outlier channel: rtol 1e-4)."""
    from kvcompress.methods.kivi import KIVISegment

    torch.manual_seed(bits + dim + rows)
    keys, values = torch.randn(2, 3, 4 * group, dim), torch.randn(2, 3, 4 * group, dim)
    keys[..., 1] *= 30  # an outlier channel
    store = KIVI(bits=bits, group=group).new_store(0, dim, dtype)  # float16 or bfloat16 scales
    store.append(keys.to(dtype), values.to(dtype), None, None)
    segment = store.segment()
    assert isinstance(segment, KIVISegment)  # the C kernel's segment
    store.dtype = torch.float32  # the reference in float32 from the same codes and scales
    ref_keys, ref_values = store.keys_values()
    query = torch.randn(2, 3, rows, dim)
    torch.testing.assert_close(segment.logits(query).float(), query @ ref_keys.transpose(-1, -2), atol=1e-3, rtol=1e-4)
    weights = torch.rand(2, 3, rows, 4 * group)
    weights[..., ::5] = 0  # masked slots
    torch.testing.assert_close(segment.mix(weights).float(), weights @ ref_values, atol=1e-4, rtol=1e-4)


@requires_kernels
def test_kernel_reads_a_store_that_grew_and_was_compacted():
    torch.manual_seed(0)
    store = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    for _ in range(3):
        store.append(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), None, None)
    keep = torch.ones(1, 3, 192, dtype=torch.bool)
    keep[..., 32:64] = False  # the second block goes in every head
    store.compact(keep)
    ref_keys, ref_values = store.keys_values()
    query, weights = torch.randn(1, 3, 3, 64), torch.rand(1, 3, 3, 160)
    segment = store.segment()
    torch.testing.assert_close(segment.logits(query), query @ ref_keys.transpose(-1, -2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(segment.mix(weights), weights @ ref_values, atol=1e-4, rtol=1e-4)  # sums of ~80


# group 8: the 8-lane tiles, which a CPU with AVX-512 takes only for groups that are not multiples of 16
@pytest.mark.parametrize("bits, group", [(2, 32), (4, 32), (4, 16), (8, 32), (4, 8), (4, 4)])  # group 4: the plain loops, no tile
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("observe", [0, 1])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("sink", [0, 4])
@requires_kernels
def test_one_pass_equals_the_segment_and_reference_paths(bits, group, holes, observe, window, sink):
    """A decode step over [codes | window] in one kernel call (``kivi_attend_pages``, through the store's page table) gives the output and the
    observed attention of the segment path and of sdpa on dequantized keys and values, exact sinks
    included (float32 sums in another order: atol 1e-5)."""
    from kvcompress.attention import attend_dense, attend_one_pass, attend_segments

    torch.manual_seed(bits + group + window)
    batch, heads, rep, stored = 2, 3, 3, 4 * group
    store = KIVI(bits=bits, group=group, sink=sink).new_store(0, 64, torch.float32)
    keys = torch.randn(batch, heads, stored, 64)
    keys[:, :, 0] *= 20  # an attention-sink-like outlier
    store.append(keys, torch.randn(batch, heads, stored, 64), None, None)
    assert bool(store.sinks) == bool(sink)
    buffer_k, buffer_v = torch.randn(2, batch, heads, 16, 64)  # a window is a view of a buffer with spare room
    segments = (store.segment(), DenseSegment(buffer_k[:, :, :window], buffer_v[:, :, :window])) if window else (store.segment(),)
    valid = torch.rand(batch, heads, stored + window) > 0.3 if holes else None
    operands = Operands(segments, valid, heads, observe)
    query = torch.randn(batch, heads * rep, 1, 64)
    one = attend_one_pass(query, operands, 0.125)
    assert one is not None  # the kernel applies to these operands
    for other in (attend_segments(query, operands, 0.125), attend_dense(query, operands, 0.125)):
        torch.testing.assert_close(one.output, other.output, atol=1e-5, rtol=1e-5)
        if observe:
            torch.testing.assert_close(one.observed, other.observed, atol=1e-6, rtol=1e-5)
        else:
            assert one.observed is None
    if observe:
        assert_each_path_adds_to_a_running_observation(query, operands, one.observed)


@pytest.mark.parametrize("observe", [0, 1])
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("sink", [0, 4])
@requires_kernels
def test_ragged_heads_in_one_call_equal_the_segment_and_reference_paths(observe, holes, sink):
    """Heads that each hold their own number of KIVI codes (``adakv+kivi``, per-head budgets) are read in one
    kernel call per layer (``kivi_attend_pages``, each head through its own page table), padding to the longest head weighted 0: the output and
    observed attention of the segment path and of sdpa on dequantized keys and values (atol 1e-5)."""
    from kvcompress.attention import attend_dense, attend_one_pass, attend_segments
    from kvcompress.ragged import RaggedSegment
    from kvcompress.methods import kivi

    torch.manual_seed(observe + 2 * holes)
    batch, heads, rep, group, window = 2, 3, 3, 16, 5
    lengths = [[4, 1, 2], [3, 4, 1]]  # groups per (row, head)
    stored = 4 * group
    segments = []
    for row in lengths:
        segments.append([])
        for n in row:
            store = KIVI(bits=4, group=group, sink=sink).new_store(0, 64, torch.float32)
            keys = torch.randn(1, 1, n * group, 64)
            keys[:, :, 0] *= 20  # an attention-sink-like outlier
            store.append(keys, torch.randn(1, 1, n * group, 64), None, None)
            segments[-1].append(store.segment())
    held = torch.tensor(lengths).mul(group)[..., None] > torch.arange(stored)  # (B, H, stored): padding is not held
    valid = torch.cat([held & (torch.rand(batch, heads, stored) > 0.3 if holes else held),
                       torch.ones(batch, heads, window, dtype=torch.bool)], 2)
    window_kv = DenseSegment(torch.randn(batch, heads, window, 64), torch.randn(batch, heads, window, 64))
    operands = Operands((RaggedSegment(segments, stored), window_kv), valid, heads, observe)
    query = torch.randn(batch, heads * rep, 1, 64)
    calls, ragged = [], kivi.kivi_attend_pages
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kivi, "kivi_attend_pages", lambda *a, **k: calls.append(len(a[1])) or ragged(*a, **k))
        one = attend_one_pass(query, operands, 0.125)
    assert one is not None and calls == [batch * heads]  # every head of the layer in one call
    for other in (attend_segments(query, operands, 0.125), attend_dense(query, operands, 0.125)):
        torch.testing.assert_close(one.output, other.output, atol=1e-5, rtol=1e-5)
        if observe:
            torch.testing.assert_close(one.observed, other.observed, atol=1e-6, rtol=1e-5)
    if observe:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kivi, "kivi_attend_pages", lambda *a, **k: calls.append(len(a[1])) or ragged(*a, **k))
            assert_each_path_adds_to_a_running_observation(query, operands, one.observed)
        assert calls == [batch * heads] * 2  # the one-pass path took the ragged kernel again


@requires_kernels  # without the kernels every call declines
def test_one_pass_declines_what_it_does_not_compute():
    """Several queries per row, a second stored segment, or bfloat16 windows go to the segment path."""
    from kvcompress.attention import attend_one_pass

    store = KIVI(bits=4, group=32).new_store(0, 64, torch.float32)
    store.append(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), None, None)
    window = DenseSegment(torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64))
    assert attend_one_pass(torch.randn(1, 9, 2, 64), Operands((store.segment(), window), None, 3), 0.1) is None
    assert attend_one_pass(torch.randn(1, 9, 1, 64), Operands((window, store.segment()), None, 3), 0.1) is None
    half = DenseSegment(torch.randn(1, 3, 4, 64).bfloat16(), torch.randn(1, 3, 4, 64).bfloat16())
    assert attend_one_pass(torch.randn(1, 9, 1, 64), Operands((store.segment(), half), None, 3), 0.1) is None


@requires_kernels
@pytest.mark.model
@pytest.mark.parametrize("spec", ["kivi:bits=4,residual=32", "snapkv:ratio=0.5,window=8+kivi:bits=2,residual=32"])
def test_decoding_through_the_model_reads_codes_in_one_pass_and_matches_the_reference(smol, spec, monkeypatch):
    """Greedy decoding with ``model.generate`` takes the one-pass path at every layer of every decode step,
    and gives the logits of the plain-PyTorch reference path (dequantized keys and values, sdpa)."""
    import kvcompress
    from kvcompress.attention import reference_path
    from kvcompress.methods.kivi import KIVISegment

    model, tokenizer = smol
    ids = tokenizer("Tides rise and fall twice a day as the moon pulls on the oceans. " * 12, return_tensors="pt")["input_ids"]
    calls = []
    one = KIVISegment.attend_one
    monkeypatch.setattr(KIVISegment, "attend_one", lambda self, *a, **k: calls.append(1) or one(self, *a, **k))
    scores = {}
    for path in ("one pass", "reference"):
        cache = kvcompress.make_cache(spec, model)
        reference = reference_path() if path == "reference" else contextlib.nullcontext()
        with torch.no_grad(), kvcompress.attach(model, cache), reference:
            out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        scores[path] = torch.stack(out.scores, 1)
    layers = model.config.num_hidden_layers
    assert len(calls) == 5 * layers  # every decode step after the prompt, every layer
    torch.testing.assert_close(scores["one pass"], scores["reference"], atol=2e-4, rtol=1e-4)
