"""Eviction bookkeeping on tensors: StreamingLLM's choice and the buffer's per-row compaction."""

import torch

from kvcompress.buffer import FullPrecisionBuffer, compaction_index
from kvcompress.methods.base import LayerView
from kvcompress.methods.streaming import StreamingLLM


def view(valid):
    """A layer view with only validity: what position-based selections need."""
    return LayerView(valid, keys=None, scores=None, layer_idx=0, num_layers=1, state={})


def test_streaming_keeps_sinks_and_recent_window_per_row():
    valid = torch.ones(2, 1, 12, dtype=torch.bool)
    valid[1, :, :5] = False  # row 1 is left-padded: its sinks are its first real tokens
    keep = StreamingLLM(window=3, sink=2).select(view(valid))
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 9, 10, 11]
    assert keep[1, 0].nonzero().flatten().tolist() == [5, 6, 9, 10, 11]


def test_streaming_keeps_everything_under_budget():
    assert StreamingLLM(window=8, sink=4).select(view(torch.ones(3, 2, 12, dtype=torch.bool))) is None


def test_compaction_index_keeps_order_and_marks_fillers_invalid():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = compaction_index(keep)
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, 0].item() == 1 and valid[1].tolist() == [True, False, False]


def test_buffer_compaction_frees_memory_and_keeps_rows():
    buf = FullPrecisionBuffer()
    k = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 1, 10, 1).expand(2, 1, 10, 4).contiguous()
    buf.append(k, -k, None)
    assert buf.nbytes == 2 * 2 * 64 * 4 * 4  # capacity rounded up to one chunk of 64 tokens
    keep = torch.zeros(2, 1, 10, dtype=torch.bool)
    keep[..., [0, 7, 9]] = True
    buf.compact(keep)
    keys, values = buf.keys_values()
    assert keys[0, 0, :, 0].tolist() == [0.0, 7.0, 9.0]
    assert keys[1, 0, :, 0].tolist() == [10.0, 17.0, 19.0]
    assert torch.equal(values, -keys)
    assert buf.valid() is None
    assert buf.nbytes == 2 * 2 * 3 * 4 * 4  # exactly the kept tokens
