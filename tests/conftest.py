"""Shared fixtures and assertions. Three tiers: tensor tests (no model), tests on the real default model (one
session-wide load), and GPU tests that skip through :func:`requires_gpu` when there is none. Tests that
compare a C kernel with its reference skip through :func:`requires_kernels` where the kernels are not built."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcompress import native
from kvcompress.attention import attend_dense, attend_one_pass, attend_segments
from kvcompress.step import Operands

# Under pytest-xdist (`-n auto`: a worker per core) each worker computes on one thread; alone, on two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core this process may run on (not the host's count), at most 4, since
    each worker loads the default model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kernels_missing() -> str:
    """Why a kernel-against-reference test cannot run here ("" when every C kernel is built)."""
    missing = [source.stem for source in sorted(native.SOURCES.glob("*.c")) if native.load(source.stem) is None]
    return (
        f"no C compiler (or KVCOMPRESS_NATIVE=0, or a failed build): the C kernels {', '.join(missing)} are not "
        f"built, so the kernel path would fall back to the reference it is compared with"
    ) if missing else ""


# CI has a compiler: there every kernel test runs, and none passes by not running.
_NO_KERNELS = _kernels_missing()
requires_kernels = pytest.mark.skipif(bool(_NO_KERNELS), reason=_NO_KERNELS or "the C kernels are built")


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


def assert_each_path_adds_to_a_running_observation(query: torch.Tensor, operands: Operands, step: torch.Tensor) -> None:
    """A layer's running observation (``Operands.observed``), a view of room for more slots as the layer
    keeps it, gains the step's observed attention ``step`` in place on every path; the room past it stays 0."""
    batch, heads, slots = step.shape
    earlier = torch.rand(batch, heads, slots)
    for path in (attend_one_pass, attend_segments, attend_dense):
        room = torch.zeros(batch, heads, slots + 5)
        room[..., :slots] = earlier
        attended = path(query, dataclasses.replace(operands, observed=room[..., :slots]), 0.125)
        assert attended.observed.data_ptr() == room.data_ptr()  # the same tensor, written in place
        torch.testing.assert_close(room[..., :slots], earlier + step, atol=1e-6, rtol=1e-5)
        assert not room[..., slots:].any()
