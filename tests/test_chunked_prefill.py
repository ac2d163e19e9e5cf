"""Chunked prefill: the context goes in chunks, compressed between them, so memory stays bounded."""

from __future__ import annotations

import math

import torch

import kvcompress
from kvcompress.generation import compressing, prefill
from kvcompress.models import cache_kwarg

FP_TOKEN = 2 * 2 * 2 * 32 * 4  # the tiny model: K and V, 2 layers, 2 KV heads, head dim 32, fp32


def _prefill(model, spec, ids, chunk):
    """Prefill ``ids`` with ``spec``; return the cache, the last logits and the bytes after each forward."""
    cache = kvcompress.make_cache(spec, model)
    history = []
    hook = model.register_forward_hook(lambda *_: history.append(cache.nbytes))
    try:
        with torch.no_grad(), kvcompress.attach(model, cache):
            logits = prefill(model, ids, torch.ones_like(ids), cache, logits_to_keep=1, chunk=chunk)
    finally:
        hook.remove()
    return cache, logits, history


def test_uncompressed_chunked_prefill_equals_one_forward(tiny):
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    whole, logits, _ = _prefill(tiny, "none", ids, None)
    chunked, chunked_logits, history = _prefill(tiny, "none", ids, 64)
    assert len(history) == 5  # 64, 64, 64, 64, 44 tokens
    torch.testing.assert_close(chunked_logits, logits, atol=1e-4, rtol=1e-4)
    keys, _ = chunked.compressed_layers[1].dense_keys_values()
    torch.testing.assert_close(keys, whole.compressed_layers[1].dense_keys_values()[0], atol=1e-4, rtol=1e-4)


def test_kivi_chunked_prefill_holds_the_compressed_context_plus_a_chunk(tiny):
    ids = torch.randint(3, 128, (1, 1024), generator=torch.Generator().manual_seed(1))
    spec = "kivi:bits=2,group=32,residual=32"
    _, _, one = _prefill(tiny, spec, ids, None)
    cache, _, history = _prefill(tiny, spec, ids, 128)
    assert history[-1] == one[-1]  # the same tokens end up quantized and in the residual
    # Between chunks: the compressed past plus at most residual + group - 1 + one chunk in full precision.
    bound = history[-1] + FP_TOKEN * (128 + 32)
    assert max(history) <= bound < FP_TOKEN * 1024 / 3
    assert cache.get_seq_length() == 1024


def test_a_ratio_budget_is_a_ratio_of_the_whole_chunked_context(tiny):
    ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(2))
    cache, _, history = _prefill(tiny, "snapkv:ratio=0.75,window=16", ids, 100)
    budget = math.ceil(600 * 0.25)  # not a quarter of the first chunk
    for layer in cache.compressed_layers:
        valid = layer.valid()
        held = layer.window.n if valid is None else int(valid[0].sum(-1).max())
        assert held == budget
    assert max(history) < FP_TOKEN * (budget + 100 + 64)  # never the whole context in full precision


def test_streaming_in_chunks_of_one_token_is_decoding(tiny):
    """A chunk of one token is a decode step: the cache ends as token-by-token feeding leaves it."""
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    chunked, logits, _ = _prefill(tiny, "streaming:sink=2,window=8", ids, 1)
    stepped = kvcompress.make_cache("streaming:sink=2,window=8", tiny)
    with torch.no_grad(), kvcompress.attach(tiny, stepped):
        for i in range(40):
            last = tiny(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(tiny): stepped}).logits
    torch.testing.assert_close(logits[:, -1], last[:, -1], atol=1e-5, rtol=1e-5)
    assert chunked.stored_tokens == stepped.stored_tokens == 10


def test_compressing_yields_after_each_chunk_and_ends_as_compress(smol):
    """``compressing`` (a server compresses a context between decode steps) is ``compress`` a chunk at a time."""
    model, tokenizer = smol
    text = "The keeper of Elm wrote every ship's name in a book of stone. " * 60
    method = "snapkv:ratio=0.5,window=16+kivi:bits=4,residual=16"
    whole = kvcompress.compress(model, tokenizer, text, method, prefill_chunk=256)
    cache = kvcompress.make_cache(method, model)
    fed = list(compressing(model, tokenizer, text, cache, prefill_chunk=256))
    tokens = whole.context[0].shape[1]
    assert fed == [min(tokens, 256 * (i + 1)) for i in range(math.ceil(tokens / 256))]
    assert cache.get_seq_length() == whole.get_seq_length() and cache.nbytes == whole.nbytes
    assert torch.equal(cache.context[0], whole.context[0])
    question = "What did the keeper write?"
    assert kvcompress.ask(model, tokenizer, cache, question, 8) == kvcompress.ask(model, tokenizer, whole, question, 8)
    stopped = kvcompress.make_cache(method, model)
    steps = compressing(model, tokenizer, text, stopped, prefill_chunk=256)
    next(steps)
    steps.close()  # a request cancelled mid-prefill: the model is left as it was
    assert model.config._attn_implementation != "kvcompress" and stopped.context is None
