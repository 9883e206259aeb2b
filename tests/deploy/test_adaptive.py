"""Adaptive scaling: the policy step by step (scripted scheduler answers), then a real burst."""
import asyncio
import math
import time

import pytest

from taskcore import Client
from taskcore.deploy import SpecCluster
from taskcore.deploy.adaptive import Adaptive
from taskcore.deploy.local import LocalCluster
from taskcore.testing import run

from .test_spec import SchedulerDouble, WorkerDouble  # noqa: E402  (the spec tests' doubles)


def scripted(cluster, answers):
    """Make the cluster's scheduler answer adaptive questions from `answers` (a list).

    Each answer is (target, {spec name: processing}) for the workers running now.
    """
    answers = list(answers)

    async def call(func, **kwargs):
        target, busy = answers.pop(0) if len(answers) > 1 else answers[0]
        workers = {f"fake://worker-{n}": {"name": str(n), "processing": busy.get(n, 0),
                                          "nbytes": 0, "status": "running"}
                   for n in cluster.workers}
        # cheapest first: fewest processing, then name
        order = sorted(workers, key=lambda a: (workers[a]["processing"], a))
        return {"target": target, "order": order, "workers": workers}

    cluster._scheduler_call = call


def make(n=1):
    template = {"cls": WorkerDouble, "options": {"nthreads": 1}}
    return SpecCluster(workers={i: dict(template) for i in range(n)},
                       scheduler={"cls": SchedulerDouble}, worker=template, asynchronous=True)


def test_scale_up_is_immediate_and_bounded():
    async def main():
        async with make(1) as cluster:
            scripted(cluster, [(50, {})])
            a = Adaptive(cluster, minimum=1, maximum=4, interval=0.01)
            assert await a.adapt() == "up"
            assert len(cluster.workers) == 4 and a.scale_ups == 1
            assert await a.adapt() == "same"  # the plan counts starting workers too
            assert a.log[0]["action"] == "up" and a.log[0]["after"] == 4
    run(main())


def test_scale_down_needs_wait_count_idle_ticks_and_never_takes_busy_workers():
    async def main():
        async with make(4) as cluster:
            a = Adaptive(cluster, minimum=1, maximum=10, wait_count=3, interval=0.01)
            # Target 1, but workers 0 and 1 are busy: only 2 and 3 may go.
            scripted(cluster, [(0, {0: 1, 1: 2})])
            assert await a.adapt() == "wait"
            assert await a.adapt() == "wait"
            assert len(cluster.workers) == 4
            assert await a.adapt() == "down"
            assert sorted(cluster.workers) == [0, 1]
            assert a.log[-1]["workers"] == ["2", "3"]
            # Now all idle: 1 more must go, again only after 3 ticks.
            scripted(cluster, [(0, {})])
            assert [await a.adapt() for _ in range(3)] == ["wait", "wait", "down"]
            assert len(cluster.workers) == 1
            assert [await a.adapt() for _ in range(5)] == ["same"] * 5  # minimum holds
            assert a.scale_downs == 2
    run(main())


def test_bursty_load_does_not_flap():
    async def main():
        async with make(4) as cluster:
            a = Adaptive(cluster, minimum=0, maximum=4, wait_count=3, interval=0.01)
            # Idle, idle, busy again, idle, idle... never three idle ticks in a row.
            scripted(cluster, [(0, {}), (0, {}), (4, {}), (0, {}), (0, {}), (4, {})] * 3)
            for _ in range(18):
                await a.adapt()
            assert len(cluster.workers) == 4
            assert a.scale_downs == 0 and a.scale_ups == 0
    run(main())


def test_adapt_twice_replaces_and_manual_scale_ends_adaptive():
    async def main():
        async with make(1) as cluster:
            scripted(cluster, [(2, {})])
            first = cluster.adapt(minimum=1, maximum=2, interval=0.01)
            assert cluster.adaptive is first
            second = cluster.adapt(minimum=3, maximum=3, interval=0.01)
            assert cluster.adaptive is second and first.status == "stopped"
            for _ in range(200):
                if len(cluster.workers) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(cluster.workers) == 3
            await cluster.scale(1)  # manual: adaptive mode ends, and stays ended
            assert cluster.adaptive is None and second.status == "stopped"
            await asyncio.sleep(0.05)
            assert len(cluster.workers) == 1
            logs = "\n".join((await cluster.get_logs())["Cluster"])
            assert "replaces the previous adaptive policy" in logs
            assert "manual scale ends adaptive mode" in logs
            third = cluster.adapt(minimum=2, maximum=2, interval=0.01)
            third.stop()
            assert cluster.adaptive is None and third.status == "stopped"
    run(main())


def test_bounds_are_validated():
    async def main():
        async with make(0) as cluster:
            with pytest.raises(ValueError):
                Adaptive(cluster, minimum=3, maximum=2)
            with pytest.raises(ValueError):
                Adaptive(cluster, minimum=-1)
            with pytest.raises(ValueError):
                Adaptive(cluster, wait_count=0)
            a = Adaptive(cluster, minimum_cores=3, maximum=math.inf)
            assert a.minimum == 3  # one thread per worker in the template
    run(main())


def sleepy(i):
    time.sleep(0.1)
    return i * 2


def test_burst_scales_to_maximum_and_back_without_losing_results():
    """500 tasks of 0.1 s: up to the maximum, back to the minimum when idle, all results kept."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster, \
            Client(cluster) as client:
        adaptive = cluster.adapt(minimum=1, maximum=5, target_duration="1s", wait_count=3,
                                 interval="100ms")
        t0 = time.monotonic()
        futures = client.map(sleepy, range(500))
        peak = 0
        while not all(f.done() for f in futures):
            peak = max(peak, len(cluster.workers))
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        busy_time = time.monotonic() - t0
        assert peak == 5
        # Idle now: back to the minimum, with the results moved off the retired workers.
        deadline = time.monotonic() + 20
        while len(cluster.workers) > 1:
            assert time.monotonic() < deadline, adaptive.log
            time.sleep(0.05)
        assert client.gather(futures) == [i * 2 for i in range(500)]
        actions = [e["action"] for e in adaptive.log if e["action"] in ("up", "down")]
        # Up once or twice (the first estimate may be below the cap), then down; never again up.
        # One or two steps up; down in as many steps as the workers go idle at different
        # times (at most one per worker above the minimum), and never up again after that.
        assert 1 <= adaptive.scale_ups <= 2 and 1 <= adaptive.scale_downs <= 4, adaptive.log
        assert "up" not in actions[actions.index("down"):], actions
        assert busy_time < 30


def test_scaling_another_worker_group_keeps_adaptive_mode():
    async def main():
        async with make(1) as cluster:
            scripted(cluster, [(1, {})])
            cluster.add_worker_group("big", spec={"cls": WorkerDouble, "options": {}})
            adaptive = cluster.adapt(minimum=1, maximum=2, interval=0.01)
            await cluster.scale(2, worker_group="big")
            assert cluster.adaptive is adaptive and adaptive.status == "running"
            assert cluster._planned_workers("big") == 2
            await cluster.scale_down(["big-0"])
            assert cluster.adaptive is None  # scale_down always ends it
    run(main())
