"""Shared fixtures. Three tiers: tensor tests (no model), tests on the real default model (one
session-wide load), and GPU tests that skip through :func:`requires_gpu` when there is none."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Under pytest-xdist (`-n auto`: a worker per core) each worker computes on one thread; alone, on two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core this process may run on (not the host's count), at most 4, since
    each worker loads the default model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def smol():
    """``(model, tokenizer)`` of the default model, fp32 on CPU, loaded once per session."""
    from kvcompress import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny():
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads, head dim 32): fast, same code paths."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()
