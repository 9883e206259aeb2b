"""The worker's memory policy (taskcore/worker_memory.py): options, spilling on the
target with the real servers in this process, then real processes (LocalCluster with
nannies): results worth 3x the memory limit, pause and resume, a worker paused too long
restarting without losing data, and a task over the limit ending as KilledWorker that
names memory."""
import asyncio
import os
import sys
import threading
import time
import urllib.request

import cloudpickle
import numpy as np
import pytest

from taskcore import Client, LocalCluster
from taskcore.errors import KilledWorker
from taskcore.testing import cluster, run, wait_until
from taskcore.worker_memory import ProcessMemory, memory_options, parse_fraction

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


def block(i, mib=5):
    """A deterministic, incompressible block of `mib` MiB."""
    return np.random.default_rng(i).random(mib * MiB // 8)


def token_block(i, mib=5):
    """A block whose first byte-pattern is random: a recomputed one differs."""
    a = block(i, mib)
    a[:2] = np.frombuffer(os.urandom(16), dtype=np.float64)
    return a


def total(x):
    return float(x.sum())


def add_first(x, y):
    return float(x[0] + y[0])


def spill_stats(dask_worker):
    return dask_worker.memory_manager.metrics()


# -- options ---------------------------------------------------------------------------------
def test_options_defaults_false_and_errors():
    o = memory_options()
    assert (o["target"], o["spill"], o["pause"], o["terminate"]) == (0.6, 0.7, 0.8, 0.95)
    assert o["pause_timeout"] == 60.0 and o["monitor_interval"] == 0.1 and o["max_spill"] is None
    o = memory_options(memory_target_fraction=False, memory_spill_fraction=0,
                       memory_pause_fraction="false", memory_terminate_fraction=None,
                       memory_pause_timeout="2m", memory_max_spill="1GiB")
    assert (o["target"], o["spill"], o["pause"], o["terminate"]) == (None,) * 4
    assert o["pause_timeout"] == 120.0 and o["max_spill"] == 2**30
    assert parse_fraction("x", "0.5") == 0.5 and parse_fraction("x", 1) == 1.0
    for bad in (1.5, -0.1, "lots", True, [0.5]):
        with pytest.raises(ValueError, match="memory_spill_fraction"):
            memory_options(memory_spill_fraction=bad)
    with pytest.raises(ValueError, match="memory_pause_timeout"):
        memory_options(memory_pause_timeout="soon")
    from taskcore.nanny import Nanny
    from taskcore.worker import Worker

    with pytest.raises(ValueError, match="memory_pause_fraction"):
        Worker("tcp://127.0.0.1:1", memory_pause_fraction=2)
    with pytest.raises(ValueError, match="memory_target_fraction"):
        Nanny("tcp://127.0.0.1:1", memory_target_fraction="half")
    with pytest.raises(ValueError, match="memory_terminate_fraction"):
        Nanny("tcp://127.0.0.1:1", memory_terminate_fraction=7)
    off = Nanny("tcp://127.0.0.1:1", memory_terminate_fraction=False)
    assert off.memory_terminate_fraction is None
    # No limit: nothing is managed and nothing is monitored.
    w = Worker("tcp://127.0.0.1:1", memory_limit=0)
    assert w.memory_manager.store is None and not w.memory_manager.enabled
    assert not w.memory_managed and w.memory_target_bytes == 0


def test_process_memory_reads_rss():
    import psutil

    rss = ProcessMemory()
    a, b = rss(), psutil.Process().memory_info().rss
    assert abs(a - b) < 16 * MiB
    x = np.ones(64 * MiB // 8)
    assert rss() - a > 48 * MiB
    del x
    rss.close()


# -- in this process: the target --------------------------------------------------------------
def _target_only(limit="100MB", **kw):
    """Spill on managed bytes only: this process's RSS (pytest, numpy) is not the worker's."""
    return dict(memory_limit=limit, memory_spill_fraction=False, memory_pause_fraction=False,
                memory_target_fraction=0.5, **kw)


def test_target_spills_lru_values_and_they_come_back_on_use():
    async def main():
        async with cluster(n_workers=1, worker_kwargs=_target_only()) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                fs = c.map(block, range(20))          # 20 x 5 MiB against a 50 MB target
                sums = await c.gather(c.map(total, fs))
                assert sums == [total(block(i)) for i in range(20)]
                store = w.memory_manager.store
                keys = {f.key for f in fs}
                assert len(store) >= 10 and set(store.index) <= keys
                assert all((k in w.data) != (k in store) for k in keys)   # exactly one place
                assert w.memory_manager.managed_in_memory() <= w.memory_target_bytes
                # least recently used first: the first blocks went to disk
                assert fs[0].key in store and fs[19].key in w.data
                before = store.unspill_count
                # a task on a spilled dependency reads it back: now the most recent value
                assert await c.submit(add_first, fs[0], fs[1]) == pytest.approx(
                    block(0)[0] + block(1)[0])
                assert store.unspill_count >= before + 2
                assert w.memory_manager.managed_in_memory() <= w.memory_target_bytes
                # the client gathers spilled values straight from disk
                got = await c.gather(fs[:3])
                for i in range(3):
                    np.testing.assert_array_equal(got[i], block(i))
                # released keys leave nothing on disk
                assert os.listdir(store.directory)
                del fs, got
                await asyncio.sleep(0)
                deadline = time.monotonic() + 10
                while (w.data or len(store)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert not w.data and len(store) == 0 and store.spilled_bytes == 0
                assert os.listdir(store.directory) == [] and w.spilled_bytes == 0
            directory = store.directory
        assert not os.path.exists(directory)          # the worker removed its folder
    run(main())


def test_peers_fetch_spilled_data_from_disk_and_dask_tasks_read_it_back():
    dask = pytest.importorskip("dask")

    async def main():
        async with cluster(n_workers=2, worker_kwargs=_target_only()) as (s, (a, b)):
            async with Client(s.address, asynchronous=True) as c:
                fs = c.map(block, range(16), workers=[a.address])
                await c.gather(c.map(total, fs, workers=[a.address]))
                store = a.memory_manager.store
                spilled = [f for f in fs if f.key in store]
                assert len(spilled) >= 6
                reads = store.unspill_count
                # tasks on b need a's spilled blocks: served from a's disk
                sums = await c.gather([c.submit(total, f, workers=[b.address], pure=False)
                                      for f in spilled])
                assert sums == [total(block(fs.index(f))) for f in spilled]
                assert store.unspill_count >= reads + len(spilled)
                assert a.memory_manager.managed_in_memory() <= a.memory_target_bytes
                # a dask graph over spilled values, through the dask task path
                import dask.array as da

                arrays = [da.from_delayed(dask.delayed(block)(i, 2), (2 * MiB // 8,), float)
                          for i in range(40)]
                x = c.persist(da.concatenate(arrays))   # 80 MiB held on the two workers
                result = await c.compute(x.sum())
                assert result == pytest.approx(sum(total(block(i, 2)) for i in range(40)))
                assert sum(len(w.memory_manager.store) for w in (a, b)) > 0
    run(main())


class Unpicklable:
    """Worth spilling by its size, impossible to pickle."""

    def __init__(self):
        self.lock = threading.Lock()
        self.payload = np.ones(4 * MiB // 8)

    @property
    def nbytes(self):
        return self.payload.nbytes


def make_unpicklable(i):
    return Unpicklable()


def payload_sum(u):
    return float(u.payload.sum())


def test_an_unpicklable_result_stays_in_memory_and_the_worker_goes_on():
    async def main():
        async with cluster(n_workers=1, worker_kwargs=_target_only("20MB")) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                bad = c.map(make_unpicklable, range(4))
                good = c.map(block, range(4), mib=2)
                assert await c.gather(c.map(payload_sum, bad)) == [4 * MiB / 8] * 4
                assert await c.gather(c.map(total, good)) == [total(block(i, 2)) for i in range(4)]
                store = w.memory_manager.store
                assert all(f.key in w.data for f in bad)
                assert all(f.key in store for f in good[:2])
                assert store.failed_count == 4
    run(main())


def test_heartbeat_and_prometheus_report_memory():
    async def main():
        async with cluster(n_workers=1, worker_kwargs=_target_only()) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                fs = c.map(block, range(14))
                await c.gather(c.map(total, fs))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    m = s.state.worker_info(w.address)["metrics"] or {}
                    if m.get("spilled_count"):
                        break
                    await asyncio.sleep(0.05)
                store = w.memory_manager.store
                assert m["spilled_count"] == len(store) > 0
                assert m["spilled_bytes"] == store.spilled_bytes
                assert m["managed_bytes"] <= 50_000_000 < m["managed_bytes"] + m["spilled_bytes"]
                assert m["unmanaged_bytes"] > 0 and m["memory_limit"] == 100_000_000
                assert m["paused"] is False and m["spill_count"] >= m["spilled_count"]
                text = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: urllib.request.urlopen(w.dashboard_link + "/metrics",
                                                         timeout=10).read().decode())
                lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                             if line and not line.startswith("#"))
                assert float(lines["taskcore_worker_spilled_keys"]) == len(store)
                assert float(lines["taskcore_worker_spilled_bytes"]) == store.spilled_bytes
                assert float(lines['taskcore_worker_spill_count_total{activity="spill"}']) >= 1
                assert float(lines["taskcore_worker_memory_limit_bytes"]) == 1e8
                assert float(lines["taskcore_worker_paused"]) == 0
                for name in ("taskcore_worker_managed_bytes", "taskcore_worker_unmanaged_bytes",
                             "taskcore_worker_spilled_disk_bytes",
                             'taskcore_worker_spill_bytes_total{activity="unspill"}',
                             'taskcore_worker_spill_seconds_total{activity="spill"}'):
                    assert name in lines, name
    run(main())


# -- the reason of a death, through the scheduler's state machine ----------------------------------
def test_remove_worker_reason_reaches_killed_worker():
    import pickle

    from taskcore.core.scheduler_state import (AddWorker, ComputeTask, RemoveWorker,
                                               SchedulerState, TaskErredReport, UpdateGraph)

    s = SchedulerState(validate=True, allowed_failures=1)
    s.handle_stimulus(AddWorker("w0", nthreads=1, memory_limit=2**20, stimulus_id="add-w0"))
    out = s.handle_stimulus(UpdateGraph("c1", [("big", "f", [], 0)], ["big"], stimulus_id="ug"))
    reason = "killed by its nanny: memory limit exceeded (rss 1.00 MiB > 95% of 1.00 MiB)"
    for i in range(2):
        [ct] = [x for x in out if type(x) is ComputeTask]
        s.handle_stimulus(AddWorker(f"w{i + 1}", nthreads=1, stimulus_id=f"add-w{i + 1}"))
        why = reason if i else None                     # the first death says nothing
        out = s.handle_stimulus(RemoveWorker(ct.worker, stimulus_id=f"death-{i}", reason=why))
    [r] = [x for x in out if type(x) is TaskErredReport]
    exc = r.exception
    assert isinstance(exc, KilledWorker) and exc.reason == reason and exc.last_worker == "w1"
    assert str(exc).endswith(f"The last worker was w1: {reason}.")
    again = pickle.loads(pickle.dumps(exc))             # as it travels to the client
    assert str(again) == str(exc) and again.reason == reason
    assert str(KilledWorker("k", "w", 2)).endswith("The last worker was w.")
    assert len(RemoveWorker("w9", reason="x" * 5000).reason) == 1000    # a peer's words: bounded


# -- real processes -------------------------------------------------------------------------------
def scheduler_metrics(c):
    return {a: w["metrics"] or {} for a, w in c.scheduler_info()["workers"].items()}


def test_results_three_times_the_memory_limit_complete_and_spill():
    t0 = time.monotonic()
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="400MiB",
                      dashboard_address=None) as cl, Client(cl) as c:
        n = 120                                    # 120 x 10 MiB = 1.2 GB = 3 x 2 x 400 MiB
        fs = c.map(block, range(n), mib=10)
        sums = c.gather(c.map(total, fs))
        assert sums == [total(block(i, 10)) for i in range(n)]
        # a second pass over every block reads most of them back from disk
        firsts = c.gather(c.map(add_first, fs[::2], fs[1::2]))
        assert firsts == [block(i, 10)[0] + block(i + 1, 10)[0] for i in range(0, n, 2)]
        stats = c.run(spill_stats)
        assert sum(m["spilled_count"] for m in stats.values()) >= n // 2
        assert sum(m["unspill_count"] for m in stats.values()) > 0
        for m in stats.values():
            assert m["spilled_count"] + m["managed_bytes"] // (10 * MiB) <= n
            assert m["managed_bytes"] <= 0.7 * 400 * MiB
        # the scheduler learns the same through the heartbeats
        wait_until(lambda: sum(m.get("spilled_count", 0)
                               for m in scheduler_metrics(c).values()) >= n // 2,
                   message="spill counts in the scheduler's worker metrics")
        del fs
    assert time.monotonic() - t0 < 30


def hog(mib, dask_worker=None):
    """Memory the worker does not manage (not a task result)."""
    dask_worker._test_hog = np.ones(mib * MiB // 8)


def unhog(dask_worker):
    dask_worker._test_hog = None


def executing_and_ready(dask_worker):
    return dask_worker.state.executing_count, dask_worker.state.ready_count


def test_pause_stops_new_tasks_keeps_serving_data_and_resumes():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="500MiB",
                      memory_terminate_fraction=False, dashboard_address=None) as cl, \
            Client(cl) as c:
        [addr] = c.scheduler_info()["workers"]
        kept = c.submit(block, 99, mib=1)
        assert c.submit(total, kept).result() == total(block(99, 1))
        c.run(hog, 400)                            # over 80% of 500 MiB
        wait_until(lambda: scheduler_metrics(c)[addr].get("paused"), timeout=10,
                   message="the scheduler to see the worker paused")
        assert c.run(lambda dask_worker: dask_worker.paused)[addr]
        f = c.submit(total, kept, pure=False)
        # The scheduler sends a paused worker nothing new: the task waits there.
        wait_until(lambda: c.scheduler_info()["workers"][addr]["status"] == "paused",
                   message="the scheduler to mark the worker paused")
        time.sleep(0.3)
        assert not f.done() and c.run(executing_and_ready)[addr] == (0, 0)
        # a paused worker still serves its data
        np.testing.assert_array_equal(c.gather(kept), block(99, 1))
        c.run(unhog)
        assert f.result(timeout=10) == total(block(99, 1))
        wait_until(lambda: not scheduler_metrics(c)[addr].get("paused"),
                   message="the scheduler to see the worker resumed")
        m = c.run(spill_stats)[addr]
        assert m["pause_count"] == 1 and not m["paused"]


def test_a_worker_paused_too_long_restarts_and_keeps_its_data():
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="500MiB",
                      memory_terminate_fraction=False, memory_pause_timeout=1,
                      dashboard_address=None) as cl, Client(cl) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        fs = c.map(token_block, range(6), workers=[a])
        originals = c.gather(fs)
        c.run(hog, 400, workers=[a])
        # a pauses, asks its nanny, retires (its data moves to b), and a new worker starts
        wait_until(lambda: a not in c.scheduler_info()["workers"]
                   and len(c.scheduler_info()["workers"]) == 2
                   and sum(n.restarts for n in cl.workers.values()) == 1, timeout=15,
                   message="the paused worker to be replaced by its nanny")
        assert all(n.status == "running" for n in cl.workers.values())
        # the data was moved, not recomputed: the random tokens are the originals
        holders = {w for ws in c.who_has(fs).values() for w in ws}
        assert holders <= set(c.scheduler_info()["workers"])
        for got, want in zip(c.gather(fs), originals):
            np.testing.assert_array_equal(got, want)
        new = (set(c.scheduler_info()["workers"]) - {b}).pop()
        assert not c.run(lambda dask_worker: dask_worker.paused)[new]
        assert c.submit(total, fs[0], workers=[new]).result() == total(originals[0])


def allocate_forever():
    chunks = []
    for _ in range(100):            # 20 MiB at a time, written (resident); bounded at 2 GB
        chunks.append(np.ones(20 * MiB // 8))     # in case the nanny missed it
        time.sleep(0.01)
    time.sleep(60)


def test_a_task_over_the_memory_limit_ends_as_killed_worker_naming_memory():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="300MiB",
                      scheduler_kwargs={"allowed_failures": 1}, dashboard_address=None) as cl, \
            Client(cl) as c:
        f = c.submit(allocate_forever, pure=False)
        with pytest.raises(KilledWorker) as info:
            f.result(timeout=30)
        text = str(info.value)
        assert "on 2 different workers" in text
        assert "killed by its nanny: memory limit exceeded" in text, text
        assert "> 95% of 300.00 MiB" in text, text
        assert info.value.reason.startswith("killed by its nanny")
        [nanny] = cl.workers.values()
        assert all("memory limit" in r for _, r in nanny.deaths)
        # the cluster goes on
        wait_until(lambda: nanny.restarts == 2 and len(c.scheduler_info()["workers"]) == 1,
                   timeout=15, message="the restarted worker")
        assert c.submit(total, np.ones(10)).result() == 10.0
