"""Cluster specs as JSON data, and back: what the registry stores to rebuild any backend.

A spec (`{"cls": ..., "options": {...}}`, deploy/spec.py) holds three kinds of
values, and each has one encoding:

- plain JSON values (str, numbers, bools, None, lists, dicts with str keys):
  themselves (tuples become lists);
- classes and functions: ``{"$class": "package.module.Name"}``;
- shared objects that describe where processes run (a `Target`, a batch
  system's connection): ``{"$object": "package.module.Name", "record": ...}``,
  for a class with ``record()`` and ``from_record(record, context)``.
  `context` is one dict per rebuild, given by the backend (`_restore`): the
  connection pool to use, overrides such as a password that was never
  stored, and a cache so that objects shared by many specs are rebuilt once.

Anything else (a Security object, an open connection, a lambda) cannot be
stored: `dump` raises TypeError naming the path to the value, and the cluster
is then not reconnectable (the caller decides whether that is an error).
"""
from __future__ import annotations

import importlib

__all__ = ["dump", "load", "dotted_name", "import_dotted"]


def dotted_name(obj) -> str:
    name = f"{obj.__module__}.{obj.__qualname__}"
    if "<" in name:  # a local class or a lambda cannot be imported back
        raise TypeError(f"{name} is not importable by name")
    return name


def import_dotted(name: str):
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"{name!r} is not a dotted path like 'package.module.Name'")
    return getattr(importlib.import_module(module), attr)


def dump(value, path: str = "spec"):
    """`value` as JSON data (see the module doc); TypeError for what cannot be stored."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: key {k!r} is not a string")
            out[k] = dump(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [dump(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__") \
            and not hasattr(value, "record"):
        return {"$class": dotted_name(value)}
    record = getattr(value, "record", None)
    if callable(record) and callable(getattr(type(value), "from_record", None)):
        return {"$object": dotted_name(type(value)), "record": dump(record(), f"{path}.record")}
    raise TypeError(f"{path}: a {type(value).__name__} cannot be stored in the cluster registry")


def load(data, context: dict | None = None):
    """The inverse of `dump`; `context` goes to every `from_record`."""
    if context is None:
        context = {}
    if isinstance(data, list):
        return [load(v, context) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"$class"}:
        return import_dotted(data["$class"])
    if set(data) == {"$object", "record"}:
        return import_dotted(data["$object"]).from_record(load(data["record"], context), context)
    return {k: load(v, context) for k, v in data.items()}
