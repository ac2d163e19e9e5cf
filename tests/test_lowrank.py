"""Low-rank K/V: reconstruction vs rank, latent-space attention, exact bytes, composition.

Tensor tests use a random 2-layer Llama (``tiny``) for its rotary embedding and calibration; model
tests use the default model and its default calibration (built once into the user cache).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import kvcompress
from kvcompress.attention import allowed, attend_segments, reference_path
from kvcompress.buffer import FullPrecisionBuffer
from kvcompress.calibration import Calibration, Rotary, _moments
from kvcompress.methods.lowrank import LayerBasis, LowRank, LowRankStore, principal
from kvcompress.models import cache_kwarg, model_identity
from kvcompress.registry import SpecError, parse_spec
from kvcompress.step import DenseSegment, Operands
from conftest import requires_kernels

H, D = 2, 32  # the tiny model's KV heads and head dim


def _data(tokens=256, seed=0):
    """``(1, H, T, D)`` keys/values with a decaying spectrum (most variance in few directions)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, H * D)
    mix = torch.linalg.qr(torch.randn(H * D, H * D, generator=g))[0]
    x = (torch.randn(tokens, H * D, generator=g) * scales) @ mix.T + 0.3
    return x.view(tokens, H, D).transpose(0, 1)[None].contiguous()  # (1, H, T, D)


def _store(tiny, keys, values, key_rank, value_rank, groups=1, sink=0, inner=None):
    """A LowRankStore with PCA bases fitted on ``keys``/``values`` themselves (pre-rotary keys)."""
    rotary = Rotary(tiny)
    positions = torch.arange(keys.shape[2])
    parts = []
    for x, rank in ((rotary.unrotate(keys, positions), key_rank), (values, value_rank)):
        mean, cov = _moments(x[0])
        mean, basis, _ = principal(mean, cov, groups)
        parts += [None, None] if rank == basis.shape[-1] else [mean, basis[..., :rank].contiguous()]
    return LowRankStore(LayerBasis(groups, *parts), rotary, inner or FullPrecisionBuffer(), sink, H)


def _positions(keys):
    return torch.arange(keys.shape[2]).expand(*keys.shape[:2], -1)


@pytest.mark.parametrize("groups", [1, H])
def test_reconstruction_error_falls_as_rank_rises(tiny, groups):
    keys, values = _data(), _data(seed=1)
    keys = Rotary(tiny).rotate(keys, torch.arange(keys.shape[2]))  # what the cache receives
    errors = []
    width = H * D // groups  # E
    for rank in (width // 16, width // 4, width // 2, width * 3 // 4):
        store = _store(tiny, keys, values, rank, rank, groups)
        store.append(keys, values, None, positions=_positions(keys))
        k, v = store.keys_values()
        errors.append(((k - keys).norm() / keys.norm() + (v - values).norm() / values.norm()).item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2


def test_full_rank_basis_rebuilds_exactly(tiny):
    """A full orthonormal basis (forced, not the identity shortcut) rebuilds to float precision."""
    keys, values = _data(), _data(seed=1)
    keys = Rotary(tiny).rotate(keys, torch.arange(keys.shape[2]))
    rotary = Rotary(tiny)
    stats = [principal(*_moments(x[0]), 1) for x in (rotary.unrotate(keys, torch.arange(256)), values)]
    store = LowRankStore(LayerBasis(1, stats[0][0], stats[0][1], stats[1][0], stats[1][1]), rotary, FullPrecisionBuffer(), 0, H)
    store.append(keys, values, None, positions=_positions(keys))
    k, v = store.keys_values()
    torch.testing.assert_close(k, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, H])
@pytest.mark.parametrize("sink", [0, 3])
def test_latent_attention_equals_attention_on_rebuilt_values(tiny, groups, sink):
    keys, values = _data(), _data(seed=1)
    store = _store(tiny, keys, values, 16 // groups, 24 // groups, groups, sink=sink)
    store.append(keys, values, None, positions=_positions(keys))
    k, v = store.keys_values()  # rebuilt; the sinks exact
    window_k, window_v = _data(5, seed=2), _data(5, seed=3)  # a full-precision window after the store
    all_k, all_v = torch.cat([k, window_k], 2), torch.cat([v, window_v], 2)
    query = torch.randn(1, 4, 3, D)  # 4 query heads over 2 KV heads, 3 queries: the window's last 3 tokens
    valid = torch.rand(1, H, all_k.shape[2], generator=torch.Generator().manual_seed(4)) > 0.3
    mask = allowed(valid, 3).repeat_interleave(2, 1)  # (1, 4, 3, S)
    reference = F.scaled_dot_product_attention(
        query, all_k.repeat_interleave(2, 1), all_v.repeat_interleave(2, 1), attn_mask=mask, scale=0.2
    )
    segment = store.segment()
    assert torch.equal(segment.keys, k) and not segment.dense_only
    ours = attend_segments(query, Operands((segment, DenseSegment(window_k, window_v)), valid, H), 0.2).output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@requires_kernels
@pytest.mark.parametrize("dim", [32, 64, 128])  # the any-D path, and the two register paths
@pytest.mark.parametrize("groups", [1, 3])
def test_logits_kernel_equals_rebuilt_rotated_keys(dim, groups):
    """``kvcompress::lowrank_logits`` (keys rebuilt and rotated token by token, never written) equals the
    logits over keys rebuilt, rotated and multiplied in torch, for latents and positions read through
    strided views (buffers with spare room), scattered positions and 5 query rows per KV head (float32:
    atol 1e-4)."""
    from kvcompress.kernels import lowrank_logits

    torch.manual_seed(dim + groups)
    batch, heads, rows, n, rank = 2, 3, 5, 37, 12
    width = heads // groups * dim  # E
    held = torch.randn(batch, groups, n + 9, rank)  # 9 spare slots: the latents are a strided view
    latent = held[:, :, :n]
    basis = torch.linalg.qr(torch.randn(groups, width, rank))[0]  # (G, E, r)
    mean = torch.randn(groups, width)
    positions = torch.randint(0, 300, (batch, heads, n + 27), dtype=torch.int32)[..., :n]  # room for 27 more
    angle = torch.arange(300)[:, None] * 10000 ** (-torch.arange(0, dim, 2) / dim)  # (P, D/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (P, D)
    query = torch.randn(batch, heads, rows, dim)
    keys = (latent @ basis.transpose(1, 2) + mean[:, None])  # (B, G, N, E)
    keys = keys.view(batch, groups, n, heads // groups, dim).transpose(2, 3).reshape(batch, heads, n, dim)
    c, s = cos[positions.long()], sin[positions.long()]
    half = dim // 2
    rotated = keys * c + torch.cat([-keys[..., half:], keys[..., :half]], -1) * s
    expected = query @ rotated.transpose(-1, -2)
    got = lowrank_logits(query, latent, basis.transpose(1, 2).contiguous(), mean, positions, cos, sin)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.model
def test_model_with_latent_values_equals_rebuilt_values(smol):
    """Attention that mixes stored values in latent space gives the logits of sdpa on rebuilt values."""
    model, tokenizer = smol
    ids = tokenizer("Rivers carry sediment to the sea, where deltas form over centuries. " * 10, return_tensors="pt")["input_ids"]
    spec = "lowrank:key_ratio=0.75,value_ratio=0.5,residual=16"
    logits = {}
    for path in ("segments", "reference"):
        cache = kvcompress.make_cache(spec, model)
        with torch.no_grad(), kvcompress.attach(model, cache), reference_path() if path == "reference" else contextlib.nullcontext():
            steps = [model(ids[:, :-8], use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1:]]
            steps.append(model(ids[:, -8:-4], use_cache=True, **{cache_kwarg(model): cache}).logits)  # several tokens
            for i in range(-4, 0):
                steps.append(model(ids[:, i:][:, :1], use_cache=True, **{cache_kwarg(model): cache}).logits)
            latent = [not layer.store.segment().dense_only for layer in cache.compressed_layers]
        assert all(latent)  # every layer stores values it mixes in latent space
        logits[path] = torch.cat(steps, 1)
    torch.testing.assert_close(logits["segments"], logits["reference"], atol=1e-4, rtol=1e-4)


def test_store_nbytes_is_exact_and_compaction_keeps_positions(tiny):
    keys, values = _data(96), _data(96, seed=1)
    store = _store(tiny, keys, values, 8, 24, sink=4)
    store.append(keys, values, None, positions=_positions(keys) + 10)
    capacity = 128  # the latent buffer reserves 64 tokens at a time
    latents = capacity * (8 + 24) * 4
    sinks = 2 * H * 4 * D * 4 + H * 4 * 8  # fp32 copies and their int64 slots
    groups = H * 8  # the int64 basis group of each head
    assert store.nbytes == latents + H * capacity * 4 + sinks + groups  # + int32 positions, as many reserved
    keep = torch.ones(1, H, 96, dtype=torch.bool)
    keep[:, 0, 50:60] = False  # head 0 drops 10 tokens, head 1 keeps them: the joint slot stays
    keep[:, :, 70:80] = False
    index = store.compact(keep)
    assert index.shape == (1, H, 86) and len(store) == 86
    assert torch.equal(store.positions, (index + 10).to(torch.int32))
    assert store.valid()[0, 0].sum() == 76 and store.valid()[0, 1].all()
    assert store.sinks.slot.tolist() == [[[0, 1, 2, 3]] * H]  # the first slots did not move
    keep = store.valid().clone()  # a selection keeps a subset of the valid slots
    keep[:, :, 1] = False
    store.compact(keep)
    assert store.sinks.slot.tolist() == [[[0, -1, 1, 2]] * H]  # sink 1 evicted, the others moved up
    # Latents in a capacity of 85 tokens rounded up to a chunk (128), int32 positions and the
    # (1, H, 85) bool mask of head 0's holes, both exact (a compaction keeps no room for more).
    assert store.nbytes == 128 * 32 * 4 + H * 85 * 4 + H * 85 + sinks + groups


def test_sinks_are_each_rows_first_tokens_in_full_precision(tiny):
    keys, values = _data(64), _data(64, seed=1)
    keys[:, :, 0] *= 30  # an attention-sink-like outlier
    keys, values = torch.cat([keys, keys.roll(3, 2)]), torch.cat([values, values.roll(3, 2)])  # row 1: 3 pads first
    valid = torch.ones(2, H, 64, dtype=torch.bool)
    valid[1, :, :3] = False
    store = _store(tiny, keys[:1], values[:1], 4, 4, sink=2)
    store.append(keys, values, valid, positions=(_positions(keys) - 3 * valid[:, :, :1].logical_not()).clamp_min(0))
    k, v = store.keys_values()
    assert torch.equal(k[0, :, :2], keys[0, :, :2]) and torch.equal(v[0, :, :2], values[0, :, :2])
    assert torch.equal(k[1, :, 3:5], keys[1, :, 3:5]) and torch.equal(v[1, :, 3:5], values[1, :, 3:5])
    torch.testing.assert_close(k[1, :, 3:], k[0, :, :-3])  # the padded row rebuilds as it does alone


def test_spec_validation_names_the_fix():
    with pytest.raises(SpecError, match=r"ratio must be in \[0, 1\)"):
        parse_spec("lowrank:ratio=1")
    with pytest.raises(SpecError, match="energy or ratios"):
        parse_spec("lowrank:energy=0.9,ratio=0.5")
    with pytest.raises(SpecError, match=r"energy must be in \(0, 1\]"):
        parse_spec("lowrank:energy=0")
    with pytest.raises(SpecError, match="stores tokens itself and cannot hand them to lowrank"):
        parse_spec("kivi:bits=4+lowrank:ratio=0.5")
    with pytest.raises(SpecError, match="at most one"):
        parse_spec("lowrank+kivi+kivi")
    assert LowRank(key_ratio=0.75).rank(torch.ones(1, 64), 0.75) == 16


def test_default_split_keeps_a_quarter_of_the_keys_and_three_quarters_of_the_values():
    """Half the dims in all, like ratio=0.5, spent where they cost least (pre-rotary keys are low-rank)."""
    assert LowRank().ratios() == (0.75, 0.25)
    assert LowRank(ratio=0.5).ratios() == (0.5, 0.5)
    assert LowRank(key_ratio=0.75).ratios() == (0.75, 0.5)  # the other side falls back on 0.5, as before
    assert LowRank(ratio=0.6, value_ratio=0.1).ratios() == (0.6, 0.1)


class _Tokenizer:
    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


def test_calibration_round_trips_and_rejects_another_model(tiny, tmp_path):
    from kvcompress.calibration import CalibrationError, calibrate

    calibration = calibrate(tiny, _Tokenizer(), "abcdefgh " * 60, tokens=512, progress=False)
    path = calibration.save(tmp_path / "tiny.safetensors")
    loaded = Calibration.load(path, tiny)
    assert loaded.identity == model_identity(tiny) and loaded.tokens == 512 - 4
    for name in ("keys_mean", "keys_cov", "values_mean", "values_cov"):
        assert torch.equal(getattr(loaded, name), getattr(calibration, name))
    other = type(tiny)(tiny.config)  # same shapes, other weights
    with pytest.raises(CalibrationError, match=r"made for another model \(weights"):
        Calibration.load(path, other)
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors", tiny)
    (tmp_path / "junk.safetensors").write_bytes(b"not a calibration")
    with pytest.raises(CalibrationError, match="not a safetensors file"):
        Calibration.load(tmp_path / "junk.safetensors", tiny)


def test_decode_steps_write_positions_in_place(tiny, tmp_path):
    """A low-rank store's positions grow in room reserved 64 slots at a time: over 100 decode steps their
    buffer is replaced only when full (it was concatenated, a copy of every position, at each step)."""
    from kvcompress.calibration import calibrate

    path = calibrate(tiny, _Tokenizer(), "abcdefgh " * 60, tokens=512, progress=False).save(tmp_path / "c.safetensors")
    cache = kvcompress.make_cache(f"lowrank:ratio=0.75,residual=8,calibration={path}", tiny)
    ids = torch.randint(3, 128, (1, 40))
    buffers = []
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        out = tiny(ids, use_cache=True, **{cache_kwarg(tiny): cache})
        for _ in range(100):
            out = tiny(out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_kwarg(tiny): cache})
            store = cache.compressed_layers[0].store
            buffers.append(store._positions.data_ptr())
            assert store.positions.shape[-1] == len(store)
    assert len(store) == 40 + 100 - 8 and 1 <= len(set(buffers)) - 1 <= 2  # grown at 64 and 128 slots
    assert torch.equal(store.positions[0, 0], torch.arange(len(store), dtype=torch.int32))


def test_lowrank_with_kivi_on_tiny_model(tiny, tmp_path):
    from kvcompress.calibration import calibrate

    path = calibrate(tiny, _Tokenizer(), "abcdefgh " * 60, tokens=512, progress=False).save(tmp_path / "c.safetensors")
    with pytest.raises(SpecError, match="group=32 must divide"):
        kvcompress.make_cache(f"lowrank:ratio=0.75,calibration={path}+kivi:bits=4", tiny)
    cache = kvcompress.make_cache(f"lowrank:ratio=0.75,residual=8,calibration={path}+kivi:bits=4,group=16,residual=0", tiny)
    ids = torch.randint(3, 128, (1, 70))
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        tiny(ids, use_cache=True, **{cache_kwarg(tiny): cache})
    layer = cache.compressed_layers[0]
    assert layer.residual == 8 and len(layer.window) == 22 and len(layer.store) == 48
    # Latents (G=1, E=64, r=16) as 4-bit KIVI: codes, key scale/min per channel per 16 tokens,
    # value scale/min per token per 16 channels; plus int32 positions (64 reserved at a time), 4 fp32 sinks
    # with int64 slots and the int64 basis group of each head.
    kivi = 2 * 48 * 16 * 4 // 8 + 2 * 3 * 16 * 2 + 2 * 48 * 1 * 2 + 3 * 16  # and KIVI's page table: 16 bytes per page (a group)
    assert layer.store.nbytes == kivi + H * 64 * 4 + 2 * H * 4 * D * 4 + H * 4 * 8 + H * 8
    assert cache.fixed_nbytes == 2 * (2 * (64 + 64 * 16) * 4) + cache.storage.rotary.nbytes


@pytest.mark.model
def test_reconstruction_of_real_keys_improves_with_rank(smol):
    """On the default model's real keys, calibrated on other text: error falls as rank rises."""
    model, tokenizer = smol
    from transformers import DynamicCache

    ids = tokenizer("Rivers carry sediment to the sea, where deltas form over centuries. " * 20, return_tensors="pt")["input_ids"]
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): reference})
    keys, values = reference.layers[10].keys, reference.layers[10].values
    errors = []
    for ratio in (0.75, 0.5, 0.25):
        storage = parse_spec(f"lowrank:ratio={ratio},sink=0").representation.prepare(model)
        store = storage.new_store(10, 64, torch.float32)
        store.append(keys, values, None, positions=_positions(keys))
        k, v = store.keys_values()
        errors.append(((k - keys).norm() / keys.norm()).item() + ((v - values).norm() / values.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors
