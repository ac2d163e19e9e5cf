"""KVzip: the replay scores the context, is never kept, and keeps what a question-agnostic window misses."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.attach import attach
from kvcompress.attention import attention_weights, peak_attention
from kvcompress.buffer import RaggedStore
from kvcompress.generation import prefill

FILLER = "The history of the city begins with a small harbour and a market. Traders came from the coast to sell fish and salt. "
CONTEXT = FILLER * 2 + "The secret code is 4721. " + FILLER * 4  # 167 tokens, the fact near the start
QUESTION = "What is the secret code?"


def test_peak_attention_is_the_max_over_query_heads_and_queries():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8)  # 2 query heads per KV head
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[1, :, :3] = False  # a left-padded row
    got = peak_attention(queries, keys, valid, 0.35)
    logits = torch.einsum("bhgmd,bhsd->bhgms", queries.view(2, 2, 2, 5, 8), keys) * 0.35
    slot, own = torch.arange(9), torch.arange(4, 9)[:, None]
    allowed = (valid[:, :, None, None] & (slot <= own)) | (slot == own)  # (B, H, 1, m, S)
    weights = logits.masked_fill(~allowed, -torch.inf).softmax(-1) * valid[:, :, None, -5:, None]
    torch.testing.assert_close(got, weights.amax((2, 3)))
    torch.testing.assert_close(attention_weights(queries, keys, valid, 0.35), weights.mean(2))
    # KVzip+: per query head and slot, and per query factors weigh each weight before the maximum
    slots, rows = torch.rand(2, 4, 9), torch.rand(2, 5)
    plus = weights * slots.view(2, 2, 2, 1, 9) * rows[:, None, None, :, None]
    torch.testing.assert_close(peak_attention(queries, keys, valid, 0.35, (slots, rows)), plus.amax((2, 3)))


@pytest.mark.model
def test_replay_keeps_a_planted_fact_that_the_window_scores_lose(smol):
    """At the same budget, kvzip keeps the code; snapkv without the question (its last queries) does not.
    The replay is never kept: same tokens seen, same bytes as snapkv's cache."""
    model, tokenizer = smol
    kvzip = kvcompress.compress(model, tokenizer, CONTEXT, "kvzip:ratio=0.75,window=8,chunk=64")  # 3 chunks
    snapkv = kvcompress.compress(model, tokenizer, CONTEXT, "snapkv:ratio=0.75,window=8")
    assert kvzip.get_seq_length() == snapkv.get_seq_length() == kvzip.context[0].shape[1]
    assert kvzip.stored_tokens == snapkv.stored_tokens
    assert kvzip.nbytes == snapkv.nbytes
    assert "4721" in kvcompress.ask(model, tokenizer, kvzip, QUESTION, max_new_tokens=10)
    assert "4721" not in kvcompress.ask(model, tokenizer, snapkv, QUESTION, max_new_tokens=10)


@pytest.mark.model
def test_ragged_heads_and_kivi_compose(smol):
    """``allocation=adaptive`` stores each head apart; ``+kivi`` quantizes what the heads keep (here with
    the KVzip+ normalization)."""
    model, tokenizer = smol
    plain = kvcompress.compress(model, tokenizer, CONTEXT, "kvzip:ratio=0.75,window=8,allocation=adaptive")
    quantized = kvcompress.compress(
        model,
        tokenizer,
        CONTEXT,
        "kvzip:ratio=0.75,window=8,allocation=adaptive,plus=true+kivi:bits=4,group=16,residual=16",
    )
    for cache in (plain, quantized):
        layer = cache.compressed_layers[0]
        assert isinstance(layer.store, RaggedStore)
        kept = layer.valid().sum(-1)  # (1, H) tokens each head keeps
        assert int(kept.sum()) == int(layer.budget.sum())  # the layer's share, spread unevenly
        assert len(set(kept.flatten().tolist())) > 1
    assert quantized.nbytes < plain.nbytes


@pytest.mark.model
def test_replay_needs_the_tokenizer_and_is_question_agnostic(smol):
    model, tokenizer = smol
    cache = kvcompress.make_cache("kvzip:ratio=0.5", model)
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"]
    with attach(model, cache), pytest.raises(ValueError, match="tokenizer"):
        prefill(model, ids, torch.ones_like(ids), cache)
    with pytest.raises(ValueError, match="drop question_aware"):
        kvcompress.generate(model, tokenizer, CONTEXT, QUESTION, method="kvzip:ratio=0.5", question_aware=True)
