"""client.forward_logging: task log records from worker processes, re-emitted here."""
import logging
import socket
import sys

import cloudpickle
import pytest

import taskcore.forward_logging as fl
from taskcore import Client, LocalCluster
from taskcore.testing import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def log_in_task(name, level, text, n=1):
    import logging

    for i in range(n):
        logging.getLogger(name).log(level, text + " %d", i)
    return n


def log_exception(name):
    import logging

    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger(name).exception("failed here")
    return True


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self):
        return [r.getMessage() for r in self.records]


@pytest.fixture
def collect():
    h = Collect()
    for name in ("user", "other", ""):
        logging.getLogger(name or None).addHandler(h)
    yield h
    for name in ("user", "other", ""):
        logging.getLogger(name or None).removeHandler(h)


@pytest.fixture(scope="module")
def cl():
    with LocalCluster(n_workers=1, threads_per_worker=2) as cluster:
        yield cluster


def test_forwarded_records_name_level_worker_and_filters(cl, collect):
    with Client(cl) as c:
        (addr,) = c.scheduler_info()["workers"]
        c.forward_logging("user", level="WARNING")
        assert c.submit(log_in_task, "user.mod", logging.WARNING, "warned").result() == 1
        c.submit(log_in_task, "user.mod", logging.INFO, "too low").result()   # below level
        c.submit(log_in_task, "other", logging.ERROR, "not forwarded").result()
        c.submit(log_exception, "user.exc").result()
        wait_until(lambda: len(collect.records) >= 2, 10, "two forwarded records")
        # the worker's own (non-task) records are not forwarded: run() is not a task
        c.run(log_in_task, "user.mod", logging.ERROR, "from run, not a task")
        c.submit(log_in_task, "user.mod", logging.ERROR, "last").result()
        wait_until(lambda: "last 0" in collect.messages(), 10, "the last record")
        msgs = collect.messages()
        assert "warned 0" in msgs and "failed here" in msgs
        assert not any(m.startswith(("too low", "not forwarded", "from run")) for m in msgs)
        r = collect.records[msgs.index("warned 0")]
        assert r.name == "user.mod" and r.levelname == "WARNING" and r.worker == addr
        exc = collect.records[msgs.index("failed here")]
        assert exc.levelno == logging.ERROR and "ZeroDivisionError" in exc.exc_text
        assert r.process != __import__("os").getpid()        # made in the worker process

        c.unforward_logging("user")
        n = len(collect.records)
        c.submit(log_in_task, "user.mod", logging.ERROR, "after unforward").result()
        c.forward_logging("other")
        c.submit(log_in_task, "other.x", logging.ERROR, "other now").result()
        wait_until(lambda: "other now 0" in collect.messages(), 10, "the other logger")
        assert "after unforward 0" not in collect.messages()[n:]


def test_root_logger_batches_and_new_workers(cl, collect, monkeypatch):
    calls = []
    real = fl.reemit

    def counting(worker, records):
        calls.append(len(records))
        real(worker, records)

    monkeypatch.setattr(fl, "reemit", counting)
    with Client(cl) as c:
        c.forward_logging()                       # the root: every logger
        assert c.submit(log_in_task, "any.thing", logging.WARNING, "burst", 2000).result()
        wait_until(lambda: sum(calls) >= 2000, 20, "2000 records")
        assert sum(calls) == 2000
        assert len(calls) <= 10                   # batched, not one message per record
        # a worker that joins later forwards too
        before = set(c.scheduler_info()["workers"])
        cl.scale(2)
        c.wait_for_workers(2, timeout=30)
        (new,) = set(c.scheduler_info()["workers"]) - before
        c.submit(log_in_task, "late", logging.ERROR, "from the new worker",
                 workers=[new], allow_other_workers=False).result()
        wait_until(lambda: "from the new worker 0" in collect.messages(), 10,
                   "a record from the new worker")
        rec = [r for r in collect.records if r.getMessage() == "from the new worker 0"][0]
        assert rec.worker == new
    cl.scale(1)


def test_closing_the_client_stops_forwarding(cl, collect):
    def subscriptions(dask_scheduler):
        subs = getattr(dask_scheduler, "_diag_logs", None)
        return {} if subs is None else {k: dict(v) for k, v in subs.by_client.items()}

    def forwarding(dask_worker):
        return dask_worker.log_forwarder is not None

    c2 = Client(cl)
    wait_until(lambda: c2.run_on_scheduler(subscriptions) == {}, 10, "no subscriptions")
    # A client that closes unforwards at once.
    c1 = Client(cl)
    c1.forward_logging("user")
    assert c2.run_on_scheduler(subscriptions) == {c1.id: {"user": 0}}
    assert all(c2.run(forwarding).values())
    c1.close()
    wait_until(lambda: c2.run_on_scheduler(subscriptions) == {}, 10, "the subscription gone")
    wait_until(lambda: not any(c2.run(forwarding).values()), 10, "workers to stop forwarding")
    # A client that just disappears (its connection cut, no goodbye): the next batch
    # finds it gone, the scheduler forgets it and tells the workers.
    c3 = Client(cl)
    c3.forward_logging("user")
    c3.reconnect_timeout = 0                     # stays gone
    c3.loop.call_soon_threadsafe(c3.comm.abort)
    wait_until(lambda: c3.status == "disconnected", 10, "the cut connection")
    c2.submit(log_in_task, "user.x", logging.ERROR, "orphan").result()
    wait_until(lambda: c2.run_on_scheduler(subscriptions) == {}, 10, "the orphan gone")
    wait_until(lambda: not any(c2.run(forwarding).values()), 10, "workers to stop again")
    c3.close()
    c2.close()


def test_bad_arguments(cl):
    with Client(cl) as c:
        with pytest.raises(ValueError, match="invalid logging level"):
            c.forward_logging("user", level="LOUD")
        with pytest.raises(TypeError, match="logger_name"):
            c.forward_logging(3)


def test_subscriptions_unit():
    s = fl.Subscriptions()
    s.add("c1", None, 0)
    s.add("c2", "app", logging.ERROR)
    s.add("c2", "app.db", logging.DEBUG)
    assert s.union() == {"": 0, "app": logging.ERROR, "app.db": logging.DEBUG}
    recs = [{"name": "app.web", "levelno": logging.WARNING},
            {"name": "app.db.pool", "levelno": logging.INFO},
            {"name": "apple", "levelno": logging.ERROR}]
    routed = s.route(recs)
    assert routed["c1"] == recs
    assert routed["c2"] == [recs[1]]                      # "apple" is not under "app"
    assert s.keep_only({"c2"}) and list(s.by_client) == ["c2"]
    s.remove("c2", everything=True)
    assert s.by_client == {} and not s.keep_only(set())


def test_forwarding_resumes_after_the_scheduler_restarts(collect):
    """The scheduler process is killed and another starts on its port: the client
    reconnects and asks the new one to forward again; the worker reconnects too."""
    import asyncio
    import json
    import subprocess

    from taskcore.testing import run
    from taskcore.worker import Worker

    def start_scheduler(port):
        proc = subprocess.Popen([sys.executable, "-m", "taskcore.cli.scheduler", "--port",
                                 str(port), "--no-dashboard"], stdout=subprocess.PIPE, text=True)
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        return proc, ready["address"]

    def forwarded(text):
        return [r for r in collect.records
                if r.getMessage() == text and getattr(r, "worker", None)]

    async def until(pred, what, timeout=30):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []

    async def main():
        proc, address = start_scheduler(port)
        procs.append(proc)
        w = await Worker(address, dashboard_address=None).start()
        c = await Client(address, asynchronous=True)
        try:
            await c.forward_logging("user")
            await c.submit(log_in_task, "user.a", logging.ERROR, "before")
            await until(lambda: forwarded("before 0"), "the first record")
            proc.kill()
            proc.wait()
            await until(lambda: c.status == "disconnected", "the client to notice")
            procs.append(start_scheduler(port)[0])
            await until(lambda: c.status == "running" and w.status == "running",
                        "client and worker back")
            await c.submit(log_in_task, "user.a", logging.ERROR, "after")
            await until(lambda: forwarded("after 0"), "a record after the restart")
        finally:
            await c.close()
            await w.close()

    try:
        run(main(), timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.wait()
