"""Scheme -> transport backend.

Built-in backends are registered by name here (lazily imported, so the ucx
backend costs nothing unless used); third parties add schemes through the
`taskcore.transports` entry-point group, whose objects are Backend classes.
"""
from __future__ import annotations

import importlib

from taskcore.errors import AddressError

_BUILTIN = {
    "tcp": "taskcore.transports.tcp:TCPBackend",
    "tls": "taskcore.transports.tcp:TLSBackend",
    "inproc": "taskcore.transports.inproc:InprocBackend",
    "ucx": "taskcore.transports.ucx:UCXBackend",
}
_backends: dict = {}


def register_backend(scheme: str, backend) -> None:
    """Register a Backend instance for `scheme` (overrides entry points and built-ins)."""
    _backends[scheme] = backend


def _load(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)()


def get_backend(scheme: str):
    try:
        return _backends[scheme]
    except KeyError:
        pass
    if scheme in _BUILTIN:
        backend = _load(_BUILTIN[scheme])
    else:
        # Imported here: importlib.metadata costs every process ~12 ms at start-up,
        # and only a third-party scheme needs it.
        from importlib.metadata import entry_points

        eps = [ep for ep in entry_points(group="taskcore.transports") if ep.name == scheme]
        if not eps:
            known = sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group="taskcore.transports")})
            raise AddressError(f"unknown transport scheme {scheme!r}; known: {', '.join(known)}")
        backend = eps[0].load()()
    _backends[scheme] = backend
    return backend
