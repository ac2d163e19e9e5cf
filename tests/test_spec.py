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


@pytest.mark.parametrize(
    "spec, message",
    [
        ("snapkv:budget=1e20", "'budget' expects int, got '1e20'"),
        ("snapkv:window=1e20", "'window' expects int, got '1e20'"),
        ("expected_attention:future=1e20", "'future' expects int"),
        ("kivi:residual=1e20", "'residual' expects int"),
        ("kivi:residual=10**15", "'residual' expects int"),
        ("kivi:residual=1000000000000000", "'residual' must be at most 16,777,216"),
        ("snapkv:budget=-99999999999999999999", "'budget' must be at most 16,777,216"),
        ("kivi:residual=" + "9" * 5000, "'residual' expects int"),  # beyond Python's digit limit
        ("snapkv:ratio=1e400", "'ratio' must be a finite number, got inf"),
        ("pyramidkv:beta=nan", "'beta' must be a finite number"),
    ],
)
def test_values_beyond_the_one_bound_are_spec_errors_before_any_allocation(spec, message):
    """One bound in the parser (registry.MAX_COUNT, finite floats), for every method: no absurd allocation later."""
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)
    assert parse_spec("streaming:window=16777216").selection.window == 2**24  # the bound itself is accepted
