"""Pages: the pool's bookkeeping (no tensors), full-precision pages at page boundaries, what a decode
step moves, forks that share pages, and the paged kernel against the reference."""

from __future__ import annotations

import gc

import pytest
import torch

import kvcompress
from conftest import requires_kernels
from kvcompress import attention
from kvcompress.pages import PAGE, PagePool, PoolExhausted
from kvcompress.paged import PagedBuffer, attend_pages, attend_pages_reference
from kvcompress.step import Operands


# ---- the pool: pure bookkeeping ---------------------------------------------------------------


def test_pool_counts_references_and_reuses_freed_ids():
    pool = PagePool(page=4)
    a, b = pool.allocate(2, nbytes=100)
    assert (len(pool), pool.used) == (2, 200)
    pool.share([a])
    assert pool.shared(a) and not pool.shared(b)
    assert pool.release([a, b]) == [b]  # a is still read by the fork
    assert (len(pool), pool.used) == (1, 100)
    assert pool.release([a]) == [a]
    assert pool.used == 0 and not pool.refs
    assert sorted(pool.allocate(2, nbytes=10)) == sorted([a, b])  # freed ids come back first


def test_pool_budget_is_asked_then_taken():
    pool = PagePool(budget=250)
    assert pool.can_allocate(2, 100) and not pool.can_allocate(3, 100)
    pool.allocate(2, 100)
    with pytest.raises(PoolExhausted, match="do not fit: 200 of 250 B in use"):
        pool.allocate(1, 100)
    assert len(pool) == 2 and pool.used == 200  # a refused allocation takes nothing


def test_pool_drops_a_page_data_with_its_last_reference():
    pool = PagePool()
    (page,) = pool.allocate(1, 8)
    pool.data[page] = "tensors"
    pool.share([page])
    pool.release([page])
    assert page in pool.data
    pool.release([page])
    assert page not in pool.data


# ---- full-precision pages ---------------------------------------------------------------------

B, H, D = 2, 3, 16
PAGE_BYTES = H * PAGE * 2 * D * 4  # keys and values, float32
POINTERS = 2 * 8 * H  # a key and a value address per page and head


@pytest.mark.parametrize("tokens", [1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5])
def test_pages_hold_every_token_and_exactly_their_bytes(tokens):
    keys, values = torch.randn(B, H, tokens, D), torch.randn(B, H, tokens, D)
    buffer = PagedBuffer()
    buffer.append(keys[:, :, :1], values[:, :, :1], None)  # one token, then the rest: across page boundaries
    buffer.append(keys[:, :, 1:], values[:, :, 1:], None)
    k, v = buffer.keys_values()
    assert torch.equal(k, keys) and torch.equal(v, values)
    pages = -(-tokens // PAGE)
    assert all(len(table) == pages for table in buffer.tables)
    assert buffer.nbytes == B * pages * (PAGE_BYTES + POINTERS)
    assert buffer.valid() is None and buffer.moved == 0


def test_a_page_with_no_kept_slot_is_freed_without_moving_any():
    tokens = 4 * PAGE
    buffer = PagedBuffer()
    buffer.append(torch.randn(B, H, tokens, D), torch.randn(B, H, tokens, D), None)
    keys, _ = buffer.keys_values()
    keep = torch.ones(B, H, tokens, dtype=torch.bool)
    keep[..., 4 : 2 * PAGE] = False  # the rest of the first page and the whole second: a window moving on
    index = buffer.drop(keep)
    assert buffer.moved == 0  # no key or value copied
    assert len(buffer.pool) == B * 3 and len(buffer) == 3 * PAGE
    assert torch.equal(index[0, 0], torch.cat([torch.arange(PAGE), torch.arange(2 * PAGE, 4 * PAGE)]))
    kept_keys, _ = buffer.keys_values()
    valid = buffer.valid()
    assert torch.equal(kept_keys[valid], keys[:, :, index[0, 0]][valid])
    assert int(valid[0, 0].sum()) == 4 + 2 * PAGE


def test_masked_slots_are_compacted_once_they_add_up_to_two_pages():
    tokens = 4 * PAGE
    buffer = PagedBuffer()
    keys = torch.randn(B, H, tokens, D)
    buffer.append(keys, keys, None)
    keep = torch.ones(B, H, tokens, dtype=torch.bool)
    keep[..., 1::4] = False  # a quarter of every page: no page empties
    assert buffer.drop(keep) is None and buffer.moved == 0 and len(buffer) == tokens
    keep = buffer.valid().clone()
    keep[..., 2::4] = False  # now half: two pages' worth of holes
    index = buffer.drop(keep)
    assert len(buffer) == tokens // 2 and buffer.valid() is None
    assert buffer.moved == B * (tokens // 2) * PAGE_BYTES // PAGE
    assert torch.equal(buffer.keys_values()[0], keys.gather(2, index[..., None].expand(-1, -1, -1, D)))


def test_a_fork_shares_pages_until_it_writes_one():
    tokens = 2 * PAGE + 3
    base = PagedBuffer()
    keys = torch.randn(1, H, tokens, D)
    base.append(keys, keys, None)
    fork = base.fork(copies=2)
    assert fork.nbytes == 2 * 3 * POINTERS  # its page tables only: no page of its own
    assert torch.equal(fork.keys_values()[0], keys.expand(2, -1, -1, -1))
    new = torch.randn(2, H, 1, D)
    fork.append(new, new, None)  # each row copies the shared last page before writing it
    assert fork.moved == 2 * 3 * PAGE_BYTES // PAGE
    assert fork.nbytes == 2 * PAGE_BYTES + 2 * 3 * POINTERS
    assert torch.equal(base.keys_values()[0], keys)  # the base is unchanged
    assert torch.equal(fork.keys_values()[0][:, :, -1:], new)
    fork.release()
    assert len(base.pool) == 3  # the base's pages are back to one reference each
    assert all(not base.pool.shared(page) for page in base.tables[0])


def test_a_fork_dropped_without_release_gives_its_pages_back():
    """An answer's fork is dropped when the answer is done; the pool it shares with its context (kept by a
    server for many answers) must not keep the fork's pages, nor its references to the context's."""
    base = PagedBuffer()
    keys = torch.randn(1, H, 2 * PAGE + 3, D)
    base.append(keys, keys, None)
    for _ in range(3):
        fork = base.fork(copies=2)
        fork.append(torch.randn(2, H, PAGE, D), torch.randn(2, H, PAGE, D), None)  # pages of its own
        assert len(base.pool) > 3
        del fork
        gc.collect()
        assert len(base.pool) == 3
        assert all(not base.pool.shared(page) for page in base.tables[0])


def test_repeated_rows_share_pages_until_unshared():
    """A batch that repeats one context reads its pages once; ``unshare`` gives each row its own copy,
    as distinct sequences would hold: then the bytes are the batch's, and the contents unchanged."""
    tokens = 2 * PAGE + 3
    buffer = PagedBuffer()
    keys = torch.randn(1, H, tokens, D)
    buffer.append(keys, -keys, None)
    buffer.map_batch(lambda t: t.repeat_interleave(3, dim=0))
    assert len(buffer.pool) == 3 and buffer.nbytes == 3 * PAGE_BYTES + 3 * 3 * POINTERS
    buffer.unshare()
    assert len(buffer.pool) == 9 and buffer.nbytes == 9 * (PAGE_BYTES + POINTERS)
    assert not any(buffer.pool.shared(page) for table in buffer.tables for page in table)
    assert buffer.moved == 6 * PAGE_BYTES  # two of the three rows copied their three pages
    k, v = buffer.keys_values()
    assert torch.equal(k, keys.expand(3, -1, -1, -1)) and torch.equal(v, -k)


def test_a_prompt_cut_hands_the_freed_pages_back_to_the_system(monkeypatch):
    """Freed pages stay in the C heap (resident) unless handed back: a compaction that frees at least
    TRIM_BYTES asks for it, one that frees less does not (a decode step's compaction)."""
    from kvcompress import native, paged

    calls = []
    monkeypatch.setattr(native, "trim_heap", lambda: calls.append(1))
    buffer = PagedBuffer()
    tokens = -(-paged.TRIM_BYTES // PAGE_BYTES) * 2 * PAGE  # twice the pages that make TRIM_BYTES
    buffer.append(torch.randn(1, H, tokens, D), torch.randn(1, H, tokens, D), None)
    keep = torch.zeros(1, H, tokens, dtype=torch.bool)
    keep[..., : tokens // 4] = True
    buffer.compact(keep)  # three quarters of the pages freed
    assert calls == [1] and len(buffer) == tokens // 4
    keep = torch.ones(1, H, tokens // 4, dtype=torch.bool)
    keep[..., :PAGE] = False
    buffer.compact(keep)  # one page freed
    assert calls == [1]

# ---- the kernel -------------------------------------------------------------------------------


@requires_kernels
@pytest.mark.parametrize("tokens", [1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5])
def test_paged_kernel_equals_the_reference(tokens):
    torch.manual_seed(tokens)
    buffer = PagedBuffer()
    valid = torch.rand(B, H, tokens) > 0.3
    valid[..., -1] = True  # the step's own token
    buffer.append(torch.randn(B, H, tokens, 64), torch.randn(B, H, tokens, 64), valid)
    query = torch.randn(B, 3 * H, 1, 64)
    operands = Operands((buffer.segment(),), buffer.valid(), H, observe=1)
    fast = attention.attend_one_pass(query, operands, 0.125)
    reference = attention.attend_dense(query, operands, 0.125)
    assert fast is not None
    torch.testing.assert_close(fast.output, reference.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.observed, reference.observed, atol=1e-6, rtol=1e-5)



def _random_pages(pool: PagePool, count: int, dim: int) -> list[int]:
    ids = pool.allocate(count, PAGE_BYTES)
    for page in ids:
        pool.data[page] = (torch.randn(H, PAGE, dim), torch.randn(H, PAGE, dim))
    return ids


@requires_kernels
def test_sequences_of_different_lengths_read_their_own_pages():
    """The varlen entry point: five sequences of 1, 31, 70, 33 and 0 slots, two of them reading the same
    first two pages (a shared prefix), in one kernel call; against the plain-PyTorch reference and sdpa."""
    torch.manual_seed(0)
    pool, dim = PagePool(), 64
    prefix = _random_pages(pool, 2, dim)
    tables = [_random_pages(pool, 1, dim), _random_pages(pool, 1, dim), prefix + _random_pages(pool, 1, dim), prefix, []]
    lengths = [1, PAGE - 1, 2 * PAGE + 6, PAGE + 1, 0]
    query = torch.randn(len(tables), H, 3, dim)  # three query heads per KV head
    fast = attend_pages(query, pool, tables, lengths, 0.125)
    torch.testing.assert_close(fast, attend_pages_reference(query, pool, tables, lengths, 0.125), atol=1e-5, rtol=1e-5)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        if not length:
            assert torch.equal(fast[row], torch.zeros_like(fast[row]))
            continue
        keys, values = (torch.cat([pool.data[page][i] for page in table], dim=1)[:, :length] for i in (0, 1))
        expected = torch.nn.functional.scaled_dot_product_attention(query[row], keys, values, scale=0.125)
        torch.testing.assert_close(fast[row], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit a table of 1 pages"):
        attend_pages(query[:1], pool, tables[:1], [PAGE + 1], 0.125)

# ---- in a cache ---------------------------------------------------------------------------------


def _decode(model, cache, ids, steps, part=lambda layer: layer.window):
    """Prefill ``ids``, then ``steps`` greedy tokens one at a time; the bytes the first layer's pages (its
    ``part``) moved at each step."""
    moved = []
    with torch.no_grad(), kvcompress.attach(model, cache):
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            before = part(cache.compressed_layers[0]).moved
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            moved.append(part(cache.compressed_layers[0]).moved - before)
    return moved


def test_bytes_a_decode_step_moves(tiny):
    """A sliding window drops its oldest page and moves nothing; a per-token eviction (TOVA) moves its
    kept tokens once per two pages of holes: under one page per step on average."""
    ids = torch.randint(3, 128, (1, 300))
    page_bytes = 2 * PAGE * 2 * 32 * 4  # the tiny model: 2 KV heads of 32 channels
    streaming = _decode(tiny, kvcompress.make_cache("streaming:sink=4,window=60", tiny), ids, 3 * PAGE)
    assert streaming == [0] * (3 * PAGE)
    tova = _decode(tiny, kvcompress.make_cache("tova:budget=64", tiny), ids, 6 * PAGE)
    assert 0 < sum(tova) <= len(tova) * page_bytes
    print(f"bytes moved per decode step, layer 0: streaming {max(streaming)}, tova mean {sum(tova) / len(tova):.0f} (max {max(tova)})")


def test_ragged_heads_hold_their_own_pages_and_move_under_a_page_per_step(tiny):
    """AdaKV's heads keep different numbers of tokens, each (row, head) in its own pages: a head holds only
    the pages its tokens need, and a decode step's eviction masks a slot, freeing a page it empties; a
    head gathers its kept slots once per two pages of holes: under one page per head per step on average."""
    ids = torch.randint(3, 128, (1, 300))
    cache = kvcompress.make_cache("adakv:budget=64,block=8", tiny)
    moved = _decode(tiny, cache, ids, 8 * PAGE, part=lambda layer: layer.store)
    store = cache.compressed_layers[0].store
    heads = [s for row in store.rows for s in row]
    assert all(isinstance(s, PagedBuffer) for s in heads) and len({len(s) for s in heads}) > 1
    assert all(len(s.tables[0]) == -(-len(s) // PAGE) for s in heads)  # no page beyond what its slots need
    head_page_bytes = PAGE * 2 * 32 * 4  # one head's keys and values of the tiny model
    assert sum(moved) <= len(moved) * len(heads) * head_page_bytes
    print(f"bytes moved per decode step, layer 0: adakv's heads mean {sum(moved) / len(moved):.0f} (max {max(moved)})")


def test_a_fork_of_a_long_context_holds_no_new_bytes_until_it_writes_a_page(tiny):
    ids = torch.randint(3, 128, (1, 4096))
    cache = kvcompress.make_cache("none", tiny)
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        tiny(ids, past_key_values=cache, use_cache=True)
    held = cache.nbytes
    fork = cache.fork(copies=3)
    tables = sum(layer.window.nbytes for layer in fork.compressed_layers)
    base_tables = sum(t.numel() * 8 for layer in cache.compressed_layers for t in layer.window.pointers)
    assert tables == 3 * base_tables  # its page tables only: 16 bytes per page and head, a page's 1/512
    assert cache.nbytes == held
    with torch.no_grad(), kvcompress.attach(tiny, fork):
        tiny(torch.randint(3, 128, (3, 1)), past_key_values=fork, use_cache=True)
    pages = 3 * len(fork.compressed_layers)  # 4,096 tokens end on a page boundary: one new page per row and layer
    assert fork.nbytes - sum(t.numel() * 8 for layer in fork.compressed_layers for t in layer.window.pointers) == pages * 2 * PAGE * 2 * 32 * 4
