"""The optional kvpress adapter: clear refusals, spec parsing, and its cache path through the harness."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
from packaging.requirements import Requirement

from kvcompress.bench import kvpress_adapter
from kvcompress.bench.kvpress_adapter import KVPressMethod, KVPressUnavailable, check_kvpress, parse_press_spec
from kvcompress.bench.feed import fill_context
from kvcompress.bench.methods import resolve
from kvcompress.bench.perplexity import perplexity


INSTALLED = transformers.__version__


def _pretend(monkeypatch, kvpress_version, transformers_range):
    """kvpress installed at ``kvpress_version``, requiring ``transformers_range``; everything else real."""
    real_version, real_requirement = kvpress_adapter._installed_version, kvpress_adapter._requirement
    monkeypatch.setattr(kvpress_adapter, "_installed_version", lambda dist: kvpress_version if dist == "kvpress" else real_version(dist))
    monkeypatch.setattr(
        kvpress_adapter, "_requirement",
        lambda dist, name: Requirement(f"transformers{transformers_range}") if dist == "kvpress" else real_requirement(dist, name),
    )


def test_not_installed(monkeypatch):
    monkeypatch.setattr(kvpress_adapter, "_installed_version", lambda dist: None)
    with pytest.raises(KVPressUnavailable, match="not installed: pip install kvpress"):
        check_kvpress()


def test_transformers_out_of_range(monkeypatch):
    """kvpress 0.5.5 (the latest release) pins transformers>=4.56.0,<5.3; the installed transformers and
    kvcompress's own requirement are read from the real package metadata."""
    _pretend(monkeypatch, "0.5.5", "<5.3,>=4.56.0")
    with pytest.raises(KVPressUnavailable) as err:
        resolve("kvpress:SnapKVPress:0.5")
    message = str(err.value)
    assert f"kvpress 0.5.5 supports transformers<5.3,>=4.56.0 but transformers {INSTALLED} is installed" in message
    assert "kvcompress needs transformers<6,>=5.16" in message  # pyproject.toml's pin, as installed


def test_the_range_check_is_inclusive_at_the_installed_release(monkeypatch):
    _pretend(monkeypatch, "9.0.0", f">={INSTALLED}")
    assert check_kvpress() == "9.0.0"
    _pretend(monkeypatch, "9.0.0", f"<{INSTALLED}")
    with pytest.raises(KVPressUnavailable, match=f"but transformers {INSTALLED} is installed"):
        check_kvpress()


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("kvpress:SnapKVPress:0.5", ("SnapKVPress", {"compression_ratio": 0.5})),
        ("kvpress:SnapKVPress:0.25,window_size=32", ("SnapKVPress", {"compression_ratio": 0.25, "window_size": 32})),
        ("kvpress:KnormPress", ("KnormPress", {})),
    ],
)
def test_parse_press_spec(spec, parsed):
    assert parse_press_spec(spec) == parsed


def test_parse_press_spec_errors():
    with pytest.raises(KVPressUnavailable, match="name a press"):
        parse_press_spec("kvpress:")
    with pytest.raises(KVPressUnavailable, match="only the first parameter"):
        parse_press_spec("kvpress:SnapKVPress:window_size=3,0.5")


class _KeepEverythingPress:
    """Stands in for a kvpress press: a context manager around the prefill that compresses nothing."""

    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self, model):
        self.entered += 1
        yield


def test_press_rows_run_on_a_dynamic_cache_like_none(tiny):
    """A press that keeps everything scores exactly like ``none``; its bytes are the DynamicCache's."""
    ids = torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(0))
    press = _KeepEverythingPress()
    method = KVPressMethod("kvpress:Fake", press, ("speed", "perplexity", "retrieval"))
    got = perplexity(method, tiny, ids, context=40, tokens=8, offsets=[0, 10])
    want = perplexity(resolve("none"), tiny, ids, context=40, tokens=8, offsets=[0, 10])
    for got_window, want_window in zip(got["nll"], want["nll"]):
        assert got_window == pytest.approx(want_window, abs=1e-5)
    assert press.entered == 2  # once per window, around the context's prefill only
    cache = method.new_cache(tiny)
    fill_context(method, tiny, ids[None, :40], cache)
    layers, kv_heads, head_dim = 2, 2, 32
    assert method.nbytes(cache) == 2 * layers * kv_heads * head_dim * 40 * 4
