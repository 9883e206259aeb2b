"""SpecCluster reconciliation and the Cluster facade, with in-memory test doubles.

No real worker is involved: `SchedulerDouble` and `WorkerDouble` only
implement the member interface (taskcore/member.py), so these tests pin down
the cluster's bookkeeping independently of the servers. Where the cluster must
talk to its scheduler (retirement), a real in-process Scheduler answers: the
cluster has one path to a scheduler, over the network.
"""
import asyncio
import threading

import pytest

from taskcore.deploy import ProcessInterface, SpecCluster, Status
from taskcore.scheduler import Scheduler
from taskcore.testing import run


class SchedulerDouble(ProcessInterface):
    """Test double of a scheduler handle: its address leads nowhere, so whatever the
    cluster asks it fails (and is best effort: retirement, worker info)."""

    instances = []
    role = "scheduler"

    def __init__(self, **options):
        super().__init__()
        self.options = options
        self.closed = False
        SchedulerDouble.instances.append(self)

    async def start(self):
        self.address = "fake://scheduler"
        return await super().start()

    async def close(self):
        self.closed = True
        await super().close()


class RetiringScheduler(Scheduler):
    """A real in-process scheduler that records the retire requests it gets."""

    def __init__(self, **options):
        super().__init__(protocol="inproc")
        self.retired = []

    async def rpc_retire_workers(self, peer, workers, **kwargs):
        self.retired.append(sorted(workers))
        return {}


class WorkerDouble(ProcessInterface):
    """Test double of a worker handle: an in-memory ProcessInterface with knobs."""

    events = []

    def __init__(self, scheduler, name=None, fail=False, delay=0.0, nthreads=1,
                 memory_limit=None):
        super().__init__(scheduler=scheduler, name=name)
        self.fail = fail
        self.delay = delay
        self.thread = None

    async def start(self):
        self.thread = threading.current_thread().name
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError(f"worker {self.name} refuses to start")
        self.address = f"fake://worker-{self.name}"
        WorkerDouble.events.append(("start", self.name))
        return await super().start()

    async def close(self):
        WorkerDouble.events.append(("close", self.name))
        await super().close()

    def die(self):
        """Simulate the process ending on its own."""
        self.status = Status.failed
        self._finished.set()


@pytest.fixture(autouse=True)
def _reset():
    WorkerDouble.events.clear()
    SchedulerDouble.instances.clear()
    yield


def make(n=2, asynchronous=True, scheduler_cls=SchedulerDouble, template=None, **kw):
    template = template or {"cls": WorkerDouble, "options": {"nthreads": 2,
                                                             "memory_limit": 1000}}
    workers = {i: dict(template) for i in range(n)}
    return SpecCluster(workers=workers, scheduler={"cls": scheduler_cls, "options": {"x": 1}},
                       worker=template, asynchronous=asynchronous, **kw)


def test_start_scale_close_async():
    async def main():
        async with make(2) as cluster:
            assert cluster.status == "running"
            assert cluster.scheduler_address == "fake://scheduler"
            assert cluster.scheduler.options == {"x": 1}
            assert sorted(cluster.workers) == [0, 1]
            assert all(w.scheduler == "fake://scheduler" for w in cluster.workers.values())
            assert {w.address for w in cluster.workers.values()} == {
                "fake://worker-0", "fake://worker-1"}
            await cluster.scale(4)
            assert sorted(cluster.workers) == [0, 1, 2, 3]
            await cluster.scale(1)
            assert sorted(cluster.workers) == [0]  # the oldest worker stays
            await cluster.scale(0)
            assert cluster.workers == {} and cluster.worker_spec == {}
            await cluster.scale(2)
            assert len(cluster.workers) == 2
            handles = list(cluster.workers.values())
        assert cluster.status == "closed"
        assert cluster.workers == {}
        assert all(h.status == "closed" for h in handles)
        assert SchedulerDouble.instances[0].closed
    run(main())


def test_scale_only_edits_the_spec_then_reconciles():
    async def main():
        cluster = await make(1)
        task = cluster.scale(3)
        # The spec changed at once; the running set catches up when the task completes.
        assert len(cluster.worker_spec) == 3
        assert len(cluster.workers) == 1
        await task
        assert sorted(cluster.workers) == sorted(cluster.worker_spec)
        await cluster.close()
    run(main())


def test_concurrent_scales_converge_on_the_last_spec():
    async def main():
        async with make(1, template={"cls": WorkerDouble, "options": {"delay": 0.02}}) as c:
            await asyncio.gather(c.scale(5), c.scale(2), c.scale(3))
            assert len(c.worker_spec) == 3
            assert sorted(c.workers) == sorted(c.worker_spec)
    run(main())


def test_sync_mode_runs_on_a_background_loop():
    with make(2, asynchronous=False) as cluster:
        assert cluster.status == "running"
        assert len(cluster.workers) == 2
        threads = {w.thread for w in cluster.workers.values()}
        assert threads == {cluster._runner.name}
        assert cluster.scale(3) is None  # blocks until reconciled
        assert len(cluster.workers) == 3
        runner = cluster._runner
    assert cluster.status == "closed"
    assert not runner.running
    cluster.close()  # idempotent


def test_await_a_sync_cluster_is_an_error():
    cluster = make(0, asynchronous=False)
    try:
        async def main():
            with pytest.raises(TypeError):
                await cluster
        run(main())
    finally:
        cluster.close()


def test_failed_initial_start_cleans_up():
    template = {"cls": WorkerDouble, "options": {}}
    workers = {"good": template, "bad": {"cls": WorkerDouble, "options": {"fail": True}}}

    async def main():
        cluster = SpecCluster(workers=workers, scheduler={"cls": SchedulerDouble},
                              worker=template, asynchronous=True)
        with pytest.raises(RuntimeError, match="refuses"):
            await cluster
        await cluster.close()
        assert cluster.status == "closed"
        assert ("close", "good") in WorkerDouble.events
        assert SchedulerDouble.instances[0].closed
    run(main())

    with pytest.raises(RuntimeError, match="refuses"):
        SpecCluster(workers=workers, scheduler={"cls": SchedulerDouble}, worker=template)
    assert SchedulerDouble.instances[-1].closed


def test_failed_scale_up_is_dropped_and_logged():
    async def main():
        async with make(1) as cluster:
            cluster.new_spec = {"cls": WorkerDouble, "options": {"fail": True}}
            await cluster.scale(3)
            assert sorted(cluster.workers) == [0]
            assert sorted(cluster.worker_spec) == [0]  # no retry loop
            text = "\n".join((await cluster.get_logs())["Cluster"])
            assert "failed to start" in text
    run(main())


def test_worker_that_exits_on_its_own_is_replaced():
    async def main():
        async with make(2) as cluster:
            old = cluster.workers[1]
            old.die()
            for _ in range(200):
                if cluster.workers.get(1) not in (None, old) and cluster.workers[1].status == "running":
                    break
                await asyncio.sleep(0.01)
            # Same name, new handle: the spec holds.
            assert sorted(cluster.workers) == [0, 1] and cluster.workers[1] is not old
            assert sorted(cluster.worker_spec) == [0, 1]
            logs = "\n".join((await cluster.get_logs())["Cluster"])
            assert "exited unexpectedly" in logs and "replacement" in logs
    run(main())


def test_a_worker_that_keeps_dying_leaves_the_spec():
    async def main():
        async with make(2, max_rapid_deaths=3) as cluster:
            cluster.rapid_death_seconds = 60
            for _ in range(3):
                h = cluster.workers[1]
                h.die()
                for _ in range(500):
                    if cluster.workers.get(1) is not h:
                        if 1 not in cluster.worker_spec or (1 in cluster.workers and
                                                            cluster.workers[1].status == "running"):
                            break
                    await asyncio.sleep(0.01)
            assert sorted(cluster.worker_spec) == [0]
            assert sorted(cluster.workers) == [0]
            logs = "\n".join((await cluster.get_logs())["Cluster"])
            assert "died 3 times in a row" in logs
    run(main())


def test_an_expiring_worker_is_replaced_ahead_and_not_restarted():
    async def main():
        async with make(2) as cluster:
            old = cluster.workers[1]
            cluster.expire(1)
            cluster.expire(1)  # idempotent
            for _ in range(500):
                if len(cluster.workers) == 3:
                    break
                await asyncio.sleep(0.01)
            # The replacement runs next to the expiring worker, which keeps its place.
            assert sorted(cluster.workers) == [0, 1, 2] and cluster.workers[1] is old
            assert cluster._planned_workers() == 2
            old.die()  # it reaches its end
            for _ in range(500):
                if 1 not in cluster.worker_spec:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert sorted(cluster.worker_spec) == [0, 2] and sorted(cluster.workers) == [0, 2]
            logs = "\n".join((await cluster.get_logs())["Cluster"])
            assert "expires soon" in logs and "ended as planned" in logs
            assert "exited unexpectedly" not in logs
    run(main())


def test_a_handle_that_is_not_a_member_is_refused():
    class NotAMember:
        def __init__(self, scheduler, name=None):
            self.address = None

    async def main():
        cluster = make(1, template={"cls": NotAMember, "options": {}})
        with pytest.raises(TypeError, match="NotAMember is not a cluster member"):
            await cluster
    run(main())


def test_scale_down_retires_through_the_scheduler():
    async def main():
        async with make(3, scheduler_cls=RetiringScheduler) as cluster:
            await cluster.scale(1)
            assert cluster.scheduler.retired == [["fake://worker-1", "fake://worker-2"]]
        # Closing the whole cluster does not retire (nowhere to move data to).
        assert cluster.scheduler.retired == [["fake://worker-1", "fake://worker-2"]]
    run(main())


def test_worker_groups_count_workers_not_handles():
    template = {"cls": WorkerDouble, "options": {"nthreads": 1}, "group": ["-a", "-b"]}

    async def main():
        cluster = SpecCluster(workers={}, scheduler={"cls": SchedulerDouble}, worker=template,
                              asynchronous=True)
        async with cluster:
            await cluster.scale(4)
            assert len(cluster.workers) == 2
            assert cluster._count_workers() == 4
            await cluster.scale(3)  # rounds up to whole groups
            assert len(cluster.workers) == 2
            await cluster.scale(1)
            assert len(cluster.workers) == 1
            assert "workers=2" in repr(cluster)
    run(main())


def test_scale_by_cores_and_memory():
    async def main():
        async with make(0) as cluster:  # template: 2 threads, 1000 bytes
            await cluster.scale(cores=5)
            assert len(cluster.workers) == 3
            await cluster.scale(memory="2kB")
            assert len(cluster.workers) == 2
            with pytest.raises(TypeError):
                cluster.scale()
            with pytest.raises(ValueError):
                cluster.scale(-1)
    run(main())


def test_scale_up_without_a_template_is_an_error():
    async def main():
        cluster = SpecCluster(workers={0: {"cls": WorkerDouble}},
                              scheduler={"cls": SchedulerDouble}, asynchronous=True)
        async with cluster:
            with pytest.raises(ValueError, match="template"):
                cluster.scale(3)
            await cluster.scale(0)  # scaling down needs none
            assert cluster.workers == {}
    run(main())


def test_edit_spec_drops_not_yet_running_workers_first():
    async def main():
        async with make(2) as cluster:
            cluster.worker_spec["pending"] = {"cls": WorkerDouble}
            cluster._edit_spec(2)
            assert sorted(cluster.worker_spec, key=str) == [0, 1]
    run(main())


def test_specs_may_name_classes_by_dotted_path():
    async def main():
        cluster = SpecCluster(workers={"w": {"cls": "taskcore.deploy.spec.ProcessInterface"}},
                              scheduler={"cls": SchedulerDouble}, asynchronous=True)
        async with cluster:
            assert type(cluster.workers["w"]) is ProcessInterface
            assert cluster.workers["w"].status == "running"
    run(main())


@pytest.mark.parametrize("spec", [{"options": {}}, "WorkerDouble", {"cls": WorkerDouble, "x": 1}])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        SpecCluster(workers={0: spec}, scheduler={"cls": SchedulerDouble}, asynchronous=True)


def test_missing_scheduler_spec():
    with pytest.raises(ValueError, match="scheduler"):
        SpecCluster(workers={}, asynchronous=True)


def test_repr_html_and_logs():
    async def main():
        async with make(2, name="my<cluster>") as cluster:
            r = repr(cluster)
            assert r.startswith("SpecCluster('my<cluster>', 'fake://scheduler'")
            assert "workers=2" in r and "threads=4" in r and "status=running" in r
            html = cluster._repr_html_()
            assert "my&lt;cluster&gt;" in html and "fake://scheduler" in html
            logs = await cluster.get_logs()
            assert "Cluster" in logs
            assert any("scheduler at fake://scheduler" in line for line in logs["Cluster"])
            assert any("worker 0 started" in line for line in logs["Cluster"])
        assert "status=closed" in repr(cluster)
    run(main())


def test_log_buffer_is_bounded():
    async def main():
        async with make(0) as cluster:
            cap = cluster._logs.maxlen
            for i in range(cap + 10):
                cluster._log(20, "line %d", i)
            assert len(cluster._logs) == cap
    run(main())


def test_process_interface_base():
    async def main():
        p = ProcessInterface(scheduler="fake://s", name="p")
        assert p.status == "created"
        async with p:
            assert p.status == "running"
        assert p.status == "closed"
        await asyncio.wait_for(p.finished(), 1)
        assert "p" in repr(p)
        q = await ProcessInterface()
        assert q.status == "running"
    run(main())


def test_shutdown_on_close_false_detaches():
    async def main():
        cluster = SpecCluster(workers={0: {"cls": WorkerDouble}},
                              scheduler={"cls": SchedulerDouble}, asynchronous=True,
                              shutdown_on_close=False)
        await cluster
        handle = cluster.workers[0]
        await cluster.close()
        assert cluster.status == "closed"
        assert handle.status == "running"  # left running for another process to reattach
        assert not cluster.scheduler.closed
        await handle.close()
    run(main())
