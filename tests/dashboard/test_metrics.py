"""The scheduler's /metrics, scraped over HTTP and parsed by prometheus_client's parser."""
import asyncio
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from taskcore.client import Client
from taskcore.core.scheduler_state import WorkerHeartbeat
from taskcore.testing import run

from .conftest import dashboard_cluster

NAMES = ["taskcore_scheduler_tasks", "taskcore_scheduler_transitions",
         "taskcore_scheduler_workers", "taskcore_scheduler_clients", "taskcore_scheduler_comms",
         "taskcore_scheduler_memory_bytes", "taskcore_scheduler_spilled_bytes",
         "taskcore_scheduler_transfer_bytes", "taskcore_scheduler_event_loop_delay_seconds",
         "taskcore_scheduler_task_stream", "taskcore_scheduler_prefix_done"]


def inc(x):
    return x + 1


async def scrape(d) -> dict:
    """{(sample name, frozenset(labels)): value}."""
    async with aiohttp.ClientSession() as h:
        async with h.get(f"http://127.0.0.1:{d.port}{d.prefix}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(NAMES) <= set(families), set(NAMES) - set(families)
    assert families["taskcore_scheduler_transitions"].type == "counter"
    assert families["taskcore_scheduler_tasks"].type == "gauge"
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in families.values() for s in f.samples}


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_counters_move_with_the_work():
    async def main():
        async with dashboard_cluster(prefix="/m") as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            before = await scrape(d)
            assert value(before, "taskcore_scheduler_workers") == 2
            assert value(before, "taskcore_scheduler_clients") == 1
            assert value(before, "taskcore_scheduler_comms") >= 3
            assert value(before, "taskcore_scheduler_transitions_total") == 0
            futures = c.map(inc, range(40))
            await c.gather(futures)
            after = await scrape(d)
            assert value(after, "taskcore_scheduler_transitions_total") == s.state.n_transitions
            assert value(after, "taskcore_scheduler_transitions_total") >= 3 * 40
            assert value(after, "taskcore_scheduler_tasks", state="memory") == 40
            assert value(after, "taskcore_scheduler_tasks", state="memory") == \
                s.state.state_counts()["memory"]
            assert value(after, "taskcore_scheduler_tasks", state="processing") == 0
            assert value(after, "taskcore_scheduler_task_stream_total") == 40
            assert value(after, "taskcore_scheduler_prefix_done_total", prefix="inc") == 40
            assert value(after, "taskcore_scheduler_memory_bytes") == \
                sum(w.nbytes for w in s.state.workers.values()) > 0
            await asyncio.sleep(1.1)           # two samples of the loop-delay monitor
            delay = value(await scrape(d), "taskcore_scheduler_event_loop_delay_seconds")
            assert 0 <= delay < 1.0

    run(main())


def test_worker_sums_come_from_heartbeats_and_registries_are_per_scheduler():
    async def main():
        # heartbeats far apart, so the ones we inject are not overwritten during the test
        async with dashboard_cluster(worker_kwargs={"heartbeat_interval": 60}) as (s, ws, d), \
                dashboard_cluster(n_workers=0) as (s2, _, d2):
            samples = await scrape(d)
            assert value(samples, "taskcore_scheduler_spilled_bytes") == 0
            for i, w in enumerate(ws):
                s.handle(WorkerHeartbeat(w.address, {
                    "spilled_bytes": 1000 * (i + 1), "transfer_incoming_bytes": 10 * (i + 1),
                    "transfer_outgoing_bytes": 7, "comms": {"incoming": 2, "outgoing": i}},
                    time.time()))
            samples = await scrape(d)
            assert value(samples, "taskcore_scheduler_spilled_bytes") == 3000
            assert value(samples, "taskcore_scheduler_transfer_bytes_total",
                         direction="incoming") == 30
            assert value(samples, "taskcore_scheduler_transfer_bytes_total",
                         direction="outgoing") == 14
            assert value(samples, "taskcore_scheduler_worker_comms") == 5
            # a second scheduler in this process has its own registry and numbers
            other = await scrape(d2)
            assert value(other, "taskcore_scheduler_workers") == 0
            assert value(other, "taskcore_scheduler_spilled_bytes") == 0
            assert value(samples, "taskcore_scheduler_workers") == 2

    run(main())
