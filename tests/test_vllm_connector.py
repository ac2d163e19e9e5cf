"""kvcompress as vLLM's compressed KV tier (:mod:`kvcompress.vllm`).

Codec and store tests are pure PyTorch and run everywhere (no vLLM). The engine tests (marker ``vllm``) run
vLLM with the connector in subprocesses (``tests/vllm_engine.py``), each under a time limit, and skip, with
the reason printed, where vLLM does not import (install it with ``pip install ".[vllm]"``; see the README)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvcompress.persist import CACHE_FORMAT
from kvcompress.vllm import FolderStore, Geometry, PageCodec, PageError, block_keys, chain_key, folder_identity, root_key
from kvcompress.vllm.importer import ImportRefused, import_context

GEOMETRY = Geometry(layers=2, heads=3, head_dim=64, block=32)


def _page(codec: PageCodec, seed: int = 0, first: bool = True):
    """A page of random keys (a few outlier sink tokens) and values; returns (bytes, key, keys, values)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(GEOMETRY.layers, GEOMETRY.heads, GEOMETRY.block, GEOMETRY.head_dim, generator=g)
    keys[:, :, :2] *= 30  # attention sinks: outlier keys
    values = torch.randn(GEOMETRY.layers, GEOMETRY.heads, GEOMETRY.block, GEOMETRY.head_dim, generator=g)
    root = root_key("model", codec.name, GEOMETRY.as_dict())
    key, parent, tokens = block_keys(root, list(range(seed, seed + 40)), GEOMETRY.block)[0]
    return codec.write(codec.encode(keys, values, first=first), key, parent, tokens, GEOMETRY), key, keys, values


@pytest.mark.parametrize("bits, bound", [(2, 0.8), (4, 0.15), (8, 0.01), (16, 0.0)])
def test_codec_round_trip_error_shrinks_with_bits(bits, bound):
    codec = PageCodec(bits=bits)
    data, key, keys, values = _page(codec)
    page, tokens = codec.read(data, key, GEOMETRY)
    decoded_keys, decoded_values = codec.decode(page, torch.float32)
    assert tokens == list(range(GEOMETRY.block))
    # errors relative to the spread of each (quantization step ~ range / 2**bits)
    assert (decoded_values - values).abs().mean() <= bound * values.std()
    assert (decoded_keys[:, :, 2:] - keys[:, :, 2:]).abs().mean() <= bound * keys[:, :, 2:].std() * (30 if bits < 16 else 1)


def test_codec_sinks_are_exact_and_out_of_the_key_statistics():
    plain, with_sinks = PageCodec(bits=4), PageCodec(bits=4, sink=2)
    errors = []
    for codec in (plain, with_sinks):
        data, key, keys, values = _page(codec)
        decoded_keys, decoded_values = codec.decode(codec.read(data, key, GEOMETRY)[0], torch.float32)
        errors.append((decoded_keys[:, :, 2:] - keys[:, :, 2:]).abs().mean())
    torch.testing.assert_close(decoded_keys[:, :, :2], keys[:, :, :2])
    torch.testing.assert_close(decoded_values[:, :, :2], values[:, :, :2], atol=1e-2, rtol=0)
    assert errors[1] < errors[0] / 5  # outlier sink keys no longer widen every channel's scale
    # only a sequence's first block keeps sinks
    later = with_sinks.encode(keys, values, first=False)
    assert "sink_keys" not in later


def test_codec_bytes_per_token_against_bf16():
    """Tensor bytes of a 128-token page (the CPU backend's block) per token, against bf16 keys and values."""
    geometry = Geometry(layers=30, heads=3, head_dim=64, block=128)
    bf16 = 2 * geometry.layers * geometry.heads * geometry.head_dim * 2
    keys = torch.randn(geometry.layers, geometry.heads, geometry.block, geometry.head_dim, dtype=torch.bfloat16)
    per_token = {}
    for bits in (2, 4, 8):
        page = PageCodec(bits=bits).encode(keys, keys, first=False)
        per_token[bits] = sum(t.numel() * t.element_size() for t in page.values()) / geometry.block
    assert per_token[4] <= bf16 / 3.5
    assert per_token[2] <= bf16 / 6
    assert per_token[8] < bf16 / 1.8


def test_hash_chain_names_a_block_and_its_whole_prefix():
    root = root_key("model", "codec", GEOMETRY.as_dict())
    a = block_keys(root, list(range(100)), 32)
    b = block_keys(root, list(range(64)) + [7] * 36, 32)
    c = block_keys(root, [5] + list(range(1, 100)), 32)
    assert len(a) == 3 and [k for k, _, _ in a[:2]] == [k for k, _, _ in b[:2]] and a[2][0] != b[2][0]
    assert all(x[0] != y[0] for x, y in zip(a, c))  # a change in block 0 changes every later key
    assert a[1][1] == a[0][0] and a[0][1] == root
    assert a[1][0] == chain_key(a[0][0], list(range(32, 64)))
    other_root = root_key("model", "another codec", GEOMETRY.as_dict())
    assert block_keys(other_root, list(range(100)), 32)[0][0] != a[0][0]
    assert block_keys(root, list(range(100)), 32, blocks=1) == a[:1]


def test_damaged_foreign_and_partial_pages_are_refused():
    codec = PageCodec(bits=4, sink=2)
    data, key, _, _ = _page(codec)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    cases = {
        "flipped byte": (bytes(flipped), key, codec, GEOMETRY),
        "truncated": (data[: len(data) - 100], key, codec, GEOMETRY),
        "header only": (data[:8], key, codec, GEOMETRY),
        "empty": (b"", key, codec, GEOMETRY),
        "another key": (data, _page(codec, seed=1)[1], codec, GEOMETRY),
        "another codec": (data, key, PageCodec(bits=2, sink=2), GEOMETRY),
        "another geometry": (data, key, codec, Geometry(2, 3, 64, 16)),
    }
    for what, (blob, wanted, reader, geometry) in cases.items():
        with pytest.raises(PageError):
            reader.read(blob, wanted, geometry)
        print(what, "refused")
    # a page renamed under the key of another one: its recorded key and chain give it away
    other, other_key, _, _ = _page(codec, seed=1)
    with pytest.raises(PageError, match="foreign"):
        codec.read(other, key, GEOMETRY)


def test_folder_store_is_bounded_and_evicts_least_recently_used(tmp_path):
    page = 1000
    store = FolderStore(tmp_path, max_bytes=10 * page)
    keys = [chain_key("00" * 32, [i]) for i in range(14)]
    for i, key in enumerate(keys[:10]):
        store.put(key, bytes([i]) * page)
        os.utime(store._path(key), ns=(i * 10**9, i * 10**9))  # distinct, increasing use times
    assert store.nbytes == 10 * page
    assert store.get(keys[0]) == bytes([0]) * page  # a use: key 0 is now the most recent
    store.put(keys[10], b"x" * page)  # over the bound: down to 90 %, least recently used first
    held = [k for k in keys[:11] if store.contains(k)]
    assert store.nbytes <= 10 * page * 9 // 10
    assert keys[0] in held and keys[10] in held and keys[1] not in held and keys[2] not in held
    assert store.get(keys[1]) is None
    store.put(keys[11], b"y" * (11 * page))  # larger than the whole bound: not stored
    assert not store.contains(keys[11])
    # writes are atomic: no temporary file is left, and a stale one is removed when the folder is listed
    assert not list(tmp_path.rglob("*.tmp"))
    stale = store._path(keys[12]).with_name(f".{keys[12]}.page.1.tmp")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    store.nbytes
    assert not stale.exists() and not store.contains(keys[12])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get("../../etc/passwd")


def test_folder_identity_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = folder_identity(tmp_path)
    assert folder_identity(tmp_path) == first  # read back from its record
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert folder_identity(tmp_path) != first
    with pytest.raises(ValueError, match="no weight files"):
        folder_identity(tmp_path / "missing")


@pytest.mark.parametrize("spec, why", [
    ("snapkv:ratio=0.5", "evicts tokens"), ("streaming:window=256+kivi:bits=4", "evicts tokens"),
    ("lowrank:ratio=0.5", "does not hold each token"), ("share_layers", "does not hold each token"),
])
def test_import_refuses_contexts_that_lack_tokens_or_plain_keys(tmp_path, spec, why):
    """Refused from the file's header, before any model is loaded."""
    from safetensors.torch import save_file

    path = tmp_path / "context.kvc"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": CACHE_FORMAT, "spec": spec})
    with pytest.raises(ImportRefused, match=why) as refused:
        import_context(path, FolderStore(tmp_path / "store"), PageCodec(), 128)
    assert "compress it with 'kivi:bits=4' or 'none'" in str(refused.value)


def test_importing_kvcompress_does_not_import_vllm():
    code = "import sys, kvcompress, kvcompress.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ engine tests (vLLM in subprocesses)

_NO_VLLM = None if importlib.util.find_spec("vllm") else 'vLLM is not installed: pip install ".[vllm]" (see the README)'
requires_vllm = pytest.mark.skipif(_NO_VLLM is not None, reason=_NO_VLLM or "")
ENGINE = Path(__file__).with_name("vllm_engine.py")
ENGINE_TIMEOUT = 480  # seconds for one engine run: startup alone is ~45-110 s on 2 cores


def _engine(tmp: Path, name: str, **options) -> dict:
    out = tmp / f"{name}.json"
    command = [sys.executable, str(ENGINE), str(out)]
    for option, value in options.items():
        command += [f"--{option.replace('_', '-')}", str(value)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    print(f"{name}: {time.time() - started:.0f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    if _NO_VLLM:
        print(f"skipped: {_NO_VLLM}")
        pytest.skip(_NO_VLLM)
    import pydoc_data.topics

    import kvcompress
    from kvcompress.generation import split_prompt

    tmp = tmp_path_factory.mktemp("vllm")
    store8 = tmp / "store8"
    # A context kvcompress compressed (kivi, 8 bits), asked after it as a 9th prompt of the 8-bit runs.
    model, tokenizer = kvcompress.load_model(device="cpu")
    text = pydoc_data.topics.topics["formatstrings"][:2500]
    cache = kvcompress.compress(model, tokenizer, text, "kivi:bits=8")
    cache.save(tmp / "context.kvc", tokenizer)
    context = cache.context[0][0].tolist()
    # what kvcompress asks after a context: the question, the end of the user turn, the assistant's header
    asked = split_prompt(tokenizer, text, "What does this text describe?")[1]
    question = tokenizer(asked, add_special_tokens=False)["input_ids"]
    (tmp / "extra.json").write_text(json.dumps([context + question]))
    first = _engine(tmp, "8bit", store=store8, bits=8, rounds=2, extra_prompts=tmp / "extra.json")
    # The first process saved that prompt's blocks under the keys the importer computes; replace them by the
    # imported context's pages, which the second process then loads.
    codec, block = PageCodec(bits=8), first["block"]
    root = root_key(folder_identity(model.config._name_or_path), codec.name, Geometry(30, 3, 64, block).as_dict())
    keys = [key for key, _, _ in block_keys(root, context, block)]
    store = FolderStore(store8)
    saved_by_vllm = [store.contains(key) for key in keys]
    for key in keys:
        store.discard(key)
    imported = import_context(tmp / "context.kvc", store, codec, block, model, tokenizer)
    del model, cache
    second = _engine(tmp, "8bit-second-process", store=store8, bits=8, rounds=2, damage_after=0, extra_prompts=tmp / "extra.json")
    four = _engine(tmp, "4bit", store=tmp / "store4", bits=4, sink=4, rounds=2)
    return first, second, four, (keys, saved_by_vllm, imported)


def _agreement(a: list[dict], b: list[dict]) -> float:
    return sum(x["tokens"] == y["tokens"] for x, y in zip(a, b)) / len(a)


@pytest.mark.vllm
@requires_vllm
def test_8bit_pages_give_the_answers_of_recompute(engine_runs):
    first = engine_runs[0]
    recompute, loaded = first["rounds"]
    block = first["block"]
    assert all(r["cached"] == 0 for r in recompute)  # a fresh store: every token computed
    assert all(r["cached"] == (r["prompt"] - 1) // block * block > 0 for r in loaded)  # every whole block but the last token's
    assert _agreement(recompute, loaded) == 1.0


@pytest.mark.vllm
@requires_vllm
def test_a_second_process_hits_what_the_first_saved_and_damaged_pages_are_misses(engine_runs):
    first, second = engine_runs[:2]
    recompute = first["rounds"][0]
    hits, after_damage = second["rounds"]
    assert all(r["cached"] > 0 for r in hits) and _agreement(recompute, hits) == 1.0  # the last prompt's from the import
    assert second["damaged"] > 0
    # a damaged page and every page after it in its prompt are misses: fewer tokens found, the same answers
    assert sum(r["cached"] for r in after_damage) < sum(r["cached"] for r in hits)
    assert _agreement(recompute, after_damage) == 1.0
    assert second["pages"] == first["pages"]  # the damaged pages were deleted and saved again


@pytest.mark.vllm
@requires_vllm
def test_4bit_pages_mostly_agree_with_recompute(engine_runs):
    recompute, loaded = engine_runs[2]["rounds"]
    assert all(r["cached"] > 0 for r in loaded)
    agreement = _agreement(recompute, loaded)
    print(f"4-bit (sink=4) greedy answers equal to recompute: {agreement:.0%} of {len(loaded)}")
    assert agreement >= 0.75


@pytest.mark.vllm
@requires_vllm
def test_an_imported_kvcompress_context_is_a_hit_with_the_answer_of_recompute(engine_runs):
    first, second, _, (keys, saved_by_vllm, imported) = engine_runs
    assert keys and all(saved_by_vllm)  # the importer's keys are the connector's
    assert imported.written == len(keys) and imported.present == 0
    recompute, from_import = first["rounds"][0][-1], second["rounds"][0][-1]
    assert from_import["cached"] == len(keys) * first["block"]
    assert len(recompute["tokens"]) > 1 and from_import["tokens"] == recompute["tokens"]
