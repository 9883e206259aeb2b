"""Lazy re-exports for package __init__s (PEP 562): a name's module is imported on first use.

A package keeps a table `{name: module}` and installs the two hooks this
returns, so `import taskcore` (or `taskcore.deploy`) imports nothing heavy
and one backend never imports another. tests/test_imports.py reads those
tables to know which module a re-exported name really comes from.
"""
from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: dict, namespace: dict):
    """(`__getattr__`, `__dir__`) for `package`, whose globals are `namespace`."""

    def __getattr__(name):
        try:
            module = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next lookup is a plain global
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
