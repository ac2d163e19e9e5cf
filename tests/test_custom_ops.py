"""The C kernels registered as ``torch.library`` custom ops: the registrations are sound (schema, fake
tensors, no aliasing: ``torch.library.opcheck``), and the eager call, which skips the dispatcher, gives
what the registered op gives."""

import pytest
import torch

from kvcompress import kernels
from kvcompress.paged import PagedBuffer
from kvcompress.methods.kivi import KIVI
from conftest import requires_kernels


def _kivi_tensors(bits: int, group: int = 32):
    store = KIVI(bits=bits, group=group).new_store(0, 64, torch.float32)
    store.append(torch.randn(2, 3, 4 * group, 64), torch.randn(2, 3, 4 * group, 64), None, None)
    return store.tensors


_HELD = []


def _cases():
    torch.manual_seed(0)
    query = torch.randn(2, 3, 3, 64)
    keys, values = torch.randn(2, 2, 3, 40, 64)
    allow = (torch.rand(2, 3, 40) > 0.3).to(torch.uint8)
    observed = torch.rand(2, 3, 45)[..., :40]  # a running observation in room for more slots gains the step's
    none, counts = torch.zeros(6, 0, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    yield "paged_attend window", kernels.paged_attend, (query, none, none, counts, counts, 1, 0, keys, values, allow, 0.125, observed)
    pages = PagedBuffer()  # 40 slots: a full 32-slot page and 8 in the next
    pages.append(keys, values, None)
    _HELD.append(pages)  # the pages the addresses point at live as long as the cases
    no_window = torch.empty(1, 1, 0, 1)
    yield "paged_attend", kernels.paged_attend, (
        query, *pages.pointers, *pages.segment().page_counts(), pages.page, 40, no_window, no_window, allow, 0.125, observed
    )
    npages, fills = torch.tensor([2, 1, 0, 1, 2, 2]), torch.tensor([8, 5, 0, 32, 1, 8])  # ragged heads: 40, 5, 0, 32, 33, 40 slots
    allow = torch.ones(2, 3, 40 + 40, dtype=torch.uint8)
    yield "paged_attend ragged", kernels.paged_attend, (  # each head reads the first slots of its pages, then the window
        query, *pages.pointers, npages, fills, pages.page, 40, keys, values, allow, 0.125, torch.empty(0)
    )
    t = _kivi_tensors(4)
    yield "kivi_key_logits", kernels.key_logits, (query, t["key_codes"], t["key_scale"], t["key_min"], 4, 32)
    yield "kivi_value_mix", kernels.value_mix, (torch.rand(2, 3, 3, 128), t["value_codes"], t["value_scale"], t["value_min"], 4, 32)
    store = KIVI(bits=2, group=32, sink=4).new_store(0, 64, torch.float32)
    store.append(torch.randn(2, 3, 128, 64), torch.randn(2, 3, 128, 64), None, None)
    sinks = [store.sinks[name].float().contiguous() for name in ("keys", "error")]
    _HELD.append((store, sinks))  # the pages and sinks the addresses point at live as long as the cases
    each = torch.arange(6, dtype=torch.int64) * 4 * 64 * 4  # (B * H,) a (row, head)'s sinks from the first's
    allow = torch.ones(2, 3, 128 + 40, dtype=torch.uint8)
    yield "kivi_attend_pages", kernels.kivi_attend_pages, (
        query, *store.page_table(), store.layout.offsets, 128, keys, values, sinks[0].data_ptr() + each,
        sinks[1].data_ptr() + each, 4, allow, 0.125, torch.zeros(2, 3, 128 + 40), 1, 2, 32,
    )

    logits = torch.randn(2, 3, 3, 8, 40)  # 8 queries, the last 8 of 40 slots
    allow = (torch.rand(2, 3, 8, 40) > 0.3).to(torch.uint8)
    yield "observe_rows", kernels.observe_rows, (logits, allow, torch.rand(2, 3, 8), torch.zeros(2, 3, 40))

    basis_t = torch.randn(1, 8, 3 * 64)  # one group of 3 heads, rank 8
    angle = torch.rand(50, 64)
    yield "lowrank_logits", kernels.lowrank_logits, (
        query, torch.randn(2, 1, 40, 8), basis_t, torch.randn(1, 3 * 64), torch.randint(0, 50, (2, 3, 40), dtype=torch.int32),
        angle.cos(), angle.sin(),
    )


CASES = list(_cases())


@requires_kernels
@pytest.mark.parametrize("name, call, args", CASES, ids=[c[0] for c in CASES])
def test_registered_op_is_sound_and_the_eager_call_equals_it(name, call, args):
    torch.library.opcheck(call.op, _copies(args), test_utils=("test_schema", "test_faketensor"))
    eager_args, registered_args = _copies(args), _copies(args)  # an op that writes into its arguments writes into these
    eager, registered = call(*eager_args), call.op(*registered_args)
    mine, theirs = (((o,) if isinstance(o, torch.Tensor) else o or ()) + a for o, a in ((eager, eager_args), (registered, registered_args)))
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):  # what it returned and what it wrote into its arguments
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    written = {i for i, (a, b) in enumerate(zip(eager_args, args)) if isinstance(a, torch.Tensor) and not torch.equal(a, b)}
    schema = call.op._opoverload._schema.arguments
    # it writes into every argument its schema says it mutates (unless empty: nothing to write), and no other
    assert written == {i for i, argument in enumerate(schema) if argument.alias_info is not None and args[i].numel()}


def _copies(args):
    # a copy keeps a view's layout: a view of room for more (an observation) stays one
    return tuple(_copy(a) if isinstance(a, torch.Tensor) else a for a in args)


def _copy(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t.clone()
    base = t._base.clone()
    return base.as_strided(t.shape, t.stride(), t.storage_offset())
