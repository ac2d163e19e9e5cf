"""The C kernels registered as ``torch.library`` custom ops: the registrations are sound (schema, fake
tensors, no aliasing: ``torch.library.opcheck``), and the eager call, which skips the dispatcher, gives
what the registered op gives."""

import pytest
import torch

from kvcompress import attention, native
from kvcompress.methods import kivi, lowrank
from kvcompress.methods.kivi import KIVI


def _kivi_tensors(bits: int, group: int = 32):
    store = KIVI(bits=bits, group=group).new_store(0, 64, torch.float32)
    store.append(torch.randn(2, 3, 4 * group, 64), torch.randn(2, 3, 4 * group, 64), None, None)
    return store.tensors


def _cases():
    torch.manual_seed(0)
    query = torch.randn(2, 3, 3, 64)
    keys, values = torch.randn(2, 2, 3, 40, 64)
    allow = (torch.rand(2, 3, 40) > 0.3).to(torch.uint8)
    yield "dense_attend", attention.dense_attend, (query, [], [], 0, keys, values, allow, 0.125, True)
    held = [torch.randn(n, 64) for n in (5, 9, 7, 3, 9, 1)]
    allow = torch.ones(2, 3, 9 + 40, dtype=torch.uint8)
    yield "dense_attend stored", attention.dense_attend, (query, held, [h + 1 for h in held], 9, keys, values, allow, 0.125, False)
    t = _kivi_tensors(4)
    yield "kivi_key_logits", kivi.key_logits, (query, t["key_codes"], t["key_scale"], t["key_min"], 4, 32)
    yield "kivi_value_mix", kivi.value_mix, (torch.rand(2, 3, 3, 128), t["value_codes"], t["value_scale"], t["value_min"], 4, 32)
    t = _kivi_tensors(2)
    allow = torch.ones(2, 3, 128 + 40, dtype=torch.uint8)
    yield "kivi_attend", kivi.kivi_attend, (
        query, t["key_codes"], t["key_scale"], t["key_min"], t["value_codes"], t["value_scale"], t["value_min"],
        keys, values, allow, 0.125, True, 2, 32,
    )

    logits = torch.randn(2, 3, 3, 8, 40)  # 8 queries, the last 8 of 40 slots
    allow = (torch.rand(2, 3, 8, 40) > 0.3).to(torch.uint8)
    yield "observe_rows", attention.observe_rows, (logits, allow, torch.rand(2, 3, 8), torch.zeros(2, 3, 40))

    basis_t = torch.randn(1, 8, 3 * 64)  # one group of 3 heads, rank 8
    angle = torch.rand(50, 64)
    yield "lowrank_logits", lowrank.lowrank_logits, (
        query, torch.randn(2, 1, 40, 8), basis_t, torch.randn(1, 3 * 64), torch.randint(0, 50, (2, 3, 40), dtype=torch.int32),
        angle.cos(), angle.sin(),
    )


CASES = list(_cases())


@pytest.mark.parametrize("name, call, args", CASES, ids=[c[0] for c in CASES])
def test_registered_op_is_sound_and_the_eager_call_equals_it(name, call, args):
    if any(native.load(name) is None for name in ("dense", "kivi", "lowrank")):
        pytest.skip("no C compiler: the kernels are not built")
    torch.library.opcheck(call.op, _copies(args), test_utils=("test_schema", "test_faketensor"))
    eager_args, registered_args = _copies(args), _copies(args)  # an op that writes into its arguments writes into these
    eager, registered = call(*eager_args), call.op(*registered_args)
    outputs = (eager, registered) if eager is not None else (eager_args, registered_args)
    mine, theirs = (o if isinstance(o, (tuple, list)) else (o,) for o in outputs)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    if eager is None:  # the op wrote its results: they differ from what it was given
        assert not torch.equal(eager_args[0], args[0])


def _copies(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
