"""Helpers for taskcore's own tests (and for users testing code on taskcore).

Async tests are plain functions that call `run(coro)`: it runs the coroutine
on a fresh uvloop event loop (the loop every taskcore process uses), so no
asyncio pytest plugin is needed.
"""
import asyncio
import os

import uvloop

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def run(coro, timeout=60):
    """Run `coro` to completion on a new uvloop loop, failing after `timeout` s."""

    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(guarded())


async def echo(comm):
    """A listener's handler that sends every message back until the peer leaves."""
    from taskcore.errors import CommClosedError

    while True:
        try:
            msg = await comm.read()
        except CommClosedError:
            return
        await comm.write(msg)


async def echo_listener(address="tcp://127.0.0.1:0", **options):
    """`listen(address, echo, **options)`: a server for transport tests."""
    from taskcore.transports import listen

    return await listen(address, echo, **options)


def wait_until(predicate, timeout=10.0, message="a condition", interval=0.05):
    """Poll `predicate()` (from a sync test) until it is truthy; return its value, or fail
    with an AssertionError naming `message` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def stale_extensions():
    """Compiled modules older than their source (.pyx, or .py for the compiled
    glue, see setup.py): an in-place build left behind by an edit. Tests and
    benchmarks refuse to run on them, which would test yesterday's code."""
    import glob
    import importlib.machinery

    pkg = os.path.dirname(os.path.abspath(__file__))
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for so in glob.glob(os.path.join(pkg, "**", "*" + suffix), recursive=True):
            stem = so[: -len(suffix)]
            for src in (stem + ".pyx", stem + ".py"):
                if os.path.exists(src) and os.path.getmtime(src) > os.path.getmtime(so):
                    stale.append(os.path.relpath(src, os.path.dirname(pkg)))
    return stale


def require(condition, reason):
    """Skip when a system component is missing, but only outside CI.

    Under CI=true a missing component is an error, never a silent skip.
    """
    import pytest

    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


def import_required(name, reason=None):
    """`pytest.importorskip` that skips only outside CI: import and return module `name`.

    Outside CI a module that cannot be imported (an optional dependency not
    installed, a server not built yet) skips the test, naming the module and
    the error. Under CI=true it fails the test, with the import's traceback:
    a module that does not import there is a bug, never a silent skip. Works
    inside tests and fixtures and at module level (where the failure is a
    collection error). Errors other than ImportError propagate as they are.
    """
    import importlib
    import traceback

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as e:
        why = f"cannot import {name}" + (f" ({reason})" if reason else "") + f": {e}"
        if IN_CI:
            tb = "".join(traceback.format_exception(e)).rstrip()
            pytest.fail(f"required module missing in CI: {why}\n{tb}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


class cluster:
    """`async with cluster(n_workers=2) as (scheduler, workers):` all in this loop (tcp).

    For tests that want real servers without subprocesses.
    """

    def __init__(self, n_workers=2, nthreads=1, protocol="tcp", scheduler_kwargs=None,
                 worker_kwargs=None):
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.protocol = protocol
        self.scheduler_kwargs = scheduler_kwargs or {}
        self.worker_kwargs = worker_kwargs or {}

    async def __aenter__(self):
        from taskcore.scheduler import Scheduler
        from taskcore.worker import Worker

        self.scheduler = await Scheduler(protocol=self.protocol, validate=True,
                                         **self.scheduler_kwargs).start()
        self.workers = []
        for i in range(self.n_workers):
            kw = dict(self.worker_kwargs)
            kw.setdefault("name", f"w{i}")
            w = await Worker(self.scheduler.address, nthreads=self.nthreads, validate=True,
                             **kw).start()
            self.workers.append(w)
        return self.scheduler, self.workers

    async def __aexit__(self, *exc):
        for w in self.workers:
            await w.close()
        await self.scheduler.close()
