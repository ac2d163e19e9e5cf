"""Method registry and the spec language users type: ``"streaming:sink=4,window=1024+kivi:bits=2"``.

A spec is ``part ("+" part)*``; a part is ``name`` or ``name:params``; params are ``key=value`` pairs
separated by commas, and a bare first value binds to the method's first parameter (``kivi:4``).
``"none"`` is the empty pipeline. Every method is a frozen dataclass registered with
:func:`register`; its fields are its parameters, checked in ``__post_init__``. The built-in methods
register themselves when :mod:`kvcompress` is imported (which any import of a submodule does first).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from kvcompress.protocols import Representation, Selection

_REGISTRY: dict[str, type] = {}

# Every integer parameter counts something (tokens, bits, channels, heads), so none may exceed 2**24
# = 16,777,216: more tokens than any model here reads, so a count beyond it is a typo (kivi:residual=
# 1000000000000000 reserved a window of that many tokens), and far from overflowing int64 arithmetic
# (positions, budgets) downstream. A count within it is taken as given: kivi:residual=16777216 still
# reserves room for that many tokens per layer.
MAX_COUNT = 2**24


class SpecError(ValueError):
    """A method spec names an unknown method or parameter, or a value out of range."""


def register(name: str):
    """Class decorator: make a method dataclass available under ``name`` in specs.

    Raises:
        TypeError: the class is neither a :class:`~kvcompress.protocols.Selection` nor a
            :class:`~kvcompress.protocols.Representation` dataclass.
    """

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, (Selection, Representation)) and dataclasses.is_dataclass(cls)):
            raise TypeError(
                f"register({name!r}): {getattr(cls, '__name__', cls)!r} must be a dataclass subclassing "
                "kvcompress.protocols.Selection (eviction) or Representation (storage)"
            )
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def methods() -> dict[str, dict[str, object]]:
    """Registered method names mapped to their parameters and defaults, e.g. ``{"kivi": {"bits": 2, ...}}``."""
    return {
        name: {f.name: f.default for f in dataclasses.fields(cls)} for name, cls in sorted(_REGISTRY.items())
    }


@dataclass(frozen=True)
class Pipeline:
    """A parsed spec: at most one eviction method and one storage method (plus the storage that holds
    a transform's output, as ``kivi`` in ``lowrank+kivi``).

    Attributes:
        spec: as written.
        selection: the eviction method, or None.
        representation: the storage method, or None.
        inner: the plain storage method that stores ``representation``'s output, or None.
    """

    spec: str
    selection: Selection | None = None
    representation: Representation | None = None
    inner: Representation | None = None

    @property
    def methods(self) -> tuple:
        return tuple(m for m in (self.selection, self.representation, self.inner) if m is not None)


def parse_spec(spec: str) -> Pipeline:
    """Parse a spec string into a :class:`Pipeline` of configured methods.

    Raises:
        SpecError: unknown method or parameter, malformed part, a value the method rejects, or methods
            that do not combine; the message lists what is valid.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty method spec; use 'none' or one of: {', '.join(sorted(_REGISTRY))}")
    spec = spec.strip()
    if spec == "none":
        return Pipeline(spec)
    return _combine(spec, [_parse_part(part.strip(), spec) for part in spec.split("+")])


def _combine(spec: str, methods: list) -> Pipeline:
    selections = [m for m in methods if isinstance(m, Selection)]
    representations = [m for m in methods if isinstance(m, Representation)]
    if len(selections) > 1 or len(representations) > 2:
        raise SpecError(
            f"{spec!r}: combine at most one eviction method with at most one storage method, or a transform "
            f"and a storage method (e.g. 'streaming:window=2048+kivi:bits=4', 'lowrank:ratio=0.5+kivi:bits=4')"
        )
    if len(methods) > 1 and any(r.standalone for r in representations):
        names = ", ".join(r.name for r in representations if r.standalone)
        raise SpecError(f"{spec!r}: {names} combines with no other method (its storage is shared between layers)")
    inner = None
    if len(representations) == 2:  # a transform (lowrank) whose output the second one stores (kivi)
        first, inner = representations
        if not first.takes_inner:
            raise SpecError(f"{spec!r}: {first.name} stores tokens itself and cannot hand them to {inner.name}")
        if inner.takes_inner:
            raise SpecError(f"{spec!r}: {inner.name} transforms tokens and cannot store another method's output")
    return Pipeline(spec, selections[0] if selections else None, representations[0] if representations else None, inner)


def _parse_part(part: str, spec: str):
    name, _, params = part.partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise SpecError(
            f"unknown method {name!r} in {spec!r}; valid methods: none, {', '.join(sorted(_REGISTRY))}"
        )
    cls = _REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for i, item in enumerate(p.strip() for p in params.split(",") if p.strip()):
        key, eq, raw = item.partition("=")
        if not eq:  # a bare value binds to the first parameter: "kivi:4"
            if i != 0:
                raise SpecError(f"{name}: only the first parameter may be given without a name ({item!r})")
            key, raw = next(iter(fields)), item
        key = key.strip()
        if key not in fields:
            raise SpecError(f"{name}: unknown parameter {key!r}; valid parameters: {_describe(cls)}")
        if key in kwargs:
            raise SpecError(f"{name}: parameter {key!r} given twice")
        kwargs[key] = _in_range(name, key, _convert(name, key, raw.strip(), hints[key]))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise SpecError(f"{name}: {err}") from None


def _convert(method: str, key: str, raw: str, typ) -> object:
    args = typing.get_args(typ)
    if type(None) in args and len(args) == 2:  # ``float | None``: None means unset and is never typed
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return raw
    except ValueError:
        hint = ""
        if key == "budget" and raw in ("uniform", "pyramid", "adaptive"):  # budgets.ALLOCATIONS; budget is a count
            hint = f"; budget is tokens kept per layer and head, spread across heads and layers by allocation={raw}"
        raise SpecError(f"{method}: parameter {key!r} expects {typ.__name__}, got {raw!r}{hint}") from None


def _in_range(method: str, key: str, value: object) -> object:
    """``value`` when an integer within ``[-MAX_COUNT, MAX_COUNT]`` or a finite float (``1e400``, ``inf`` and
    ``nan`` parse as floats); else a SpecError. The one bound every method's parameters share."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT:
        raise SpecError(f"{method}: parameter {key!r} must be at most {MAX_COUNT:,} (2**24), got {value:,}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{method}: parameter {key!r} must be a finite number, got {value}")
    return value


def _describe(cls) -> str:
    return ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
