"""What an open dashboard costs the scheduler: tiny-task throughput with the status page
open and refreshing, against the same cluster with no page open, in alternating rounds.

| benchmark                 | baseline                              | target          |
|---------------------------|---------------------------------------|-----------------|
| client.map, tiny tasks    | the same cluster, no dashboard client | ratio >= 0.97   |

"Open" is what the status page does, done by a small process of our own (this file run as
a script) so that a browser's rendering does not compete for this 2-core machine's CPUs
with the scheduler, and so that its decoding does not compete for the GIL with the
benchmark's client: it loads the page, its assets and its first data (`api/v1/info`, the
task-stream history) once, then keeps the page's WebSocket (`api/v1/stream?page=status`)
subscribed, reading every update, and reloads the page and its first data every 2 s
("refreshing"). A round starts once the page has had its first live update, and runs
blocks of tiny tasks for a fixed time, so the steady state is measured, not the opening.
The rounds alternate closed/open (which one goes first alternates too), so both see the
same slow spells; the ratio is the median of the per-pair rate ratios.
"""
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time

import cloudpickle

from workloads import map_tasks

cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUICK = os.environ.get("TASKCORE_BENCH_QUICK", "") not in ("", "0")
BLOCK = 5_000               # tiny tasks per client.map
ROUND_SECONDS = 1.5 if QUICK else 3.0
PAIRS = 4 if QUICK else 8
REFRESH = 2.0
PAGE = ("status", "static/common.js", "static/status.js", "static/dashboard.css",
        "api/v1/info", "api/v1/task-stream?limit=5000")


async def _page(base: str):
    """The page's traffic until stdin closes; prints "ready" after the first update and
    the number of updates at the end."""
    import aiohttp

    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()

    def wait_for_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set_result, None)

    # A daemon thread: an executor's thread would keep a failed page process alive until
    # its stdin closes, and the benchmark would wait for a "ready" that never comes.
    threading.Thread(target=wait_for_stdin, daemon=True).start()
    updates = 0

    async def load(http):
        for path in PAGE:
            async with http.get(base + path) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {r.status}")
                await r.read()

    async def read(ws):
        nonlocal updates
        async for _ in ws:
            updates += 1
            if updates == 1:
                print("ready", flush=True)

    async with aiohttp.ClientSession() as http:
        await load(http)
        async with http.ws_connect(base + "api/v1/stream?page=status") as ws:
            reader = asyncio.ensure_future(read(ws))
            while not stdin_closed.done():
                await asyncio.wait({stdin_closed}, timeout=REFRESH)
                if not stdin_closed.done():
                    await load(http)
            reader.cancel()
    print(updates, flush=True)


class OpenPage:
    def __init__(self, base: str):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), base],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"the page client did not start (it said {line!r}):\n"
                               f"{self.proc.communicate()[1][-2000:]}")

    def close(self) -> int:
        """Stop; the number of live updates the page received."""
        out, _ = self.proc.communicate(input="", timeout=60)
        return int(out.split()[-1])


def test_status_page_cost(benchmark, ours):
    info = ours.scheduler_info()
    port = info.get("dashboard_port")
    assert port, "the benchmark cluster's scheduler serves no dashboard"
    base = f"http://127.0.0.1:{port}{info.get('dashboard_prefix') or ''}/"
    map_tasks(ours, 2_000)                              # warm up

    def rate():
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < ROUND_SECONDS:
            map_tasks(ours, BLOCK)
            n += BLOCK
        return n / (time.perf_counter() - t0)

    ratios, closed, opened, updates = [], [], [], 0

    def pair(i):
        nonlocal updates
        got = {}
        for side in (("closed", "open") if i % 2 == 0 else ("open", "closed")):
            if side == "open":
                page = OpenPage(base)
                try:
                    got[side] = rate()
                finally:
                    updates += page.close()
            else:
                got[side] = rate()
        closed.append(got["closed"])
        opened.append(got["open"])
        ratios.append(got["open"] / got["closed"])

    rounds = iter(range(PAIRS))
    benchmark.pedantic(lambda: pair(next(rounds)), rounds=PAIRS, iterations=1)
    assert updates >= PAIRS, "the open page received no live updates"
    benchmark.extra_info.update(
        ratio=statistics.median(ratios), closed_tasks_per_s=statistics.median(closed),
        open_tasks_per_s=statistics.median(opened), pairs=PAIRS, live_updates=updates,
        baseline="same cluster, no page open (alternating rounds)",
        target="ratio >= 0.97")


if __name__ == "__main__":
    asyncio.run(_page(sys.argv[1]))
