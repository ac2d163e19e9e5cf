"""KIVI quantization on tensors: packing, error vs bits, exact bytes, block-wise freeing."""

import pytest
import torch

from kvcompress.methods.kivi import KIVI, pack, quantize, unpack


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
    assert store.nbytes == codes + key_meta + value_meta


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


def test_quantize_all_invalid_group_is_finite():
    x = torch.randn(1, 4, 8)
    codes, scale, lo = quantize(x, 2, dim=1, valid=torch.zeros(1, 4, 1, dtype=torch.bool))
    assert torch.isfinite(scale).all() and torch.isfinite(lo).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim, group", [(64, 32), (64, 16), (48, 24), (96, 32)])
@pytest.mark.parametrize("rows", [3, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
    assert isinstance(segment, KIVISegment)  # the C kernel is built here (CI has a C compiler)
    store.dtype = torch.float32  # the reference in float32 from the same codes and scales
    ref_keys, ref_values = store.keys_values()
    query = torch.randn(2, 3, rows, dim)
    torch.testing.assert_close(segment.logits(query).float(), query @ ref_keys.transpose(-1, -2), atol=1e-3, rtol=1e-4)
    weights = torch.rand(2, 3, rows, 4 * group)
    weights[..., ::5] = 0  # masked slots
    torch.testing.assert_close(segment.mix(weights).float(), weights @ ref_values, atol=1e-4, rtol=1e-4)


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
    torch.testing.assert_close(segment.mix(weights), weights @ ref_values, atol=1e-4, rtol=1e-5)
