"""The rest of the Client API: upload_file, get_executor, the repr, worker_client,
futures_of, metadata, replicate and rebalance."""
import concurrent.futures
import os
import sys
import time
import zipfile

import cloudpickle
import pytest

import taskcore
from taskcore import Client, LocalCluster, futures_of, wait
from taskcore.testing import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def slow(x, delay=0.2):
    time.sleep(delay)
    return x


def imported(name, attr="VALUE"):
    import importlib

    return getattr(importlib.import_module(name), attr)


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc:
        yield lc


@pytest.fixture
def c(lc):
    with Client(lc) as c:
        yield c


# -- upload_file ------------------------------------------------------------------------

def test_upload_py_reaches_current_and_later_workers(c, lc, tmp_path):
    path = tmp_path / "api2_mod_a.py"
    path.write_text("VALUE = 1\n")
    replies = c.upload_file(str(path))
    assert set(replies) == set(lc.scheduler.workers)
    assert c.submit(imported, "api2_mod_a", pure=False).result() == 1
    path.write_text("VALUE = 2\n")
    c.upload_file(str(path))                       # reloaded where it was imported
    assert set(c.run(imported, "api2_mod_a").values()) == {2}
    lc.scale(3)
    c.wait_for_workers(3)
    try:
        new = set(lc.scheduler.workers) - set(replies)
        assert new
        # The file is in the new worker's directory, set up before its first task.
        for w in new:
            assert c.submit(imported, "api2_mod_a", workers=[w], pure=False).result() == 2
            got = c.run(lambda dask_worker: os.listdir(
                taskcore.plugins.member_directory(dask_worker)), workers=[w])
            assert "api2_mod_a.py" in got[w]
    finally:
        lc.scale(2)
        c.wait_for_workers(2)


def test_upload_zip_and_egg(c, tmp_path):
    z = tmp_path / "api2pkgz.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("api2pkgz/__init__.py", "VALUE = 'zip'\n")
    c.upload_file(str(z))
    assert c.submit(imported, "api2pkgz", pure=False).result() == "zip"
    egg = tmp_path / "api2egg-0.1-py3.11.egg"
    with zipfile.ZipFile(egg, "w") as f:
        f.writestr("api2egg.py", "VALUE = 'egg'\n")
        f.writestr("EGG-INFO/PKG-INFO", "Name: api2egg\n")
    c.upload_file(str(egg), load=False)
    assert c.submit(imported, "api2egg", pure=False).result() == "egg"


def test_upload_errors(c, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        c.upload_file(str(tmp_path / "missing.py"))
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.py, \.egg, \.zip or \.whl"):
        c.upload_file(str(bad))
    with pytest.raises(TypeError):
        c.upload_file(42)
    broken = tmp_path / "api2_broken.py"
    broken.write_text("raise ImportError('api2 broken module')\n")
    with pytest.raises(ImportError, match="api2 broken module") as info:
        c.upload_file(str(broken))
    assert any("on inproc://" in n for n in getattr(info.value, "__notes__", []))
    # load=False: placed, not imported, so no error.
    c.upload_file(str(broken), load=False)


def test_upload_from_two_clients_and_a_task(c, lc, tmp_path):
    path = tmp_path / "api2_mod_b.py"
    path.write_text("VALUE = 'b'\n")
    with Client(lc, set_as_default=False) as c2:
        c2.upload_file(str(path))
        assert c.submit(imported, "api2_mod_b", pure=False).result() == "b"

    def from_task(p):
        from taskcore import get_client

        open(p, "w").write("VALUE = 'from a task'\n")
        get_client().upload_file(p)
        return True

    assert c.submit(from_task, str(tmp_path / "api2_mod_c.py")).result()
    assert c.submit(imported, "api2_mod_c", pure=False).result() == "from a task"


# -- get_executor ---------------------------------------------------------------------------

def test_executor(c):
    ex = c.get_executor()
    assert isinstance(ex, concurrent.futures.Executor)
    f = ex.submit(inc, 1)
    assert isinstance(f, concurrent.futures.Future)
    assert f.result(timeout=10) == 2
    assert list(ex.map(inc, range(5))) == [1, 2, 3, 4, 5]
    e = ex.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        e.result(timeout=10)
    done, _ = concurrent.futures.wait([ex.submit(inc, i) for i in range(10)], timeout=10)
    assert sorted(d.result() for d in done) == list(range(1, 11))
    with pytest.raises(concurrent.futures.TimeoutError):
        list(ex.map(slow, [1, 2], timeout=0.05))
    with c.get_executor(retries=1) as ex2:
        fs = [ex2.submit(slow, i, 0.05) for i in range(3)]
    assert all(f.done() for f in fs)               # shutdown(wait=True) on exit
    with pytest.raises(RuntimeError, match="shutdown"):
        ex2.submit(inc, 1)
    with pytest.raises(TypeError, match="unknown options"):
        c.get_executor(bogus=1)


def test_executor_with_workers_restriction(c, lc):
    w = sorted(lc.scheduler.workers)[0]
    ex = c.get_executor(workers=[w])
    assert ex.submit(lambda: __import__("taskcore").get_worker().address).result() == w


# -- repr, futures_of, metadata --------------------------------------------------------------

def test_repr(c):
    r = repr(c)
    assert r.startswith(f"<Client: {c.address!r} processes=2 threads=4, memory=")
    assert "GiB" in r or "MiB" in r
    html = c._repr_html_()
    assert "workers: 2" in html and "threads: 4" in html
    c2 = Client(c.address, set_as_default=False)
    c2.close()
    assert "status=closed" in repr(c2)


def test_futures_of(c):
    fs = c.map(inc, range(3))
    nested = {"a": [fs[0], (fs[1],)], "b": {fs[2]}}
    assert set(futures_of(nested)) == set(fs)
    assert set(c.futures_of(nested)) == set(fs)
    assert taskcore.futures_of is futures_of
    da = pytest.importorskip("dask.array")
    x = c.persist(da.ones(10, chunks=5))
    assert len(futures_of(x)) == 2


def test_metadata(c, lc):
    c.set_metadata("x", 1)
    c.set_metadata(["a", "b"], {"c": [1, 2]})
    assert c.get_metadata("x") == 1
    assert c.get_metadata("a") == {"b": {"c": [1, 2]}}
    assert c.get_metadata(["a", "b", "c"]) == [1, 2]
    with pytest.raises(KeyError):
        c.get_metadata("missing")
    assert c.get_metadata(["a", "nope"], default="d") == "d"
    with Client(lc, set_as_default=False) as c2:
        assert c2.get_metadata("x") == 1           # one store, on the scheduler
        c2.set_metadata(["a", "b"], "replaced")
    assert c.get_metadata(["a", "b"]) == "replaced"

    def in_task():
        from taskcore import get_client

        cl = get_client()
        cl.set_metadata("from-task", {"n": 3})
        return cl.get_metadata(["from-task", "n"])

    assert c.submit(in_task).result() == 3
    with pytest.raises(ValueError):
        c.set_metadata([], 1)


# -- replicate, rebalance --------------------------------------------------------------------

def test_replicate(c, lc):
    ws = sorted(lc.scheduler.workers)
    fs = c.map(lambda i: bytes(1000 + i), range(4), workers=[ws[0]])
    wait(fs)
    assert c.replicate(fs) == 4
    who = c.who_has(fs)
    assert all(sorted(v) == ws for v in who.values())
    c.replicate(fs, n=1)                           # copies past n are dropped
    wait_until(lambda: all(len(v) == 1 for v in c.who_has(fs).values()),
               message="extra replicas dropped")
    assert [len(x) for x in c.gather(fs)] == [1000, 1001, 1002, 1003]
    with pytest.raises(ValueError):
        c.replicate(fs, n=0)


def test_replica_outlives_a_holder():
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc, Client(lc) as c:
        ws = sorted(lc.scheduler.workers)
        f = c.submit(lambda: bytes(5000), workers=[ws[0]])
        wait(f)
        c.replicate([f], n=2, workers=ws[:2])
        assert sorted(c.who_has([f])[f.key]) == ws[:2]
        lc.scheduler._remove_worker(ws[0], safe=False, reason="test: the holder is gone")
        assert c.who_has([f])[f.key] == [ws[1]]
        assert len(f.result()) == 5000
        # The replica was used: the key was not recomputed.
        assert lc.scheduler.state.task_state(f.key) == "memory"


def test_rebalance(c, lc):
    ws = sorted(lc.scheduler.workers)
    fs = c.map(lambda i: bytes(100_000 + i), range(10), workers=[ws[0]])
    wait(fs)
    held = lambda: {w: len([k for k in ks if k in {f.key for f in fs}])   # noqa: E731
                    for w, ks in c.has_what().items()}
    assert held()[ws[1]] == 0
    out = c.rebalance(fs)
    assert out["moved"] == 5 and out["failed"] == 0
    wait_until(lambda: held() == {ws[0]: 5, ws[1]: 5}, message="balanced")
    assert all(len(v) == 1 for v in c.who_has(fs).values())     # moved, not copied
    assert [len(x) for x in c.gather(fs)] == [100_000 + i for i in range(10)]
    assert c.rebalance(fs)["moved"] == 0                          # already even


def test_rebalance_everything_and_with_workers(c, lc):
    ws = sorted(lc.scheduler.workers)
    fs = c.map(lambda i: bytes(50_000 + i), range(6), workers=[ws[1]])
    wait(fs)
    assert c.rebalance(workers=[ws[1]])["moved"] == 0          # one worker: nothing to do
    out = c.rebalance()
    assert out["failed"] == 0 and out["moved"] >= 2
    assert [len(x) for x in c.gather(fs)] == [50_000 + i for i in range(6)]


# -- more of the cluster ----------------------------------------------------------------------

def test_processing_nbytes_story(c, lc):
    f = c.submit(slow, 1, 0.5, key="slow-processing-1")
    wait_until(lambda: any("slow-processing-1" in ks for ks in c.processing().values()),
               message="processing shown")
    assert f.result() == 1
    g = c.submit(lambda: bytes(10_000), key="bytes-nbytes-1")
    wait(g)
    assert c.nbytes([g], summary=False)["bytes-nbytes-1"] >= 10_000
    assert c.nbytes(summary=True)["bytes"] >= 10_000
    story = c.story(f)
    assert ("slow-processing-1", "processing", "memory") in [s[:3] for s in story]


def test_retire_workers_keeps_data():
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc, Client(lc) as c:
        ws = sorted(lc.scheduler.workers)
        f = c.submit(lambda: bytes(2000), workers=[ws[0]])
        wait(f)
        out = c.retire_workers([ws[0]])
        assert list(out) == [ws[0]] and out[ws[0]]["address"] == ws[0]
        wait_until(lambda: ws[0] not in c.scheduler_info()["workers"], message="retired")
        assert len(f.result()) == 2000
        assert c.who_has([f])[f.key] and ws[0] not in c.who_has([f])[f.key]


def test_restart_workers():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc, \
            Client(lc) as c:
        pids = c.run(os.getpid)
        w = sorted(pids)[0]
        assert c.restart_workers([w]) == {w: "OK"}
        c.wait_for_workers(2)
        new = c.run(os.getpid)
        assert pids[w] not in new.values()
        assert set(pids.values()) & set(new.values())      # the other one kept running
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc2, \
            Client(lc2) as c2:
        [w2] = lc2.scheduler.workers
        with pytest.raises(RuntimeError, match="no nanny"):
            c2.restart_workers([w2])
        assert "no nanny" in c2.restart_workers([w2], raise_for_error=False)[w2]


def test_scheduler_file_callbacks_current(c, lc, tmp_path):
    path = tmp_path / "sched.json"
    c.write_scheduler_file(str(path))
    with Client(scheduler_file=str(path), set_as_default=False) as c2:
        assert c2.submit(inc, 1).result() == 2

    def setup(dask_worker):
        dask_worker.callback_ran = True

    c.register_worker_callbacks(setup)
    assert all(c.run(lambda dask_worker: dask_worker.callback_ran).values())
    with Client(lc, set_as_default=False) as c3:
        assert Client.current() is c
        with c3.as_current():
            assert Client.current() is c3
        assert Client.current() is c
    da = pytest.importorskip("dask.array")
    assert len(Client.collections_to_dsk([da.ones(4, chunks=2)])) >= 2


def test_structured_events(c, lc):
    got = []
    c.subscribe_topic("api2-topic", got.append)
    c.log_event("api2-topic", {"n": 1})
    c.log_event(["api2-topic", "api2-other"], "both")

    def from_task():
        from taskcore import get_worker

        get_worker().log_event("api2-topic", "from a task")
        return True

    assert c.submit(from_task).result()
    wait_until(lambda: len(c.get_events("api2-topic")) == 3, message="three events")
    events = c.get_events("api2-topic")
    assert [m for _, m in events] == [{"n": 1}, "both", "from a task"]
    assert all(isinstance(t, float) for t, _ in events)
    assert [m for _, m in c.get_events()["api2-other"]] == ["both"]
    wait_until(lambda: len(got) == 3, message="the subscriber's events")
    assert [m for _, m in got] == [{"n": 1}, "both", "from a task"]
    c.unsubscribe_topic("api2-topic")
    c.log_event("api2-topic", "after")
    assert len(c.get_events("api2-topic")) == 4
    time.sleep(0.1)
    assert len(got) == 3
    with pytest.raises(TypeError):
        c.log_event(3, "bad topic")


def _fan_out(x):
    from taskcore import worker_client

    with worker_client() as c:                  # seceded: the children get this thread
        return sum(c.gather(c.map(inc, [x, x + 100], pure=False)))


def test_worker_client_secedes_while_it_waits(lc):
    with Client(lc, set_as_default=False) as client:
        # As many parents as the cluster has threads: each waits on children, which could
        # never run if the parents held their slots.
        parents = client.map(_fan_out, range(4), pure=False)
        assert client.gather(parents) == [2 * x + 102 for x in range(4)]
    with pytest.raises(ValueError, match="outside"):
        with taskcore.worker_client():
            pass
