"""KVzip: the replay scores the context, is never kept, and keeps what a question-agnostic window misses."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.attach import attach
from kvcompress.attention import attention_weights, peak_attention
from kvcompress.ragged import RaggedStore
from kvcompress.cache import CompressedLayer
from kvcompress.generation import prefill
from kvcompress.methods.budgets import global_budgets
from kvcompress.methods.kvzip import KVzip
from kvcompress.step import Replayed, StepInputs

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
    The replay is never kept: same tokens seen; kvzip's global budget keeps as many tokens in the whole
    model as snapkv's uniform one, spread unevenly over layers and heads, and frees what it evicts."""
    model, tokenizer = smol
    kvzip = kvcompress.compress(model, tokenizer, CONTEXT, "kvzip:ratio=0.75,window=8,chunk=64")  # 3 chunks
    snapkv = kvcompress.compress(model, tokenizer, CONTEXT, "snapkv:ratio=0.75,window=8")
    assert kvzip.get_seq_length() == snapkv.get_seq_length() == kvzip.context[0].shape[1]
    kept = torch.stack([layer.valid().sum((0, 2)) for layer in kvzip.compressed_layers])  # (L, H) tokens per head
    assert int(kept.sum()) == snapkv.stored_tokens * kept.numel()
    assert len(set(kept.sum(1).tolist())) > 1 and len(set(kept.flatten().tolist())) > 1
    assert isinstance(kvzip.compressed_layers[0].store, RaggedStore)
    assert kvzip.nbytes <= snapkv.nbytes
    assert "4721" in kvcompress.ask(model, tokenizer, kvzip, QUESTION, max_new_tokens=10)
    assert "4721" not in kvcompress.ask(model, tokenizer, snapkv, QUESTION, max_new_tokens=10)


def test_replay_scores_only_its_chunk_in_a_softmax_over_the_chunk():
    """A replay step scores only the replayed chunk's held slots: the max over the step's queries (prompt and
    chunk) and the query heads of a KV head, the softmax over the sinks, the chunk's held slots and the step's
    own tokens, not the rest of the context (Kim et al., 2025, Algorithm 1)."""
    torch.manual_seed(0)
    layer = CompressedLayer(KVzip(ratio=0.5, window=0, sink=1, allocation="uniform"))
    held, prompt, chunk, scaling = 8, 3, 4, 0.3
    keys, values = torch.randn(1, 2, held, 16), torch.randn(1, 2, held, 16)  # 2 KV heads, 2 query heads each
    layer.attend(torch.randn(1, 4, held, 16), keys, values, StepInputs(None, hold=True), scaling)
    query, new_keys = torch.randn(1, 4, prompt + chunk, 16), torch.randn(1, 2, prompt + chunk, 16)
    span = Replayed(torch.tensor([2]), torch.tensor([2 + chunk]), sink=1)
    layer.attend(query, new_keys, torch.randn(1, 2, prompt + chunk, 16), StepInputs(None, replay=span), scaling)
    read = [0, 2, 3, 4, 5]  # the sink and the chunk's held slots
    every = torch.cat([keys[:, :, read], new_keys], 2)  # (1, 2, 5 + 7, 16)
    logits = torch.einsum("bhgqd,bhsd->bhgqs", query.view(1, 2, 2, 7, 16), every) * scaling
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(7, len(read), dtype=torch.bool), causal], 1)
    weights = logits.masked_fill(~allowed, -torch.inf).softmax(-1)  # (1, 2, 2, 7, 12)
    expected = torch.zeros(1, 2, held)
    expected[..., 2:6] = weights[..., 1 : len(read)].amax((2, 3))
    torch.testing.assert_close(layer.scoring.attention, expected)


def test_global_budgets_rank_every_head_of_every_layer():
    """One ranking over the model: protected slots first (counted), invalid never, the best of the rest."""
    inf = torch.inf
    first = torch.tensor([[[inf, 0.9, 0.1, 0.2], [inf, 0.3, -inf, -inf]]])  # (1, 2, 4): layer 0, 2 heads
    second = torch.tensor([[[inf, 0.8, 0.7, 0.05], [inf, 0.01, 0.02, 0.6]]])
    average = [torch.full((1, 2, 1), 2), torch.full((1, 2, 1), 2)]  # 8 tokens in all
    got = global_budgets([first, second], average)
    assert [g.flatten().tolist() for g in got] == [[2, 1], [3, 2]]  # inf x4, then .9 .8 .7 .6


def test_global_allocation_needs_a_replay():
    with pytest.raises(ValueError, match="replay"):
        kvcompress.make_cache("snapkv:ratio=0.5,allocation=global", None)


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
        assert int(kept.sum()) == int(layer.scoring.budget.sum())  # the layer's share, spread unevenly
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
