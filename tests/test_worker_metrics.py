"""Worker heartbeat metrics and each worker's /metrics endpoint (Prometheus)."""
import asyncio
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from taskcore.client import Client
from taskcore.testing import cluster, import_required, run
from taskcore.worker_metrics import parse_dashboard_address


def inc(x):
    return x + 1


def make_bytes(n):
    return b"x" * n


def length(b):
    return len(b)


async def scrape(url):
    parser = import_required("prometheus_client.parser")
    text = await asyncio.get_running_loop().run_in_executor(
        None, lambda: urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_per_worker_counters_and_close_frees_the_port():
    async def main():
        async with cluster(n_workers=2, nthreads=1) as (s, ws):
            a, b = ws
            # the URL is in the registration message, on the worker's listen host
            for w in ws:
                assert w.dashboard_link.startswith("http://127.0.0.1:")
                assert s.workers[w.address].info["dashboard_address"] == w.dashboard_link
            async with Client(s.address, asynchronous=True) as c:
                m0 = await scrape(a.dashboard_link)
                for name in ("taskcore_worker_executing", "taskcore_worker_memory_bytes",
                             "taskcore_worker_spilled_bytes",
                             "taskcore_worker_transfer_incoming_bytes_total",
                             "taskcore_worker_transfer_outgoing_bytes_total",
                             "taskcore_worker_event_loop_delay_seconds",
                             "taskcore_worker_comms", "taskcore_worker_rss_bytes",
                             "taskcore_worker_cpu_percent"):
                    assert (name, ()) in m0, name
                assert value(m0, "taskcore_worker_rss_bytes") > 10e6
                # every state is there, at zero too (a series must not vanish)
                for state in ("memory", "executing", "ready", "waiting", "fetch", "flight"):
                    assert ("taskcore_worker_tasks", (("state", state),)) in m0
                # 10 results on a, one on b: each worker has its own numbers
                fa = c.map(inc, range(10), workers=[a.address])
                fb = c.submit(inc, 100, workers=[b.address])
                await c.gather(fa + [fb])
                ma, mb = await scrape(a.dashboard_link), await scrape(b.dashboard_link)
                assert value(ma, "taskcore_worker_tasks", state="memory") == 10
                assert value(mb, "taskcore_worker_tasks", state="memory") == 1
                assert value(ma, "taskcore_worker_memory_bytes") > 0
                # a transfer: b computes len() of a 1 MB value held by a
                big = c.submit(make_bytes, 1_000_000, workers=[a.address])
                n = c.submit(length, big, workers=[b.address])
                assert await n == 1_000_000
                ma, mb = await scrape(a.dashboard_link), await scrape(b.dashboard_link)
                assert value(mb, "taskcore_worker_transfer_incoming_bytes_total") >= 1_000_000
                assert value(mb, "taskcore_worker_transfer_incoming_count_total") >= 1
                assert value(ma, "taskcore_worker_transfer_outgoing_bytes_total") >= 1_000_000
                assert value(ma, "taskcore_worker_transfer_outgoing_count_total") >= 1
                assert value(mb, "taskcore_worker_comms") >= 1
                assert value(ma, "taskcore_worker_transfer_incoming_bytes_total") == 0
            ports = [urllib.parse.urlsplit(w.dashboard_link).port for w in ws]
        for port in ports:
            # closed: nothing listens there, and a new server can listen on it (with
            # SO_REUSEADDR as servers do: the scrapes' connections sit in TIME_WAIT)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()

    run(main())


def test_heartbeat_metrics_and_event_loop_delay():
    async def main():
        async with cluster(n_workers=2, nthreads=1,
                           worker_kwargs={"heartbeat_interval": 0.05}) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                big = c.submit(make_bytes, 100_000, workers=[ws[0].address])
                assert await c.submit(length, big, workers=[ws[1].address]) == 100_000

                def block_loop(dask_worker):
                    time.sleep(0.3)           # run() runs on the worker's event loop

                await c.run(block_loop, workers=[ws[0].address])
                seen = []
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    info = (await c.scheduler_info())["workers"]
                    m0 = info[ws[0].address]["metrics"]
                    m1 = info[ws[1].address]["metrics"]
                    seen.append(m0.get("event_loop_delay", 0))
                    if max(seen) >= 0.2 and m1.get("transfer_incoming_bytes", 0) >= 100_000:
                        break
                    await asyncio.sleep(0.02)
                assert max(seen) >= 0.2
                for key in ("cpu", "event_loop_delay", "transfer_incoming_bytes",
                            "transfer_outgoing_bytes", "transfer_incoming_count",
                            "transfer_outgoing_count", "spilled_bytes", "comms"):
                    assert key in m0 and key in m1, key
                assert m1["transfer_incoming_bytes"] >= 100_000
                assert m1["transfer_incoming_count"] >= 1
                assert m0["transfer_outgoing_count"] >= 1 and m0["spilled_bytes"] == 0
                assert 0 <= m0["cpu"] <= 100 * 64

    run(main())


def test_no_dashboard():
    async def main():
        async with cluster(n_workers=1, worker_kwargs={"dashboard_address": None}) as (s, ws):
            assert ws[0].metrics_server is None and ws[0].dashboard_link is None
            assert s.workers[ws[0].address].info["dashboard_address"] is None

    run(main())


def test_fixed_port_and_bad_addresses():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main():
        async with cluster(n_workers=1,
                           worker_kwargs={"dashboard_address": f"127.0.0.1:{port}"}) as (s, ws):
            assert ws[0].dashboard_link == f"http://127.0.0.1:{port}"
            m = await scrape(ws[0].dashboard_link)
            assert ("taskcore_worker_executing", ()) in m

    run(main())
    from taskcore.worker import Worker

    for bad in ("nonsense", ":99999", "host:port", 3.5):
        with pytest.raises(ValueError, match="dashboard_address"):
            Worker("tcp://127.0.0.1:1", dashboard_address=bad)
    assert parse_dashboard_address(":0", "10.0.0.1") == ("10.0.0.1", 0)
    assert parse_dashboard_address(8787, "h") == ("h", 8787)
    assert parse_dashboard_address("[::1]:9000", "h") == ("::1", 9000)


def test_cli_options():
    from taskcore.cli.worker import parse_args

    assert parse_args(["tcp://127.0.0.1:1"]).dashboard_address == ":0"
    assert parse_args(["tcp://127.0.0.1:1", "--no-dashboard"]).dashboard_address is None
    assert parse_args(["tcp://127.0.0.1:1", "--dashboard-address", ":9100"]).dashboard_address \
        == ":9100"
    for argv, msg in ((["--dashboard-address", "bogus"], "invalid dashboard_address"),
                      (["--dashboard-address", ":9100", "--nworkers", "2"], "fixed port")):
        p = subprocess.run([sys.executable, "-m", "taskcore.cli.worker", "tcp://127.0.0.1:1",
                            *argv], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
