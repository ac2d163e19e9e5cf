"""Method registry and the spec language users type: ``"streaming:sink=4,window=1024+kivi:bits=2"``.

A spec is ``part ("+" part)*``; a part is ``name`` or ``name:params``; params are ``key=value`` pairs
separated by commas, and a bare first value binds to the method's first parameter (``kivi:4``).
``"none"`` is the empty pipeline. Every method is a dataclass registered with :func:`register`; its
fields are its parameters, checked in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import typing

_REGISTRY: dict[str, type] = {}


class SpecError(ValueError):
    """A method spec names an unknown method or parameter, or a value out of range."""


def register(name: str):
    """Class decorator: make a method dataclass available under ``name`` in specs."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def methods() -> dict[str, dict[str, object]]:
    """Registered method names mapped to their parameters and defaults, e.g. ``{"kivi": {"bits": 2, ...}}``."""
    _load_builtin_methods()
    return {
        name: {f.name: f.default for f in dataclasses.fields(cls)} for name, cls in sorted(_REGISTRY.items())
    }


def parse_spec(spec: str) -> list:
    """Parse a spec string into configured method instances, in the order written.

    Raises:
        SpecError: unknown method or parameter, malformed part, or a value the method rejects; the
            message lists what is valid.
    """
    _load_builtin_methods()
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty method spec; use 'none' or one of: {', '.join(sorted(_REGISTRY))}")
    spec = spec.strip()
    if spec == "none":
        return []
    return [_parse_part(part.strip(), spec) for part in spec.split("+")]


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
        kwargs[key] = _convert(name, key, raw.strip(), hints[key])
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
        raise SpecError(f"{method}: parameter {key!r} expects {typ.__name__}, got {raw!r}") from None


def _describe(cls) -> str:
    return ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))


def _load_builtin_methods() -> None:
    # Importing the package registers the built-in methods; deferred so this module has no cycle.
    import kvcompress.methods  # noqa: F401
