"""The shared plumbing: extensions made on first use, rpc routing, errors, the key holder,
and the hot path left alone."""
import asyncio

import pytest

from taskcore.coordination.extension import EXTENSIONS, KeyHolder, parse_timeout


def inc(x):
    return x + 1


def test_no_extension_until_used_and_tasks_never_reach_one(async_pair):
    async def t(c1, c2, s, ws):
        assert await c1.gather(c1.map(inc, range(20))) == list(range(1, 21))
        assert s.extensions == {}             # the task messages never touch them
        await c1._rpc("event.set", name="e")
        assert set(s.extensions) == {"event"}

    async_pair(t)


def test_unknown_operation_and_bad_names_are_clear_errors(async_pair):
    async def t(c1, c2, s, ws):
        with pytest.raises(ValueError, match="unknown rpc method 'variable.nope'"):
            await c1._rpc("variable.nope", name="x")
        with pytest.raises(ValueError, match="unknown rpc method 'nosuch.get'"):
            await c1._rpc("nosuch.get")
        with pytest.raises(TypeError, match="non-empty string"):
            await c1._rpc("event.set", name=3)
        with pytest.raises(TypeError, match="non-empty string"):
            await c1._rpc("variable.get", name="")
        assert "nosuch" not in s.extensions

    async_pair(t)


def test_every_extension_module_is_importable():
    import importlib

    for name, (module, cls) in EXTENSIONS.items():
        assert hasattr(importlib.import_module(module), cls), name


def test_key_holder_counts_per_key_and_releases_at_zero(async_pair):
    async def t(c1, c2, s, ws):
        f = c1.submit(inc, 1)
        await f
        holder = s.extensions.get("keys") or KeyHolder(s)
        s.extensions["keys"] = holder
        holder.hold([f.key])
        holder.hold([f.key])
        f.release()
        await asyncio.sleep(0.1)              # the client's release went out
        assert f.key in s.state.tasks
        holder.release([f.key])
        assert f.key in s.state.tasks         # one hold left
        holder.release([f.key])
        for _ in range(50):
            if f.key not in s.state.tasks:
                break
            await asyncio.sleep(0.02)
        assert f.key not in s.state.tasks
        assert holder.counts == {}

    async_pair(t)


def test_parse_timeout():
    assert parse_timeout(None) is None
    assert parse_timeout("200ms") == 0.2
    assert parse_timeout(2) == 2.0
    with pytest.raises(ValueError, match="invalid timeout"):
        parse_timeout("soon")
    with pytest.raises(ValueError, match="invalid timeout"):
        parse_timeout(-1)


def test_restart_cancels_held_keys_and_the_holder_starts_over(async_pair):
    from taskcore import Variable
    from taskcore.errors import CancelledError

    async def t(c1, c2, s, ws):
        f = c1.submit(inc, 1)
        await Variable("r", client=c1).set(f)
        assert s.extensions["keys"].counts == {f.key: 1}
        await c1._rpc("restart", timeout=5)       # no nannies here: the workers close
        assert s.extensions["keys"].counts == {}
        g = await Variable("r", client=c2).get()  # the variable still names the key
        with pytest.raises(CancelledError):
            await asyncio.wait_for(g._result(), 5)

    async_pair(t)
