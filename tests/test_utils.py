import asyncio
import gc
import json
import os
import threading
import time

import pytest

from taskcore.utils import (LoopRunner, cpu_count, format_bytes, gc_paused, get_ip_interface,
                            parse_bytes, parse_memory_limit, parse_resources, parse_timedelta, read_json_file,
                            system_memory, write_json_atomic)


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("4 GiB", 4 * 2**30), ("4gib", 4 * 2**30), ("100MB", 100 * 10**6),
    ("1.5kB", 1500), ("1e9", 10**9), ("512", 512), ("2 TiB", 2 * 2**40), ("10 B", 10),
    ("3M", 3 * 10**6), (1024, 1024), (2.5e3, 2500), ("0", 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 Gibibytes", "-1GB", "1.2.3MB", "four", None,
                                 True, -5, float("inf"), "4 G B"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError) as e:
        parse_bytes(bad)
    assert "byte size" in str(e.value)


def test_format_bytes_round_trips_roughly():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1000) == "0.98 kiB"
    assert format_bytes(4 * 2**30) == "4.00 GiB"
    assert format_bytes(1536) == "1.50 kiB"
    for n in (10**3, 10**6, 3 * 10**9, 7 * 10**12):
        text = format_bytes(n)
        assert abs(parse_bytes(text.replace(" ", "")) - n) / n < 0.01


@pytest.mark.parametrize("text, expected", [
    ("10s", 10.0), ("250ms", 0.25), ("5 minutes", 300.0), ("1h", 3600.0), ("2", 2.0),
    (3, 3.0), (0.5, 0.5), ("1.5 hours", 5400.0), (None, None), ("1d", 86400.0),
])
def test_parse_timedelta(text, expected):
    assert parse_timedelta(text) == expected


@pytest.mark.parametrize("bad", ["soon", "10 parsecs", "-1s", -1, "", True])
def test_parse_timedelta_rejects(bad):
    with pytest.raises(ValueError):
        parse_timedelta(bad)


def test_parse_memory_limit():
    total = system_memory()
    assert parse_memory_limit(None) is None
    assert parse_memory_limit(0) is None
    assert parse_memory_limit("none") is None
    assert parse_memory_limit("2GiB") == min(2 * 2**30, total)
    assert parse_memory_limit(10**30) == total  # capped: the OS would kill us first
    assert parse_memory_limit(0.5) == int(total * 0.5)
    # auto: the share of the machine proportional to threads, never more than all of it
    assert parse_memory_limit("auto", nthreads=1, total_cores=4) == int(total / 4)
    assert parse_memory_limit("auto", nthreads=2, total_cores=4) == int(total / 2)
    assert parse_memory_limit("auto", nthreads=16, total_cores=4) == total
    with pytest.raises(ValueError):
        parse_memory_limit("lots")


def test_machine_size():
    assert cpu_count() >= 1
    assert system_memory() > 2**20


def test_parse_resources():
    assert parse_resources("GPU=2,MEM=10e9") == {"GPU": 2.0, "MEM": 1e10}
    assert parse_resources("GPU=2 MEM=3") == {"GPU": 2.0, "MEM": 3.0}  # spaces separate too
    assert parse_resources("GPU=2, MEM=3") == {"GPU": 2.0, "MEM": 3.0}
    assert parse_resources("") == {}
    assert parse_resources(None) == {}
    assert parse_resources({"A": 1}) == {"A": 1.0}


@pytest.mark.parametrize("bad", ["GPU", "GPU=two", "=2", "GPU=-1", "GPU=nan", "1GPU=1",
                                 {"A": "x"}, 5])
def test_parse_resources_rejects(bad):
    with pytest.raises(ValueError):
        parse_resources(bad)


def test_get_ip_interface():
    import psutil

    names = psutil.net_if_addrs()
    lo = next((n for n in names if n.startswith("lo")), None)
    if lo is None:
        pytest.skip("no loopback interface")
    assert get_ip_interface(lo) == "127.0.0.1"
    with pytest.raises(ValueError, match="not found"):
        get_ip_interface("no-such-interface0")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "scheduler.json"
    assert read_json_file(str(path)) is None
    write_json_atomic(str(path), {"address": "tcp://127.0.0.1:1"})
    assert json.loads(path.read_text()) == {"address": "tcp://127.0.0.1:1"}
    write_json_atomic(str(path), {"address": "tcp://127.0.0.1:2"})
    assert read_json_file(str(path)) == {"address": "tcp://127.0.0.1:2"}
    # no temp files left behind
    assert os.listdir(path.parent) == ["scheduler.json"]


def test_write_json_atomic_failure_leaves_nothing(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_loop_runner_runs_on_uvloop_in_a_thread():
    import uvloop

    with LoopRunner() as runner:
        async def where():
            return threading.current_thread().name, type(asyncio.get_running_loop())

        name, loop_type = runner.run_sync(where)
        assert name == runner.name
        assert loop_type is uvloop.Loop
        assert runner.run_sync(asyncio.sleep(0, result=5)) == 5

        async def boom():
            raise KeyError("x")

        with pytest.raises(KeyError):
            runner.run_sync(boom)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            runner.run_sync(asyncio.sleep, 10, timeout=0.1)
        assert time.monotonic() - t0 < 5

        async def nested():
            return runner.run_sync(asyncio.sleep, 0)

        with pytest.raises(RuntimeError, match="deadlock"):
            runner.run_sync(nested)
    assert not runner.running
    with pytest.raises(RuntimeError):
        runner.run_sync(asyncio.sleep, 0)


def test_loop_runner_stop_cancels_pending_tasks():
    runner = LoopRunner().start()
    cancelled = threading.Event()

    async def forever():
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner.call_soon(lambda: asyncio.ensure_future(forever()))
    time.sleep(0.05)
    runner.stop()
    assert cancelled.is_set()
    assert runner.loop.is_closed()
    runner.stop()  # idempotent


def test_module_has_no_heavy_imports():
    # The CLIs validate options through utils before importing the compiled core.
    import subprocess
    import sys

    code = "import sys, taskcore.utils; print(any(m.startswith('taskcore.core') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shared_loop_runner_is_reference_counted(monkeypatch):
    # Start from no shared runner, whatever earlier tests in this process left behind.
    monkeypatch.setattr(LoopRunner, "_shared", None)
    monkeypatch.setattr(LoopRunner, "_shared_refs", 0)
    a = LoopRunner.shared()
    b = LoopRunner.shared()
    assert a is b and a.running
    a.release()
    assert b.running  # one reference left
    b.release()
    assert not a.running
    c = LoopRunner.shared()  # a fresh one after the last release
    assert c is not a and c.running
    c.release()
    private = LoopRunner().start()
    private.release()
    assert not private.running


def test_gc_paused_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with gc_paused():
            assert not gc.isenabled()
            1 / 0
    assert gc.isenabled()
    gc.disable()                 # someone else turned it off: it stays off
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
