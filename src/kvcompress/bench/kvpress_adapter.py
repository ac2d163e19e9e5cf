"""Run NVIDIA kvpress presses through the same harness, for side-by-side rows: ``kvpress:SnapKVPress:0.5``.

kvpress (https://github.com/NVIDIA/kvpress) compresses a transformers ``DynamicCache`` in forward
hooks on the attention layers while the context is prefilled (``with press(model): model(...)``).
A row runs the press around the context's prefill only, then scores and decodes with plain
forwards at true positions, so the press's evictions are judged exactly like kvcompress's.
Retrieval goes through kvpress's own ``KVPressTextGenerationPipeline``, the way kvpress users ask
questions. Bytes are those of every tensor the ``DynamicCache`` holds.

Spec: ``kvpress:<PressClass>[:<params>]``; params as in kvcompress specs (``key=value`` pairs,
a bare first value is ``compression_ratio``), e.g. ``kvpress:SnapKVPress:0.5,window_size=64``.

kvpress is optional and never imported unless a ``kvpress:`` row is asked for. It pins a
transformers range; when the installed transformers is outside it, the row is refused with a
message saying so (the presses reach into transformers internals that change between releases).
"""

from __future__ import annotations

import ast
import contextlib
from dataclasses import dataclass
from importlib import metadata
from typing import ContextManager

from packaging.requirements import Requirement
from packaging.version import Version

from kvcompress.cache import layer_nbytes

DIST = "kvpress"
PREFIX = "kvpress:"  # a benchmark row spec that starts with this runs a kvpress press


class KVPressUnavailable(RuntimeError):
    """A ``kvpress:`` row cannot run here: not installed, a transformers mismatch, or a bad press spec."""


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _requirement(dist: str, name: str) -> Requirement | None:
    """The unconditional requirement of ``dist`` on ``name``, from its installed metadata."""
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() == name and (req.marker is None or req.marker.evaluate({"extra": ""})):
            return req
    return None


def check_kvpress() -> str:
    """Return the installed kvpress version if it can run with the installed transformers.

    Raises:
        KVPressUnavailable: kvpress is missing, or its transformers range excludes the installed one.
    """
    version = _installed_version(DIST)
    if version is None:
        raise KVPressUnavailable(
            "kvpress rows need NVIDIA's kvpress, which is not installed: pip install kvpress "
            "(it pins its own transformers range, which must include the installed transformers)"
        )
    transformers_version = _installed_version("transformers")
    req = _requirement(DIST, "transformers")
    if req is not None and not req.specifier.contains(Version(transformers_version), prereleases=True):
        raise KVPressUnavailable(
            f"kvpress {version} supports transformers{req.specifier} but transformers {transformers_version} is "
            f"installed (kvcompress needs {_own_transformers_range()}); install a kvpress release whose range "
            f"includes transformers {transformers_version}"
        )
    return version


def _own_transformers_range() -> str:
    req = _requirement("kvcompress", "transformers")
    return f"transformers{req.specifier}" if req is not None else "transformers"


def parse_press_spec(spec: str) -> tuple[str, dict]:
    """``kvpress:SnapKVPress:0.5,window_size=64`` -> ``("SnapKVPress", {"compression_ratio": 0.5, "window_size": 64})``.

    Raises:
        KVPressUnavailable: malformed spec.
    """
    body = spec[len(PREFIX) :]
    name, _, params = body.partition(":")
    if not name.strip():
        raise KVPressUnavailable(f"{spec!r}: name a press, e.g. 'kvpress:SnapKVPress:0.5'")
    kwargs = {}
    for i, item in enumerate(p.strip() for p in params.split(",") if p.strip()):
        key, eq, raw = item.partition("=")
        if not eq:
            if i:
                raise KVPressUnavailable(f"{spec!r}: only the first parameter (compression_ratio) may be unnamed")
            key, raw = "compression_ratio", item
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        kwargs[key.strip()] = value
    return name.strip(), kwargs


def resolve_press(spec: str, parts: tuple[str, ...]) -> KVPressMethod:
    """Check kvpress, then build the press a ``kvpress:`` spec names, as a row measuring ``parts``.

    Raises:
        KVPressUnavailable: kvpress cannot run here, the press is unknown, or its parameters are bad.
    """
    name, kwargs = parse_press_spec(spec)
    version = check_kvpress()
    import kvpress

    cls = getattr(kvpress, name, None)
    if not isinstance(cls, type) or not name.endswith("Press"):
        presses = sorted(n for n in dir(kvpress) if n.endswith("Press") and isinstance(getattr(kvpress, n), type))
        raise KVPressUnavailable(f"kvpress {version} has no press {name!r}; presses: {', '.join(presses)}")
    try:
        press = cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise KVPressUnavailable(f"{spec!r}: {err}") from None
    return KVPressMethod(spec, press, parts)


@dataclass(frozen=True)
class KVPressMethod:
    """A kvpress press as a benchmark row: a ``DynamicCache``, compressed during the context's prefill."""

    spec: str
    press: object
    parts: tuple[str, ...]
    source: str = "kvpress"

    def new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def session(self, model, cache) -> ContextManager:
        return contextlib.nullcontext()

    def compressing(self, model) -> ContextManager:
        return self.press(model)

    def nbytes(self, cache) -> int:
        return sum(layer_nbytes(layer) for layer in cache.layers)

    def answer(self, model, tokenizer, context: str, question: str, max_new_tokens: int, prefill_chunk: int | None = None) -> str:
        if prefill_chunk:  # the runner refuses it first: a press compresses in one prefill forward
            raise KVPressUnavailable(f"{self.spec}: kvpress presses cannot prefill in chunks")
        from kvpress import KVPressTextGenerationPipeline

        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
        return pipe(context, question=question, press=self.press, max_new_tokens=max_new_tokens)["answer"].strip()
