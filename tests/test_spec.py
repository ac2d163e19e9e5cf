"""Method specs: parsing, defaults, and errors that list what is valid."""

import pytest

import kvcompress
from kvcompress.methods.kivi import KIVI
from kvcompress.methods.lowrank import LowRank
from kvcompress.methods.streaming import StreamingLLM
from kvcompress.registry import Pipeline, SpecError, parse_spec


def test_parse_named_positional_and_combined():
    assert parse_spec("none") == Pipeline("none")
    assert parse_spec("streaming:sink=2,window=512").selection == StreamingLLM(window=512, sink=2)
    assert parse_spec("kivi:4").representation == KIVI(bits=4)
    assert parse_spec("kivi:bits=2,group=32,residual=128").methods == (KIVI(bits=2, group=32, residual=128),)
    both = parse_spec(" streaming:window=2048 + kivi:bits=4 ")
    assert (both.selection, both.representation, both.inner) == (StreamingLLM(window=2048), KIVI(bits=4), None)
    chained = parse_spec("lowrank:ratio=0.5+kivi:bits=4")
    assert (chained.representation, chained.inner) == (LowRank(ratio=0.5), KIVI(bits=4))


def test_methods_are_frozen():
    with pytest.raises(AttributeError):
        parse_spec("kivi:4").representation.bits = 2


def test_methods_lists_parameters_and_defaults():
    listed = kvcompress.methods()
    assert listed["kivi"] == {"bits": 2, "group": 32, "residual": 128, "sink": 0}
    assert listed["streaming"] == {"window": 1024, "sink": 4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("snapkvv:0.5", "valid methods: none,.*kivi.*streaming"),
        ("kivi:bitz=2", "valid parameters: bits=2, group=32, residual=128"),
        ("kivi:bits=3", "bits must be 2, 4 or 8"),
        ("kivi:bits=two", "expects int"),
        ("knorm:ratio=0.75,budget=adaptive", "expects int.*by allocation=adaptive"),
        ("streaming:window=0", "window must be >= 1"),
        ("streaming:window=8,window=9", "given twice"),
        ("kivi:group=32,4", "only the first parameter"),
        ("", "use 'none'"),
        ("kivi:bits=4+kivi:bits=2", "cannot hand them to kivi"),
    ],
)
def test_bad_specs_raise_errors_naming_the_fix(spec, message, tiny):
    with pytest.raises(SpecError, match=message):
        kvcompress.make_cache(spec, tiny)
