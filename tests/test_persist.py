"""Compressed contexts kept and reused: save and reload, forks that share a context, many questions."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import kvcompress
from kvcompress.persist import CacheFileError
from kvcompress.models import cache_kwarg
from kvcompress.paged import PagedBuffer
from test_method_table import TABLE

pytestmark = pytest.mark.model

CONTEXT = (
    "The harbour town of Elm kept its records in a stone tower. The keeper, Ada Brook, wrote down every ship. "
    "In the spring of 1851 the ship Aurora arrived with a cargo of salt and a red flag. " * 3
)
QUESTIONS = ["What did the Aurora carry?", "Who was the keeper?", "Where were the records kept?"]


def _continue(model, cache, ids):
    with torch.no_grad(), kvcompress.attach(model, cache):
        return model(ids, use_cache=True, **{cache_kwarg(model): cache}).logits


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_a_reloaded_cache_continues_exactly_and_its_file_is_its_bytes(row, smol, tmp_path):
    model, tokenizer = smol
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"]
    cache = kvcompress.make_cache(row.on, model)
    _continue(model, cache, ids[:, :-6])
    path = cache.save(tmp_path / "context.kvc", tokenizer)
    loaded = kvcompress.load_cache(path, model, tokenizer)
    assert loaded.nbytes == cache.nbytes and loaded.get_seq_length() == cache.get_seq_length()
    with safe_open(str(path), framework="pt") as f:
        count = len(list(f.keys()))
    # The tensors, plus a header: a name, dtype and shape per tensor, and the metadata.
    assert cache.nbytes <= path.stat().st_size <= cache.nbytes + 256 * count + 16_000
    assert torch.equal(_continue(model, loaded, ids[:, -6:]), _continue(model, cache, ids[:, -6:]))


def test_a_context_held_for_its_question_is_not_saved_half_compressed(tiny, tmp_path):
    """A question-aware context (fed under ``deferred``) waits for the question's step to be compressed:
    saving it then is refused, and saving after the question works."""
    cache = kvcompress.make_cache("snapkv:budget=16,window=4", tiny)
    with torch.no_grad(), kvcompress.attach(tiny, cache):
        with cache.deferred():
            tiny(torch.randint(3, 128, (1, 40)), **{cache_kwarg(tiny): cache}, use_cache=True)
        with pytest.raises(RuntimeError, match="question-aware step that is not compressed yet"):
            cache.save(tmp_path / "held.kvc")
        tiny(torch.randint(3, 128, (1, 3)), **{cache_kwarg(tiny): cache}, use_cache=True)
        assert all(layer.scoring.held is None for layer in cache.compressed_layers)  # compressed with the question
        cache.save(tmp_path / "held.kvc")


def test_a_damaged_or_foreign_file_is_refused_with_the_fix(smol, tiny, tmp_path):
    model, tokenizer = smol
    cache = kvcompress.compress(model, tokenizer, CONTEXT, "kivi:bits=4")
    path = cache.save(tmp_path / "c.kvc", tokenizer)
    with pytest.raises(CacheFileError, match="no saved cache at .* `kvcompress compress --out"):
        kvcompress.load_cache(tmp_path / "missing.kvc", model)
    truncated = tmp_path / "truncated.kvc"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CacheFileError, match="damaged or truncated"):
        kvcompress.load_cache(truncated, model)
    with pytest.raises(CacheFileError, match="saved for another model"):
        kvcompress.load_cache(path, tiny)
    other = tmp_path / "other.kvc"
    kvcompress.compress(tiny, _CharTokenizer(), "abc " * 10, "none").save(other)
    with pytest.raises(CacheFileError, match="saved for another model .*layers"):
        kvcompress.load_cache(other, model)


class _CharTokenizer:
    chat_template = None
    pad_token_id = 0

    def __call__(self, texts, return_tensors=None, padding=False, padding_side="left", add_special_tokens=True):
        ids = [[ord(c) % 120 + 3 for c in t] for t in texts]
        width = max(map(len, ids))
        tensor = torch.tensor([[0] * (width - len(i)) + i for i in ids])
        return _Batch(input_ids=tensor, attention_mask=(torch.arange(width) >= width - torch.tensor([len(i) for i in ids])[:, None]).long())


class _Batch(dict):
    def to(self, device):
        return self


@pytest.mark.parametrize("spec", [
    "kivi:bits=4,residual=32", "snapkv:ratio=0.5,window=16", "lowrank:ratio=0.5,residual=32",
    "snapkv:ratio=0.5,window=16,allocation=retrieval+kivi:bits=4,residual=16,group=16,sink=4",  # ragged heads' sinks
])
def test_ask_from_a_saved_file_answers_as_generate_does(spec, smol, tmp_path):
    model, tokenizer = smol
    expected = kvcompress.generate(model, tokenizer, CONTEXT, QUESTIONS[0], method=spec, max_new_tokens=12)
    kvcompress.compress(model, tokenizer, CONTEXT, spec).save(tmp_path / "c.kvc", tokenizer)
    loaded = kvcompress.load_cache(tmp_path / "c.kvc", model, tokenizer)
    assert kvcompress.ask(model, tokenizer, loaded, QUESTIONS[0], max_new_tokens=12) == expected


@pytest.mark.parametrize("spec", ["kivi:bits=4,residual=32", "snapkv:ratio=0.5,window=16"])
def test_many_questions_share_the_context_without_copying_it(spec, smol):
    model, tokenizer = smol
    cache = kvcompress.compress(model, tokenizer, CONTEXT, spec)
    for layer in cache.compressed_layers:
        layer.trim()  # what the first fork does: the stored tokens stay, the room reserved for more is released
    held = {id(t): t.data_ptr() for layer in cache.compressed_layers for t in _tensors(layer)}
    together = kvcompress.ask(model, tokenizer, cache, QUESTIONS, max_new_tokens=10)
    alone = [kvcompress.ask(model, tokenizer, cache, q, max_new_tokens=10) for q in QUESTIONS]
    assert together == alone
    assert {id(t): t.data_ptr() for layer in cache.compressed_layers for t in _tensors(layer)} == held  # untouched
    fork = cache.fork(len(QUESTIONS))
    tables = sum(t.numel() * 8 for layer in fork.compressed_layers if isinstance(layer.window, PagedBuffer) for t in layer.window.pointers)
    assert fork.nbytes == tables and fork.get_seq_length() == cache.get_seq_length()  # nothing of its own yet but page tables
    for layer, base in zip(fork.compressed_layers, cache.compressed_layers):
        if isinstance(base.window, PagedBuffer):  # the same pages, one more reference per question
            assert layer.window.tables == [table for table in base.window.tables for _ in QUESTIONS]
        else:
            assert all(part.part is own for part, own in zip(layer.shared, base._parts()))
    with pytest.raises(RuntimeError, match="read by its forks"):
        _continue(model, cache, torch.tensor([[3, 4]]))


def _tensors(layer):
    if isinstance(layer.window, PagedBuffer):
        window = [t for table in layer.window.tables for page in table for t in layer.window.pool.data[page]]
    else:
        window = [layer.window.k, layer.window.v]
    if hasattr(layer.store, "tables"):  # KIVI's pages, and their table
        store = [run for table in layer.store.tables for run in table] + list(layer.store.pointers)
    else:
        store = list(layer.store.tensors.values()) if hasattr(layer.store, "tensors") else []
    return window + store
