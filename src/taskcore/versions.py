"""Software versions of a process, and the check that a cluster's processes agree.

`get_versions()` has dask.distributed's shape: {"host": {python, OS, machine...},
"packages": {name: version or None}}. A package already imported reports its
module's `__version__` (what the process really runs, even when a path shadows the
installed distribution); one not imported reports its installed distribution's
version without importing it, so the scheduler never imports dask or numpy just to
answer. Packages named in `packages=` are imported, as dask does: asking for them
means they matter.
"""
from __future__ import annotations

import importlib
import os
import platform
import struct
import sys

#: Must match between client, scheduler and workers: they exchange pickles (cloudpickle)
#: and msgpack messages, and run the same protocol (taskcore).
REQUIRED = ("taskcore", "python", "cloudpickle", "msgpack")
#: Reported, not checked.
OPTIONAL = ("uvloop", "lz4", "numpy", "psutil", "dask", "distributed")
#: Importable name -> distribution name, where they differ.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "PyYAML", "PIL": "Pillow"}


def python_version() -> str:
    return ".".join(map(str, sys.version_info))


def host_info() -> dict:
    uname = platform.uname()
    return {
        "python": python_version(),
        "python-bits": struct.calcsize("P") * 8,
        "OS": uname.system,
        "OS-release": uname.release,
        "machine": uname.machine,
        "processor": uname.processor,
        "byteorder": sys.byteorder,
        "LC_ALL": os.environ.get("LC_ALL", "None"),
        "LANG": os.environ.get("LANG", "None"),
    }


def version_of(name: str, import_it: bool = False) -> str | None:
    """The version of package `name` in this process, or None when it is not installed."""
    if name == "python":
        return python_version()
    module = sys.modules.get(name)
    if module is None and import_it:
        try:
            module = importlib.import_module(name)
        except Exception:
            module = None
    if module is not None:
        for attr in ("__version__", "version", "VERSION"):
            v = getattr(module, attr, None)
            if isinstance(v, str):
                return v
            if isinstance(v, tuple) and v and all(isinstance(p, (int, str)) for p in v):
                return ".".join(map(str, v))
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_DISTRIBUTIONS.get(name, name))
    except (PackageNotFoundError, ValueError):
        return None


def get_versions(packages=None) -> dict:
    """{"host": ..., "packages": {name: version}} for this process."""
    extra = _package_list(packages)
    out = {name: version_of(name) for name in (*REQUIRED, *OPTIONAL)}
    for name in extra:
        if name not in out:
            out[name] = version_of(name, import_it=True)
    return {"host": host_info(), "packages": out}


def _package_list(packages) -> list:
    if packages is None:
        return []
    if isinstance(packages, str):
        packages = [packages]
    out = []
    for p in packages:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"packages must be package names (strings), got {p!r}")
        out.append(p.strip())
    return out


def mismatches(client: dict, scheduler: dict, workers: dict, packages=None) -> list:
    """Rows (package, client version, scheduler version, {worker: version}) for each
    checked package whose versions differ: REQUIRED ones everywhere, `packages` between
    the client and the workers (the scheduler runs no user code, so it needs none of
    them; its version is shown, not compared)."""
    rows = []
    for name in (*REQUIRED, *[p for p in _package_list(packages) if p not in REQUIRED]):
        c = _get(client, name)
        s = _get(scheduler, name)
        w = {addr: _get(v, name) for addr, v in workers.items()}
        compared = {c, *w.values()} | ({s} if name in REQUIRED else set())
        if len(compared) > 1:
            rows.append((name, c, s, w))
    return rows


def _get(versions, name):
    if not isinstance(versions, dict):
        return "UNKNOWN"
    v = (versions.get("packages") or {}).get(name, "MISSING")
    return "MISSING" if v is None else v


def error_message(rows: list) -> str:
    """The table of `mismatches` rows: one column for the client, the scheduler, and
    the workers (their common version, or each worker's)."""
    table = [("Package", "Client", "Scheduler", "Workers")]
    for name, c, s, w in rows:
        distinct = set(w.values())
        if not w:
            workers = "(none)"
        elif len(distinct) == 1:
            workers = str(next(iter(distinct)))
        else:
            workers = ", ".join(f"{addr}: {v}" for addr, v in sorted(w.items()))
        table.append((name, str(c), str(s), workers))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    line = "+" + "+".join("-" * (n + 2) for n in widths) + "+"
    out = [line]
    for i, r in enumerate(table):
        out.append("| " + " | ".join(v.ljust(n) for v, n in zip(r, widths)) + " |")
        if i == 0:
            out.append(line)
    out.append(line)
    return "Mismatched versions found\n\n" + "\n".join(out)
