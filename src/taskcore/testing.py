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
