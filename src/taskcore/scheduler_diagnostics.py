"""The scheduler's side of the diagnostics API (docs/diagnostics.md).

`SchedulerDiagnostics` is a mixin of `Scheduler`: its `rpc_<name>(peer, **args)`
methods answer clients like the Scheduler's own, and the Scheduler calls its hooks:

    _diag_worker_added(peer)          after a worker registered
    _diag_worker_message(peer, msg)   a worker's message whose op starts with "diag-"

Everything here runs on the scheduler's event loop and only on request, except the
relay of forwarded log records (batched by the workers, one message per batch).
The scheduler never unpickles what workers send here: profiles travel as flat rows
(profile.flatten), worker errors as text.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time

logger = logging.getLogger("taskcore.scheduler")

WORKER_TIMEOUT = 30.0       # seconds a worker has to answer a diagnostics request


class SchedulerDiagnostics:
    """Mixed into Scheduler; uses its `state`, `workers`, `clients`, `send`,
    `_worker_request` and `log_buffer`."""

    # -- hooks ---------------------------------------------------------------------------
    def _diag_worker_added(self, peer):
        loggers = self._diag_log_subscriptions().union()
        if loggers:
            self.send(peer, {"op": "diag-forward-logging", "loggers": loggers})

    def _diag_worker_message(self, peer, msg):
        op = msg.get("op")
        if op == "diag-forward-logs":
            self._diag_relay_logs(peer.id, msg.get("records") or [])
        else:
            logger.warning("unknown diagnostics op %r from worker %s", op, peer.id)

    # -- task stream ---------------------------------------------------------------------
    def rpc_task_stream(self, peer, since=None, until=None, start=None, stop=None, count=None):
        """Recorded tasks: {"total": tasks ever recorded, "first": index of the first row,
        "rows": [(key, worker, start, stop, status), ...]} oldest first.

        By index (`since`, `until`: what `get_task_stream()` as a context manager
        uses), or dask's way: `start`/`stop` as wall-clock times or durations ago
        ("10s"), `count` the number of rows (the latest, or from `start`)."""
        from taskcore.utils import parse_timedelta

        st = self.state
        cap = st.task_stream_length
        if since is not None:
            since = _nonneg_int(since, "since")
            if until is not None:
                until = _nonneg_int(until, "until")
            # until <= since asks for the running index alone (a block's start).
            total, rows = st.task_stream(since, 0 if until is not None and until <= since
                                         else cap)
            first = total - len(rows)
            if until is not None:
                rows = rows[:max(0, until - first)]
            return {"total": total, "first": first, "rows": rows}
        if count is not None:
            count = _nonneg_int(count, "count")
        now = time.time()
        if isinstance(start, str):
            start = now - parse_timedelta(start)
        if isinstance(stop, str):
            stop = now - parse_timedelta(stop)
        if start is None and stop is None:
            total, rows = st.task_stream(0, cap if count is None else count)
            return {"total": total, "first": total - len(rows), "rows": rows}
        total, rows = st.task_stream(0, cap)
        first = total - len(rows)
        stops = [r[3] for r in rows]
        lo = None if start is None else bisect.bisect_left(stops, float(start))
        hi = None if stop is None else bisect.bisect_left(stops, float(stop))
        if count is not None:                  # dask's rules (TaskStreamPlugin.collect)
            if lo is None:
                lo = hi - count
            elif hi is None:
                hi = lo + count
        lo = 0 if lo is None else max(lo, 0)
        hi = len(rows) if hi is None else min(hi, len(rows))
        return {"total": total, "first": first + lo, "rows": rows[lo:hi]}

    # -- profiles ----------------------------------------------------------------------------
    async def rpc_profile(self, peer, key=None, start=None, stop=None, workers=None,
                          merge_workers=True, server=False):
        """The workers' profiles (flat rows, profile.flatten) for [start, stop]: merged,
        or {worker: rows} with merge_workers=False."""
        from taskcore import profile

        targets = self._diag_targets(workers)
        msg = {"op": "diag-profile", "key": profile.key_filter(key), "start": start,
               "stop": stop, "server": bool(server)}
        results, errors = await self._diag_ask(targets, msg)
        if errors and not results:
            raise RuntimeError("no worker returned a profile: " + "; ".join(errors))
        if not merge_workers:
            return results

        def merged():
            return profile.flatten(profile.merge(*[profile.unflatten(r)
                                                   for r in results.values()]))

        # Big trees take a while to merge: not on the scheduler's event loop.
        return await asyncio.get_running_loop().run_in_executor(None, merged)

    # -- versions --------------------------------------------------------------------------------
    async def rpc_versions(self, peer, packages=None):
        from taskcore.versions import _package_list, get_versions

        packages = _package_list(packages)
        results, errors = await self._diag_ask(self._diag_targets(None),
                                               {"op": "diag-versions", "packages": packages})
        for e in errors:
            logger.warning("versions: %s", e)
        return {"scheduler": get_versions(packages), "workers": results}

    # -- logs ------------------------------------------------------------------------------------
    def rpc_scheduler_logs(self, peer, n=None):
        buf = getattr(self, "log_buffer", None)
        if buf is None:
            raise RuntimeError("this scheduler keeps no log records (not started)")
        return [(r[1], r[3]) for r in buf.recent(_opt_count(n))]

    async def rpc_worker_logs(self, peer, n=None, workers=None, nanny=False):
        if nanny:
            return await self._diag_nanny_logs(self._diag_targets(workers), _opt_count(n))
        results, errors = await self._diag_ask(self._diag_targets(workers),
                                               {"op": "diag-logs", "n": _opt_count(n)})
        if errors and not results:
            raise RuntimeError("no worker returned its logs: " + "; ".join(errors))
        return results

    async def _diag_nanny_logs(self, targets, n):
        """{worker: [(level, line)]}: the stderr lines each worker's nanny kept (they
        survive the worker's restarts). Workers without a nanny are left out."""
        async def one(w):
            nanny = self.nannies.get(w)
            if nanny is None:
                return w, None
            reqid = f"logs-{next(self._reqids)}"
            fut = asyncio.get_running_loop().create_future()
            nanny.replies[reqid] = fut
            self.send(nanny, {"op": "get-logs", "reqid": reqid, "n": n})
            try:
                reply = await asyncio.wait_for(fut, WORKER_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as e:
                logger.warning("nanny of %s gave no logs: %r", w, e)
                return w, None
            finally:
                nanny.replies.pop(reqid, None)
            return w, [(_line_level(line), line) for line in reply.get("result") or []]

        pairs = await asyncio.gather(*[one(w) for w in targets])
        return {w: lines for w, lines in pairs if lines is not None}

    # -- forwarded logging -----------------------------------------------------------------------
    def rpc_forward_logging(self, peer, logger_name=None, level=0):
        self._diag_subscriber(peer)
        subs = self._diag_log_subscriptions()
        subs.add(peer.id, logger_name, level)
        self._diag_push_logging()

    def rpc_unforward_logging(self, peer, logger_name=None, everything=False):
        # No registration check: a closing client sends this as its comm goes away.
        subs = self._diag_log_subscriptions()
        before = subs.union()
        subs.remove(peer.id, logger_name, everything=everything)
        if subs.union() != before:
            self._diag_push_logging()

    def _diag_subscriber(self, peer):
        if peer.kind != "client" or peer.id not in self.clients:
            raise ValueError("forward_logging needs a registered client connection")

    def _diag_log_subscriptions(self):
        subs = getattr(self, "_diag_logs", None)
        if subs is None:
            from taskcore.forward_logging import Subscriptions

            subs = self._diag_logs = Subscriptions()
        return subs

    def _diag_push_logging(self):
        """Tell every worker what is forwarded now (the union over clients)."""
        msg = {"op": "diag-forward-logging",
               "loggers": self._diag_log_subscriptions().union()}
        for p in list(self.workers.values()):
            self.send(p, msg)

    def _diag_relay_logs(self, worker, records):
        subs = self._diag_log_subscriptions()
        if subs.keep_only(self.clients):       # a client left without unforwarding
            self._diag_push_logging()
        for client, mine in subs.route(records).items():
            p = self.clients.get(client)
            if p is not None:
                self.send(p, {"op": "forwarded-logs", "worker": worker, "records": mine})

    # -- asking workers --------------------------------------------------------------------------
    def _diag_targets(self, workers):
        if workers is None:
            return list(self.workers)
        if isinstance(workers, str):
            workers = [workers]
        unknown = [w for w in workers if w not in self.workers]
        if unknown:
            raise ValueError(f"unknown workers {unknown}; known: {sorted(self.workers)}")
        return list(workers)

    async def _diag_ask(self, targets, msg):
        """Send `msg` to each worker; ({worker: result}, [error texts])."""
        async def one(w):
            try:
                reply = await self._worker_request(w, dict(msg), WORKER_TIMEOUT)
            except asyncio.TimeoutError:
                return w, None, f"worker {w} did not answer within {WORKER_TIMEOUT} s"
            except Exception as e:
                return w, None, f"worker {w}: {type(e).__name__}: {e}"
            if "error" in reply:
                return w, None, f"worker {w}: {reply.get('error_text') or 'failed'}"
            return w, reply.get("result"), None

        results, errors = {}, []
        for w, r, e in await asyncio.gather(*[one(w) for w in targets]):
            if e is None:
                results[w] = r
            else:
                errors.append(e)
        return results, errors


def _nonneg_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _opt_count(n):
    return None if n is None else _nonneg_int(n, "n")


_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _line_level(line: str) -> str:
    """The level of a line in taskcore's log format ("... - name - LEVEL - message");
    other stderr output (a print, a traceback line) counts as INFO."""
    for level in _LEVELS:
        if f" - {level} - " in line:
            return level
    return "INFO"
