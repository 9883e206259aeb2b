"""The data behind the dashboard's pages and its JSON API, as JSON-able dicts.

Every function here runs on the scheduler's event loop, so each is bounded: lists stop at
a hard cap (`LIMITS`), and nothing loops over all tasks; counts come from the state
machine's counters (`state_counts`, `prefix_counts`), the task stream from its ring
buffer. The graph, the one view that walks tasks, is in graph.py and stops at its limit.
"""
from __future__ import annotations

import itertools
import math
import time

# name -> (default, hard cap). A request above the cap gets the cap (the answer says which
# limit it used); a request below 0 (1 for `limit`s) is a bad request.
LIMITS = {
    "workers": (1000, 10_000),
    "prefixes": (200, 1000),
    "task_stream": (1000, 10_000),
    "graph": (1000, 5000),
    "logs": (200, 10_000),
}

STATES = ("released", "waiting", "queued", "no-worker", "processing", "memory", "erred")
PENDING = ("released", "waiting", "queued", "no-worker")

# Worker heartbeat metrics shown as numbers; every one is optional (older workers send
# fewer). `comms` may be a count or a dict of counts.
WORKER_METRICS = ("rss", "memory", "cpu", "executing", "ready", "in_memory", "spilled_bytes",
                  "spilled_count", "managed_bytes", "unmanaged_bytes", "memory_limit", "paused",
                  "transfer_incoming_bytes", "transfer_outgoing_bytes",
                  "transfer_incoming_count", "transfer_outgoing_count", "event_loop_delay",
                  "comms", "time")


def key_str(key) -> str:
    """A key as text: strings as they are, tuple keys (dask chunks) as their repr."""
    if type(key) is str:
        return key
    if type(key) is bytes:
        return key.decode("utf-8", "replace")
    return str(key)


def key_prefix(key) -> str:
    """The key's prefix as the state machine groups it ('inc-ab12' -> 'inc', ('x-3f', 0)
    -> 'x'), so the task stream's colours match the prefix counts."""
    while type(key) is tuple and key:
        key = key[0]
    if type(key) is bytes:
        key = key.decode("utf-8", "replace")
    if type(key) is not str:
        return type(key).__name__
    i = key.find("-")
    return key[:i] if i > 0 else key


def _number(v):
    """A JSON-safe number (inf and nan become None)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _metric_value(v):
    if isinstance(v, dict):
        return {str(k): _number(x) for k, x in itertools.islice(v.items(), 50)}
    return _number(v)


def total_comms(metrics: dict):
    """A worker's `comms` metric as one number (it may be a dict of counts per kind)."""
    v = metrics.get("comms")
    if isinstance(v, dict):
        return sum(x for x in v.values() if isinstance(x, (int, float)))
    return _number(v)


# -- info ------------------------------------------------------------------------------------

def info(scheduler, dashboard=None) -> dict:
    """The scheduler's identity and totals: O(workers), never O(tasks)."""
    state = scheduler.state
    nthreads = memory_limit = nbytes = 0
    for w in state.workers.values():
        nthreads += w.nthreads
        memory_limit += w.memory_limit
        nbytes += w.nbytes
    out = {
        "id": scheduler.id,
        "address": scheduler.address,
        "status": scheduler.status,
        "started": scheduler.start_time,
        "now": time.time(),
        "workers": len(scheduler.workers),
        "clients": len(scheduler.clients),
        "nthreads": nthreads,
        "memory_limit": memory_limit,
        "memory_bytes": nbytes,
        "tasks": len(state.tasks),
        "transitions": getattr(state, "n_transitions", None),
        "task_stream_total": getattr(state, "task_stream_total", None),
    }
    if dashboard is not None:
        out["dashboard"] = {"prefix": dashboard.prefix, "port": dashboard.port,
                            "event_loop_delay": dashboard.loop_delay.delay}
    return out


# -- workers -----------------------------------------------------------------------------------

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def worker_ident(name, wid) -> str:
    """The path segment naming a worker in `proxy/worker/<ident>/metrics`: its name when
    that is a plain token (survives any proxy's URL normalisation), else its id."""
    text = str(name) if name is not None else ""
    if text and set(text) <= _SAFE and not text.isdigit():
        return text
    return str(wid)


def find_worker(scheduler, ident: str):
    """The worker Peer named `ident` (a name or an id), or None. O(workers)."""
    state = scheduler.state
    for addr, peer in scheduler.workers.items():
        ws = state.workers.get(addr)
        if ws is None:
            continue
        if ident == worker_ident(ws.name, ws.id) or ident == str(ws.id):
            return peer
    return None


def worker_row(scheduler, address: str) -> dict | None:
    state = scheduler.state
    ws = state.workers.get(address)
    if ws is None:
        return None
    wi = state.worker_info(address)
    metrics = wi.get("metrics") or {}
    peer = scheduler.workers.get(address)
    dash = (peer.info or {}).get("dashboard_address") if peer is not None else None
    ident = worker_ident(wi["name"], wi["id"])
    return {
        "id": wi["id"], "ident": ident, "address": address,
        "name": key_str(wi["name"]) if wi["name"] is not None else address,
        "status": wi["status"], "nthreads": wi["nthreads"], "memory_limit": wi["memory_limit"],
        "processing": wi["processing"], "occupancy": _number(wi["occupancy"]),
        "memory_keys": wi["memory_keys"], "nbytes": wi["nbytes"],
        "last_seen": _number(wi["last_seen"]),
        "metrics": {k: _metric_value(metrics[k]) for k in WORKER_METRICS if k in metrics},
        "comms": total_comms(metrics),
        # relative to the dashboard's pages, so it stays under the prefix behind a proxy
        "metrics_path": f"proxy/worker/{ident}/metrics" if dash else None,
    }


def workers(scheduler, limit: int) -> dict:
    """Up to `limit` workers (registration order) with their latest metrics."""
    addresses = list(itertools.islice(scheduler.state.workers, limit))
    rows = [r for r in (worker_row(scheduler, a) for a in addresses) if r is not None]
    return {"total": len(scheduler.state.workers), "limit": limit, "workers": rows}


# -- tasks -----------------------------------------------------------------------------------

def task_counts(scheduler) -> dict:
    state = scheduler.state
    counts = state.state_counts()
    return {"total": len(state.tasks),
            "states": {s: counts.get(s, 0) for s in STATES}}


class PrefixProgress:
    """Per-prefix progress for the status page's bars.

    The state machine counts, per prefix, the live tasks in each state and `done`, tasks
    ever finished. A bar should show the current computation, so `finished` counts the
    tasks done since the prefix last had no live tasks, as observed by this dashboard
    (it checks on every call, i.e. every live update while a page is open)."""

    def __init__(self):
        self._baseline: dict = {}

    def rows(self, scheduler, limit: int) -> dict:
        counts = scheduler.state.prefix_counts()
        rows = []
        for name, c in counts.items():
            live = sum(c.get(s, 0) for s in STATES)
            done = c.get("done", 0)
            if live == 0:
                self._baseline[name] = done
            finished = max(done - self._baseline.get(name, 0), 0)
            pending = sum(c.get(s, 0) for s in PENDING)
            rows.append({
                "prefix": key_str(name), "live": live, "done": done, "finished": finished,
                "pending": pending, "processing": c.get("processing", 0),
                "memory": c.get("memory", 0), "erred": c.get("erred", 0),
                "total": finished + pending + c.get("processing", 0) + c.get("erred", 0),
                "states": {s: c.get(s, 0) for s in STATES},
            })
        # active prefixes first (most live tasks), then the rest by name
        rows.sort(key=lambda r: (-r["live"], r["prefix"]))
        return {"total": len(rows), "limit": limit, "prefixes": rows[:limit]}


# -- task stream -----------------------------------------------------------------------------

def task_stream(scheduler, since: int, limit: int) -> dict:
    """Computed tasks with index >= `since` (the latest `limit` of them), oldest first.
    `first` is the index of the first row; ask again with `since=total` for new ones."""
    total, rows = scheduler.state.task_stream(since=since, limit=limit)
    return {
        "total": total, "first": total - len(rows), "limit": limit,
        "rows": [{"key": key_str(k), "prefix": key_prefix(k), "worker": w,
                  "start": start, "stop": stop, "status": status}
                 for k, w, start, stop, status in rows],
    }


# -- logs --------------------------------------------------------------------------------------

def _log_text(level: str, name: str, message: str) -> str:
    # LogBuffer stores "time - logger - level - text"; the page shows those in columns
    head = f" - {name} - {level} - "
    i = message.find(head)
    return message[i + len(head):] if i >= 0 else message


def logs(buffer, n: int) -> dict:
    """The last `n` log records of the scheduler, newest last: `message` as recorded,
    `text` without its time, logger and level."""
    records = buffer.recent(n) if buffer is not None else []
    return {"n": n, "logs": [{"time": created, "level": level, "logger": name, "message": msg,
                              "text": _log_text(level, name, msg)}
                             for created, level, name, msg in records]}
