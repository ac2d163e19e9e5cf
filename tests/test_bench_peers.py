"""transformers' QuantizedCache as ``peer:`` rows: specs, refusal without a backend, exact bytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcompress.bench import peers
from kvcompress.bench.feed import fill_context, step
from kvcompress.bench.methods import resolve
from kvcompress.bench.plot import family, method_name
from kvcompress.cli import main

# The tiny model of conftest: 2 layers, 2 KV heads of dim 32, float32.
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 32


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # optimum itself missing
        return False


@pytest.mark.parametrize(
    "spec, message",
    [
        ("peer:nope:bits=4", "unknown peer backend 'nope'"),
        ("peer:quanto:bits=3", "quanto takes bits 2, 4, not 3"),
        ("peer:hqq:size=4", "parameters are bits=<int>, group=<int>, residual=<int>"),
    ],
)
def test_bad_peer_specs_are_refused_with_what_is_valid(spec, message):
    with pytest.raises(peers.PeerUnavailable, match=message):
        peers.parse_peer_spec(spec)


def test_a_missing_backend_is_one_line_naming_the_pip_command(capsys, monkeypatch):
    monkeypatch.setitem(peers.BACKENDS, "quanto", ("kvcompress_no_such_module", "optimum-quanto", (2, 4)))
    assert main(["bench", "--methods", "none,peer:quanto:bits=4", "--contexts", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install optimum-quanto" in err


def test_peer_rows_have_their_own_name_and_family():
    assert method_name("peer:quanto:bits=2") == "peer:quanto" and family("peer:hqq:bits=4") == "peer"


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_peer_row_holds_the_bytes_of_its_codes_scales_and_residual(tiny, backend):
    if not _installed(peers.BACKENDS[backend][0]):
        pytest.skip(f"{peers.BACKENDS[backend][1]} is not installed")
    method = resolve(f"peer:{backend}:bits=4,group=32,residual=16")
    assert method.source == "peer" and method.parts == ("speed", "perplexity", "retrieval", "throughput")
    ids = torch.randint(3, 128, (1, 64))
    cache = method.new_cache(tiny)
    fill_context(method, tiny, ids, cache)
    # The context is quantized at once: 4-bit codes, and a scale and a zero point (float32) per group of 32.
    elements = 2 * LAYERS * KV_HEADS * HEAD_DIM * 64
    assert method.nbytes(cache) == elements // 2 + elements // 32 * 2 * 4
    for i in range(3):  # decode steps go to the full-precision residual
        step(tiny, cache, ids[:, i : i + 1], 64 + i)
    assert method.nbytes(cache) == elements // 2 + elements // 32 * 2 * 4 + 3 * 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
