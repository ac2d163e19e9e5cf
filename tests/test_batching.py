"""Continuous batching's model step (kvcompress.batching): a batch of caches of different contexts,
lengths and row counts decodes as each cache does alone; and its scheduler's bookkeeping (no model)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from kvcompress import attach, make_cache
from kvcompress.batching import CacheBatch
from kvcompress.generation import prefill
from kvcompress.models import cache_kwarg
from kvcompress.scheduler import Scheduler, Sequence

METHODS = [
    "none",
    "kivi:bits=4,residual=8,group=8",
    "streaming:window=16,sink=2",
    "snapkv:ratio=0.5,window=4",
    "h2o:ratio=0.5",
    "snapkv:ratio=0.5,window=4+kivi:bits=2,residual=8,group=8",
]
LENGTHS, ROWS, STEPS = (40, 23, 71), (1, 2, 1), 12  # three contexts; the second answered twice (n=2)


@pytest.fixture(scope="module")
def hybrid():
    """A random 2-layer Gemma 3 (a sliding-window layer, then a full-attention one) with GQA."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).eval()


def _contexts(model, method: str) -> list:
    """Forks of three compressed contexts of different lengths, ``ROWS`` rows each."""
    forks = []
    generator = torch.Generator().manual_seed(1)
    for length, rows in zip(LENGTHS, ROWS):
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
        cache = make_cache(method, model)
        with attach(model, cache):
            prefill(model, ids, torch.ones_like(ids), cache, logits_to_keep=1)
        cache.context = (ids, torch.ones_like(ids))
        forks.append(cache.fork(rows))
    return forks


def _step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with attach(model, cache), torch.no_grad():
        return model(input_ids=tokens, position_ids=positions, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["tiny", "hybrid"])
def test_a_batch_of_caches_decodes_as_each_cache_alone(method, which, request):
    model = request.getfixturevalue(which)
    alone, batched = _contexts(model, method), _contexts(model, method)
    tokens = [torch.full((rows, 1), 5 + i) for i, rows in enumerate(ROWS)]
    for _ in range(STEPS):
        positions = [c.get_seq_length() for c, n in zip(alone, ROWS) for _ in range(n)]
        expected = []
        for cache, token in zip(alone, tokens):
            seen = cache.get_seq_length()
            expected.append(_step(model, cache, token, torch.full_like(token, seen)))
        batch = CacheBatch(batched)
        assert batch.batch_size == sum(ROWS)
        assert batch.positions().flatten().tolist() == positions  # each row its own
        got = _step(model, batch, torch.cat(tokens), batch.positions())
        torch.testing.assert_close(got, torch.cat(expected), atol=2e-5, rtol=1e-4)
        tokens = list(torch.cat(expected).argmax(-1, keepdim=True).split(ROWS))
    for a, b in zip(alone, batched):
        assert a.get_seq_length() == b.get_seq_length()
        assert a.nbytes == b.nbytes  # the same slots held: a batch adds nothing to a cache


def test_a_batch_takes_one_token_per_row_and_caches_of_contexts(tiny):
    forks = _contexts(tiny, "none")
    batch = CacheBatch(forks)
    with pytest.raises(ValueError, match="one token per row"):
        _step(tiny, batch, torch.ones(sum(ROWS), 2, dtype=torch.long), torch.zeros(sum(ROWS), 2, dtype=torch.long))
    with pytest.raises(ValueError, match="continue a context"):
        CacheBatch([make_cache("none", tiny)])
    with pytest.raises(ValueError, match="at least one"):
        CacheBatch([])


# ---- the scheduler: bookkeeping only -------------------------------------------------------------


def test_admission_is_first_come_within_the_rows_and_the_budget():
    scheduler = Scheduler(budget=100, max_rows=4)
    a, b, c = Sequence("a", rows=2, need=60), Sequence("b", rows=1, need=30), Sequence("c", rows=1, need=5)
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.next(used=0) is a
    scheduler.start(a)
    assert scheduler.next(used=60) is b  # 60 + 30 <= 100, 3 rows <= 4
    scheduler.start(b)
    assert scheduler.next(used=96) is None  # c would fit the rows, not the bytes: it waits
    assert scheduler.next(used=90) is c
    scheduler.start(c)
    assert scheduler.rows == 4 and [s.state for s in (a, b, c)] == ["running"] * 3
    d = Sequence("d", rows=1, need=0)
    scheduler.add(d)
    assert scheduler.next(used=0) is None  # no row left
    scheduler.finish(b)
    assert scheduler.next(used=0) is d and b.state == "finished"


def test_a_sequence_alone_always_starts_whatever_it_needs():
    scheduler = Scheduler(budget=10, max_rows=2)
    big = Sequence("big", rows=1, need=1000)
    scheduler.add(big)
    assert scheduler.next(used=0) is big


def test_preemption_stops_the_newest_until_the_rest_fit_and_they_resume_first():
    scheduler = Scheduler(budget=100, max_rows=8)
    seqs = [Sequence(name, held=40) for name in "abc"]
    for seq in seqs:
        scheduler.add(seq)
        scheduler.start(seq)
    later = Sequence("later")
    scheduler.add(later)
    victims = scheduler.to_preempt(used=120)  # 120 - 40 = 80 fits
    assert victims == [seqs[2]] and seqs[2].state == "preempted" and seqs[2].preemptions == 1
    assert list(scheduler.waiting) == [seqs[2], later]
    victims = scheduler.to_preempt(used=250)  # the oldest keeps running, even over the budget
    assert victims == [seqs[1]] and scheduler.running == [seqs[0]]
    assert list(scheduler.waiting) == [seqs[1], seqs[2], later] and scheduler.preemptions == 2
    assert Scheduler(budget=None, max_rows=8).to_preempt(used=10**12) == []
