"""Live updates: one WebSocket route, `api/v1/stream?page=<kind>`, one channel per page kind.

A channel runs only while someone subscribes. Each interval it builds ONE snapshot (a
bounded dict from api.py / graph.py), encodes it once, and sends that same text to every
subscriber; a snapshot equal to the previous one is not sent. So the scheduler's cost is
per interval and per page kind, never per subscriber. The status page's task stream
travels as deltas: the channel keeps a cursor into the state machine's ring buffer and
sends only the rows recorded since its last snapshot (capped), with the index of the first,
so a page that loaded the history over HTTP can drop what it already has.

A slow subscriber cannot hold up the rest: each send has a deadline, and a subscriber
that misses it is closed (its page reconnects).
"""
from __future__ import annotations

import asyncio
import json
import logging

from taskcore.dashboard import api
from taskcore.dashboard.graph import task_graph

logger = logging.getLogger("taskcore.dashboard")

# page kind -> (seconds between snapshots, as a multiple of the server's interval)
PAGES = {"status": 1, "workers": 1, "graph": 2, "logs": 2}
STATUS_WORKERS = 100        # the status page's workers table (the workers page has more)
STATUS_PREFIXES = 50
STREAM_DELTA = 2000         # task stream rows per update at most
LIVE_LOGS = 500
SEND_TIMEOUT = 5.0


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)


class Channel:
    def __init__(self, hub, page: str):
        self.hub = hub
        self.page = page
        self.subscribers: set = set()
        self.last: str | None = None        # the last snapshot, without its clock
        self.last_sent: str | None = None   # the same as sent, for a new subscriber
        self.builds = 0             # snapshots built (tests check it does not scale)
        self._task = None
        self._since = 0
        self._failing = False       # log a failing build once, not every interval

    def subscribe(self, ws) -> None:
        self.subscribers.add(ws)
        if self._task is None or self._task.done():
            self.last = self.last_sent = None
            if self.page == "status":
                # the page loads the history over HTTP; deltas start from now
                self._since = self.hub.server.scheduler.state.task_stream_total
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unsubscribe(self, ws) -> None:
        self.subscribers.discard(ws)

    def build(self) -> dict:
        server = self.hub.server
        s = server.scheduler
        self.builds += 1
        if self.page == "status":
            stream = api.task_stream(s, self._since, STREAM_DELTA)
            self._since = stream["total"]
            return {"page": "status", "info": api.info(s, server),
                    "counts": api.task_counts(s),
                    "prefixes": server.progress.rows(s, STATUS_PREFIXES),
                    "workers": api.workers(s, STATUS_WORKERS),
                    "task_stream": stream}
        if self.page == "workers":
            return {"page": "workers", "info": api.info(s, server),
                    "workers": api.workers(s, api.LIMITS["workers"][0])}
        if self.page == "graph":
            return {"page": "graph", "info": api.info(s, server),
                    "graph": task_graph(s, api.LIMITS["graph"][0])}
        return {"page": "logs", "info": api.info(s, server),
                "logs": api.logs(server.log_buffer, LIVE_LOGS)}

    async def _run(self) -> None:
        period = self.hub.interval * PAGES[self.page]
        try:
            while self.subscribers:
                try:
                    snapshot = self.build()
                    now = snapshot["info"].pop("now")
                    text = _dumps(snapshot)
                    self._failing = False
                except Exception:
                    if not self._failing:
                        logger.exception("building the %s page's update failed", self.page)
                    self._failing = True
                    text = None
                if text is not None and text != self.last:
                    self.last = text
                    # the clock travels outside the comparison, so an idle page sends nothing
                    self.last_sent = text[:-1] + f',"now":{now!r}}}'
                    await self._send_all(self.last_sent)
                await asyncio.sleep(period)
        finally:
            self._task = None if self._task is asyncio.current_task() else self._task

    async def _send_all(self, text: str) -> None:
        subs = list(self.subscribers)

        async def send(ws):
            try:
                await asyncio.wait_for(ws.send_str(text), SEND_TIMEOUT)
            except Exception:
                self.subscribers.discard(ws)
                await _close_quietly(ws)

        await asyncio.gather(*(send(ws) for ws in subs))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        subs = list(self.subscribers)
        self.subscribers.clear()
        await asyncio.gather(*(_close_quietly(ws) for ws in subs))


async def _close_quietly(ws) -> None:
    try:
        # 1001 "going away": the page reconnects, which is right when a server restarts
        await asyncio.wait_for(ws.close(code=1001, message=b"dashboard closing"), 1.0)
    except Exception:
        pass


class LiveHub:
    """The channels of one dashboard server."""

    def __init__(self, server, interval: float = 0.5):
        self.server = server
        self.interval = interval
        self.channels = {page: Channel(self, page) for page in PAGES}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))
