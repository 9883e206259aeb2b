"""taskcore.logs.LogBuffer, and get_scheduler_logs / get_worker_logs through the client."""
import logging

import pytest

from taskcore.client import Client
from taskcore.logs import LogBuffer
from taskcore.testing import cluster, run, wait_until


@pytest.fixture
def log():
    name = "tc_test_logs"
    lg = logging.getLogger(name)
    level, propagate = lg.level, lg.propagate
    lg.setLevel(logging.WARNING)
    lg.propagate = False
    yield lg
    lg.setLevel(level)
    lg.propagate = propagate


def test_buffer_keeps_the_last_records_formatted_once(log):
    buf = LogBuffer(maxlen=3).attach(log.name)
    assert log.level == logging.WARNING         # the process's choice is left alone
    log.info("not made: below the logger's level")
    log.setLevel(logging.DEBUG)
    arg = ["before"]
    log.info("one %s", arg)
    arg[0] = "after"                             # formatted at emit: not seen
    assert buf.recent()[0][3].endswith("one ['before']")
    log.debug("dropped: below the buffer's level (INFO)")
    for i in range(2, 5):
        log.warning("msg %d", i)
    recs = buf.recent()
    assert [r[1] for r in recs] == ["WARNING"] * 3
    assert [r[3].rsplit(" - ", 1)[1] for r in recs] == ["msg 2", "msg 3", "msg 4"]
    assert all(r[2] == log.name for r in recs)
    assert recs[0][0] <= recs[-1][0]
    assert buf.recent(2) == recs[-2:] and buf.recent(0) == [] and buf.recent(10) == recs
    buf.detach()
    log.warning("after detach")
    assert buf.recent() == recs


def test_buffer_format_and_child_loggers(log):
    buf = LogBuffer().attach(log.name)
    log.getChild("sub").warning("hello %s", ["before"])
    (created, level, name, text) = buf.recent()[0]
    assert (level, name) == ("WARNING", f"{log.name}.sub")
    assert text.endswith(f" - {log.name}.sub - WARNING - hello ['before']")
    buf.detach()


@pytest.fixture
def taskcore_info():
    """The taskcore logger at INFO, as core-scheduler/core-worker --log-level info set it."""
    lg = logging.getLogger("taskcore")
    level = lg.level
    lg.setLevel(logging.INFO)
    yield
    lg.setLevel(level)


def test_get_scheduler_and_worker_logs(taskcore_info):
    async def main():
        async with cluster(n_workers=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                logging.getLogger("taskcore.scheduler").warning("scheduler marker 1")
                logs = await c.get_scheduler_logs()
                assert all(isinstance(lv, str) and isinstance(m, str) for lv, m in logs)
                # newest last
                assert logs[-1] == ("WARNING", logs[-1][1]) and "scheduler marker 1" in logs[-1][1]
                assert any("registered worker" in m for _, m in logs)
                assert await c.get_scheduler_logs(n=1) == logs[-1:]

                wlogs = await c.get_worker_logs()
                assert set(wlogs) == {w.address for w in ws}
                for addr, entries in wlogs.items():
                    assert any(f"worker {addr}" in m and "connected" in m for _, m in entries)
                one = await c.get_worker_logs(n=1, workers=[ws[0].address])
                assert set(one) == {ws[0].address} and len(one[ws[0].address]) == 1
                assert (await c.get_worker_logs(n=0))[ws[1].address] == []
                assert await c.get_worker_logs(nanny=True) == {}   # no nannies here
                with pytest.raises(ValueError, match="unknown workers"):
                    await c.get_worker_logs(workers=["tcp://127.0.0.1:1"])
                with pytest.raises(ValueError, match="n must be"):
                    await c.get_scheduler_logs(n=-1)
        # the buffers are detached when the servers close
        handlers = logging.getLogger("taskcore").handlers
        assert s.log_buffer not in handlers
        assert all(w.log_buffer not in handlers for w in ws)

    run(main())


def test_sync_client_logs():
    from taskcore import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, log_level="info") as cl, \
            Client(cl) as c:
        (addr,) = c.scheduler_info()["workers"]
        logs = c.get_worker_logs()
        assert any("connected" in m for _, m in logs[addr])   # from the worker's process
        assert c.get_scheduler_logs()
        # The nanny's copy: the worker process's stderr lines, kept across its restarts.
        c.run(lambda: logging.getLogger("taskcore.worker").warning("nanny marker"))
        nanny_logs = wait_until(lambda: (lambda d: d if any(
            "nanny marker" in m for _, m in d.get(addr, [])) else None)(
                c.get_worker_logs(nanny=True)), 30, "the marker in the nanny's logs")
        assert ("WARNING", next(m for _, m in nanny_logs[addr] if "nanny marker" in m)) in \
            nanny_logs[addr]
        assert len(c.get_worker_logs(n=2, nanny=True)[addr]) == 2
