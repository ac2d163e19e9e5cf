"""GPU tier: the shared method table on CUDA in bfloat16 (skipped without a CUDA device).

Compression off must give the logits of transformers' own cache in bfloat16 (same kernels, so the
same values up to bfloat16 rounding), a cache's bytes follow the same formulas on the device (in
fp32, which the formulas are written for), and a padded batch answers like each sequence alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from conftest import requires_gpu
from test_method_table import TABLE, _decode_logits

pytestmark = [pytest.mark.gpu, pytest.mark.model, requires_gpu]
IDS = [row.name for row in TABLE]


@pytest.fixture(scope="module")
def cuda_model():
    return kvcompress.load_model(device="cuda", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def cuda_fp32():
    return kvcompress.load_model(device="cuda", dtype=torch.float32)


@pytest.fixture(scope="module")
def cuda_prompt(cuda_model):
    _, tokenizer = cuda_model
    text = "The history of the city begins with a small harbour and a market. " * 12
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :120].cuda()


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_compression_off_equals_uncompressed_in_bfloat16(row, cuda_model, cuda_prompt):
    model, _ = cuda_model
    baseline = _decode_logits(model, DynamicCache(config=model.config), cuda_prompt, 8)[1]
    logits = _decode_logits(model, kvcompress.make_cache(row.off, model), cuda_prompt, 8)[1]
    torch.testing.assert_close(logits.float(), baseline.float(), atol=0.1, rtol=0.02)
    assert (logits.argmax(-1) == baseline.argmax(-1)).float().mean() > 0.85


@pytest.mark.parametrize("row", [r for r in TABLE if r.nbytes is not None], ids=lambda r: r.name)
def test_nbytes_equals_formula_on_cuda(row, cuda_fp32):
    model, tokenizer = cuda_fp32
    text = "The history of the city begins with a small harbour and a market. " * 12
    prompt = tokenizer(text, return_tensors="pt")["input_ids"][:, :120].cuda()
    cache = kvcompress.make_cache(row.on, model)
    _decode_logits(model, cache, prompt, 30)
    assert cache.nbytes == row.nbytes(150)


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_left_padded_batch_answers_like_each_sequence_alone_in_bfloat16(row, cuda_model):
    model, tokenizer = cuda_model
    prompts = [
        "Write one sentence about the sea. The sea is wide, the waves are tall, and the sailors " * 2,
        "List three colours: red,",
    ]
    batched = kvcompress.generate(model, tokenizer, prompts, method=row.on, max_new_tokens=8)
    alone = [kvcompress.generate(model, tokenizer, p, method=row.on, max_new_tokens=8) for p in prompts]
    assert batched[0].split()[:2] == alone[0].split()[:2]
    assert batched[1].split()[:2] == alone[1].split()[:2]
