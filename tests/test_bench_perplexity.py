"""Perplexity through the harness: the ``none`` row is exactly a plain DynamicCache computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvcompress.bench.methods import resolve
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.texts import load_text, spread_offsets
from test_method_table import none_bytes
from kvcompress.models import cache_kwarg, model_summary

CONTEXT, TOKENS, WINDOWS = 48, 6, 2


@pytest.fixture(scope="module")
def prose_ids(smol):
    _, tokenizer = smol
    text = load_text("prose").body[:5000]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _dynamic_cache_nll(model, window: torch.Tensor) -> list[float]:
    """One forward over context + continuation with transformers' own cache: the reference."""
    ids = window[None, :-1]  # (1, C + N): the last token is only a target
    out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): DynamicCache(config=model.config)})
    logits = out.logits[0, CONTEXT:]  # (N, V): predictions of window[C + 1:]
    return F.cross_entropy(logits.float(), window[CONTEXT + 1 :], reduction="none").tolist()


def test_baseline_equals_dynamic_cache(smol, prose_ids):
    model, _ = smol
    offsets = spread_offsets(len(prose_ids), CONTEXT + TOKENS + 1, WINDOWS)
    result = perplexity(resolve("none"), model, prose_ids, CONTEXT, TOKENS, offsets)
    reference = [_dynamic_cache_nll(model, prose_ids[o : o + CONTEXT + TOKENS + 1]) for o in offsets]
    assert result["offsets"] == offsets and len(offsets) == WINDOWS
    assert [len(n) for n in result["nll"]] == [TOKENS] * WINDOWS
    for got, want in zip(result["nll"], reference):
        assert got == pytest.approx(want, abs=2e-4)
    mean = sum(map(sum, reference)) / (TOKENS * WINDOWS)
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-4)
    assert model_summary(model)["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert result["kv_bytes_after_context"] == [none_bytes(CONTEXT)] * WINDOWS and result["context_tokens"] == CONTEXT


def test_eviction_during_scoring_changes_the_result(smol, prose_ids):
    """Scoring is token by token: a window smaller than context + continuation keeps evicting while scoring."""
    model, _ = smol
    offsets = [0]
    none = perplexity(resolve("none"), model, prose_ids, CONTEXT, TOKENS, offsets)
    # The window holds the whole context, so the prefill evicts nothing; every scoring step after
    # the first attends to a cache that has dropped its oldest tokens.
    streaming = perplexity(resolve(f"streaming:sink=0,window={CONTEXT}"), model, prose_ids, CONTEXT, TOKENS, offsets)
    got, want = streaming["nll"][0], none["nll"][0]
    assert streaming["kv_bytes_after_context"] == none["kv_bytes_after_context"]  # the window holds the whole context
    assert got[0] == pytest.approx(want[0], abs=2e-4)
    assert all(g != pytest.approx(w, abs=2e-4) for g, w in zip(got[1:], want[1:]))


def test_spread_offsets():
    assert spread_offsets(100, 40, 3) == [0, 30, 60]
    assert spread_offsets(100, 100, 1) == [0]
    with pytest.raises(ValueError, match="pass a longer --text"):
        spread_offsets(10, 11, 2)
