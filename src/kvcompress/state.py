"""What a cache holds, as flat ``name -> tensor or scalar`` dicts: for saving, loading and forking.

A class that holds cache state lists it in two class attributes:

- ``STATE``: attribute names whose values are tensors, ``None``, numbers, strings, or dicts of
  tensors (saved under ``name.key``);
- ``NESTED``: attribute names holding another such object (its entries saved under ``name.``).

:func:`state_of` reads an object's entries; :func:`restore` writes them back into an object of the
same class, built the same way (the nested objects must exist: whoever builds the object builds them).
"""

from __future__ import annotations

import torch

Value = torch.Tensor | int | float | bool | str | None


def state_of(obj, prefix: str = "") -> dict[str, Value]:
    """``{prefix + name: value}`` for every entry of ``obj`` and, recursively, of its nested objects."""
    out: dict[str, Value] = {}
    for name in type(obj).STATE:
        value = getattr(obj, name)
        if isinstance(value, dict):
            out[f"{prefix}{name}"] = sorted(value)  # the keys, so an empty dict round-trips
            out.update({f"{prefix}{name}.{key}": tensor for key, tensor in value.items()})
        else:
            out[f"{prefix}{name}"] = value
    for name in getattr(type(obj), "NESTED", ()):
        out.update(state_of(getattr(obj, name), f"{prefix}{name}."))
    return out


def restore(obj, state: dict[str, Value], prefix: str = "") -> None:
    """Write entries read by :func:`state_of` back into ``obj`` (tensors are used as they are); an object
    with its own ``restore`` (pages, written through their tables) reads its entries itself."""
    if hasattr(obj, "restore"):
        obj.restore(state, prefix)
        return
    for name in type(obj).STATE:
        value = state[f"{prefix}{name}"]
        if isinstance(value, list):  # a dict of tensors
            value = {key: state[f"{prefix}{name}.{key}"] for key in value}
        setattr(obj, name, value)
    for name in getattr(type(obj), "NESTED", ()):
        restore(getattr(obj, name), state, f"{prefix}{name}.")


def parts_of(obj):
    """``obj`` and, recursively, every object nested in it (``NESTED``, and a ragged store's inner stores)."""
    yield obj
    for name in getattr(type(obj), "NESTED", ()):
        yield from parts_of(getattr(obj, name))
    for row in getattr(obj, "rows", None) or ():
        for inner in row:
            yield from parts_of(inner)


def sliding_state(layer) -> dict[str, Value]:
    """The entries of transformers' sliding-window layer (hybrid models' local layers)."""
    if not layer.is_initialized:
        return {"initialized": False}
    return {"initialized": True, "keys": layer.keys, "values": layer.values, "cumulative_length": layer.cumulative_length}


def load_sliding_state(layer, state: dict[str, Value]) -> None:
    """Put :func:`sliding_state` entries back into a sliding-window layer."""
    if state["initialized"]:
        layer.lazy_initialization(state["keys"], state["values"])
        layer.keys, layer.values, layer.cumulative_length = state["keys"], state["values"], state["cumulative_length"]
