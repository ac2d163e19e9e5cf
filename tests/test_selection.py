"""Eviction bookkeeping on tensors: StreamingLLM's choice and the buffer's per-row compaction."""

from types import SimpleNamespace

import torch

from kvcompress.buffer import FullPrecisionBuffer, compaction_index
from kvcompress.methods.streaming import StreamingLLM
from kvcompress.protocols import LayerView
from conftest import requires_kernels


def view(valid):
    """A layer view with only validity: what position-based selections need."""
    return LayerView(valid, None, None, None, None, layer_idx=0, num_layers=1, dense=lambda: (None, None))


def test_streaming_keeps_sinks_and_recent_window_per_row():
    valid = torch.ones(2, 1, 12, dtype=torch.bool)
    valid[1, :, :5] = False  # row 1 is left-padded: its sinks are its first real tokens
    keep = StreamingLLM(window=3, sink=2).select(view(valid)).keep
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 9, 10, 11]
    assert keep[1, 0].nonzero().flatten().tolist() == [5, 6, 9, 10, 11]


def test_streaming_keeps_everything_under_budget():
    assert StreamingLLM(window=8, sink=4).select(view(torch.ones(3, 2, 12, dtype=torch.bool))).keep is None


def test_compaction_index_keeps_order_and_marks_fillers_invalid():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = compaction_index(keep)
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, 0].item() == 1 and valid[1].tolist() == [True, False, False]


def test_buffer_compaction_frees_memory_and_keeps_rows():
    buf = FullPrecisionBuffer()
    k = torch.arange(2 * 200, dtype=torch.float32).reshape(2, 1, 200, 1).expand(2, 1, 200, 4).contiguous()
    buf.append(k, -k, None)
    assert buf.nbytes == 2 * 2 * 256 * 4 * 4  # capacity rounded up to chunks of 64 tokens
    keep = torch.zeros(2, 1, 200, dtype=torch.bool)
    keep[..., [0, 7, 9]] = True
    buf.compact(keep)
    keys, values = buf.keys_values()
    assert keys[0, 0, :, 0].tolist() == [0.0, 7.0, 9.0]
    assert keys[1, 0, :, 0].tolist() == [200.0, 207.0, 209.0]
    assert torch.equal(values, -keys)
    assert buf.valid() is None
    assert buf.nbytes == 2 * 2 * 64 * 4 * 4  # freed down to one chunk for the 3 kept tokens


def test_buffer_compaction_in_place_reuses_storage_that_fits():
    buf = FullPrecisionBuffer()
    k = torch.arange(60, dtype=torch.float32).reshape(1, 1, 60, 1).expand(1, 1, 60, 4).contiguous()
    buf.append(k, -k, None)
    storage = buf.k.data_ptr()
    keep = torch.ones(1, 1, 60, dtype=torch.bool)
    keep[..., 5] = False
    buf.compact(keep, in_place=True)  # 59 tokens still need the same 64-token chunk
    assert buf.k.data_ptr() == storage and len(buf) == 59
    assert buf.keys_values()[0][0, 0, :, 0].tolist() == [float(i) for i in range(60) if i != 5]
    view = buf.keys_values()[0]  # what attention holds while the layer compacts (not in place)
    before = view.clone()
    keep = torch.ones(1, 1, 59, dtype=torch.bool)
    keep[..., 0] = False
    buf.compact(keep)
    assert torch.equal(view, before)  # the view still reads the tokens it was taken on
    assert buf.keys_values()[0][0, 0, :, 0].tolist() == [float(i) for i in range(1, 60) if i != 5]


def test_one_slot_over_budget_drops_what_the_ranking_drops():
    """The sort-free path of a head one slot over its budget (every decode step of H2O and TOVA) drops the
    slot ``rank(scores) < budget`` drops: the lowest score, the newest of equal ones, never a protected
    slot, nothing in a head within its budget."""
    from kvcompress.methods.budgets import Uniform, rank

    torch.manual_seed(0)
    for trial in range(200):
        scores = torch.randint(0, 4, (2, 3, 12)).float()  # few values: many ties
        valid = torch.rand(2, 3, 12) > 0.2
        protected = valid & (torch.rand(2, 3, 12) > 0.7)
        if trial % 10 == 0:
            protected = valid.clone()  # every valid slot protected: nothing can go
        scores = scores.masked_fill(~valid, -torch.inf).masked_fill(protected, torch.inf)
        budget = valid.sum(-1, keepdim=True) - torch.randint(0, 2, (2, 3, 1))  # over by one or not at all
        expected = protected | (valid & (rank(scores) < budget))
        assert torch.equal(Uniform().keep(scores, valid, protected, budget), expected)


@requires_kernels
def test_the_c_scan_drops_what_the_ranking_drops():
    """``drop_lowest`` (one C scan per layer, H2O's and TOVA's decode step) keeps what ranking keeps: the
    lowest score outside the first ``sink`` and newest ``recent`` valid slots, the newest of equal ones,
    per head and per budget; it declines (the caller ranks) when a head is more than one slot over."""
    from kvcompress.kernels import drop_lowest
    from kvcompress.methods.budgets import rank

    torch.manual_seed(1)
    dropped = 0
    for trial in range(300):
        slots, sink = 16, trial % 3
        scores = torch.randint(0, 4, (2, 3, slots)).float()  # few values: many ties
        valid = torch.rand(2, 3, slots) > 0.2
        count = valid.sum(-1, keepdim=True)
        recent = torch.randint(0, 6, (2, 3, 1))
        budget = count - torch.randint(0, 2, (2, 3, 1))  # over by one or not at all
        age = valid.cumsum(-1) - 1
        protected = valid & ((age < sink) | (age >= count - recent))
        ranked = scores.masked_fill(~valid, -torch.inf).masked_fill(protected, torch.inf)
        expected = protected | (valid & (rank(ranked) < budget))
        answered, keep = drop_lowest(scores, valid, budget, recent, sink)
        assert answered
        assert torch.equal(valid if keep is None else keep, expected)
        dropped += int((valid & ~expected).sum())
    assert dropped > 300  # the cases really drop slots
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    assert drop_lowest(torch.rand(1, 2, 8), valid, torch.tensor([[[8], [5]]]), torch.ones(1, 2, 1), 0) == (False, None)


def test_streaming_decode_step_keeps_what_its_age_rule_keeps():
    """StreamingLLM's decode step (one C scan) keeps the first ``sink`` and the newest ``window`` valid
    slots of every head, as its age rule does, with evicted-but-held slots anywhere and heads over by
    one or not at all; several tokens over (a prompt) takes the age rule itself."""
    torch.manual_seed(2)
    dropped = 0
    for trial in range(200):
        sink, window = trial % 3, 4 + trial % 5
        valid = torch.rand(2, 3, 20) > 0.3
        count = valid.sum(-1, keepdim=True)
        over = torch.randint(0, 2, (2, 3, 1))  # heads over by one or not at all
        valid &= valid.cumsum(-1) <= torch.minimum(count, torch.tensor(sink + window) + over)  # trim to at most +1
        count = valid.sum(-1, keepdim=True)
        age = valid.cumsum(-1) - 1
        expected = valid & ((age < sink) | (age >= count - window))
        held = torch.zeros(2, 3, 27, dtype=torch.bool)
        held[..., :20] = valid  # also read in place, as a view of a buffer's mask with spare capacity
        views = (valid, expected), (held[..., :20], expected), (held[:1, :1, :20], expected[:1, :1]), (held[:, 1:2, :20], expected[:, 1:2])
        for given, want in views:
            keep = StreamingLLM(window=window, sink=sink).select(SimpleNamespace(valid=given)).keep
            assert torch.equal(given if keep is None else keep, want)
        dropped += int((valid & ~expected).sum())
    assert dropped > 100
    valid = torch.ones(1, 2, 30, dtype=torch.bool)  # 30 tokens, 4 + 8 kept
    keep = StreamingLLM(window=8, sink=4).select(SimpleNamespace(valid=valid)).keep
    assert keep.sum(-1).tolist() == [[12, 12]] and keep[0, 0, :4].all() and keep[0, 0, -8:].all()
