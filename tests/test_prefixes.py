"""The hash chain that keys contexts and their prefixes (kvcompress.prefixes)."""

from __future__ import annotations

import random

import pytest

from kvcompress.prefixes import PrefixKeys


def test_a_prefix_has_the_key_of_the_context_it_is():
    ids = [random.Random(0).randrange(50_000) for _ in range(200)]
    keys = PrefixKeys(b"model+method", ids, page=32)
    for length in (0, 1, 31, 32, 33, 64, 199, 200):
        assert keys(length) == PrefixKeys(b"model+method", ids[:length], page=32)(length)
    assert len({keys(n) for n in range(201)}) == 201  # every prefix its own key


def test_keys_depend_on_the_seed_every_token_and_the_order():
    ids = list(range(100, 170))
    keys = PrefixKeys(b"a", ids)
    assert keys(70) != PrefixKeys(b"b", ids)(70)
    for where in (0, 31, 32, 69):
        changed = ids.copy()
        changed[where] += 1
        assert PrefixKeys(b"a", changed)(70) != keys(70)
        assert PrefixKeys(b"a", changed)(where) == keys(where)  # what comes after a prefix does not change its key
    assert PrefixKeys(b"a", ids[::-1])(70) != keys(70)
    with pytest.raises(ValueError):
        keys(71)
