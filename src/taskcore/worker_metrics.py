"""A worker's numbers: the heartbeat's metrics and its Prometheus `/metrics` endpoint.

`WorkerCounters` holds the cumulative transfer counters that the worker bumps where it
fetches from and serves to peers (plain integer additions, on the event loop).

`MetricsServer` serves `/metrics` with prometheus_client's own HTTP server in a daemon
thread, one `CollectorRegistry` per worker (several workers in one process each have
their own numbers). The socket is bound on the worker's start path, so the URL can go
into the registration message at once; prometheus_client (~0.1 s to import) is
imported in the thread. A scrape reads the worker's numbers on its event loop
(`call_soon_threadsafe`, waiting at most `SCRAPE_TIMEOUT`), never touching the state
machine from the HTTP thread; if the loop does not answer in time, the last numbers
read are served again.
"""
from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading

logger = logging.getLogger("taskcore.worker")

SCRAPE_TIMEOUT = 2.0


class WorkerCounters:
    __slots__ = ("incoming_bytes", "outgoing_bytes", "incoming_count", "outgoing_count",
                 "incoming_comms", "event_loop_delay", "cpu", "rss")

    def __init__(self):
        self.incoming_bytes = 0
        self.outgoing_bytes = 0
        self.incoming_count = 0
        self.outgoing_count = 0
        self.incoming_comms = 0
        self.event_loop_delay = 0.0
        self.cpu = 0.0
        self.rss = 0


def open_comms(worker) -> int:
    """Open peer connections: pooled outgoing ones plus those peers opened to us."""
    out = sum(1 for c in worker._peer_comms.values() if not c.closed)
    return out + worker.counters.incoming_comms


def memory_metrics(worker) -> dict:
    """The memory manager's numbers (worker_memory.py): managed, unmanaged and spilled
    bytes, spill counts, paused; zeros for a worker without one."""
    mm = getattr(worker, "memory_manager", None)
    if mm is None:
        return {"spilled_bytes": 0, "spilled_count": 0, "paused": False}
    return mm.metrics()


def heartbeat_metrics(worker) -> dict:
    """The diagnostic part of a heartbeat (on the event loop)."""
    c = worker.counters
    out = {"cpu": c.cpu, "event_loop_delay": c.event_loop_delay,
           "transfer_incoming_bytes": c.incoming_bytes,
           "transfer_outgoing_bytes": c.outgoing_bytes,
           "transfer_incoming_count": c.incoming_count,
           "transfer_outgoing_count": c.outgoing_count,
           "comms": open_comms(worker)}
    out.update(memory_metrics(worker))
    return out


def snapshot(worker) -> dict:
    """Everything `/metrics` shows (on the event loop)."""
    state = worker.state
    c = worker.counters
    return {"tasks": dict(state.task_counts) if state is not None else {},
            "executing": state.executing_count if state is not None else 0,
            "memory": state.memory_bytes if state is not None else 0,
            "mem": memory_metrics(worker), "incoming_bytes": c.incoming_bytes,
            "outgoing_bytes": c.outgoing_bytes, "incoming_count": c.incoming_count,
            "outgoing_count": c.outgoing_count, "event_loop_delay": c.event_loop_delay,
            "comms": open_comms(worker), "rss": c.rss, "cpu": c.cpu}


def parse_dashboard_address(value, default_host):
    """(host, port) from ":0", ":8787", "127.0.0.1:9000", "[::1]:0", 8787 or "8787" (the
    dashboard's own parser, dashboard/binding.py); an empty host is `default_host`."""
    from taskcore.dashboard.binding import parse_address

    try:
        host, port = parse_address(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid dashboard_address {value!r}: {e}") from None
    return host or default_host, port


class MetricsServer:
    """`/metrics` of one worker (see the module doc)."""

    def __init__(self, worker, host, port):
        self.worker = worker
        self.loop = worker.loop
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve worker metrics on {host}:{port}: {e}") from e
        self.sock = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.httpd = None
        self._lock = threading.Lock()
        self._closed = False
        self._serving = False
        self._last = None
        self._thread = threading.Thread(target=self._serve, name="taskcore-worker-metrics",
                                        daemon=True)
        self._thread.start()

    def url(self, contact_host):
        h = contact_host if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in h:
            h = f"[{h}]"
        return f"http://{h}:{self.port}"

    # -- the HTTP thread -------------------------------------------------------------------
    def _serve(self):
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))

            class Server(ThreadingWSGIServer):
                address_family = self.sock.family

            # prometheus_client's server, on the socket bound at start: its own
            # constructor would bind a new one.
            httpd = Server(self.sock.getsockname()[:2], _SilentHandler,
                           bind_and_activate=False)
            httpd.socket.close()
            httpd.socket = self.sock
            httpd.server_address = self.sock.getsockname()[:2]
            httpd.server_name = self.host
            httpd.server_port = self.port
            httpd.setup_environ()
            httpd.set_app(make_wsgi_app(registry))
            self.httpd = httpd
        except Exception as e:
            logger.error("worker metrics server could not start: %r", e)
            self.sock.close()
            return
        with self._lock:
            # stop() may have come during the import: then it does not wait for
            # serve_forever (which would never run), and this thread closes up.
            if self._closed:
                httpd.server_close()
                return
            self._serving = True
        try:
            # Not serve_forever: its shutdown() waits for the next poll (up to its
            # interval, on every worker's close). Here each wait ends with a connection,
            # and stop() makes one.
            httpd.timeout = None
            while not self._closed:
                httpd.handle_request()
        finally:
            httpd.server_close()

    def read(self) -> dict | None:
        """The worker's numbers, read on its event loop (from the HTTP thread)."""
        fut = concurrent.futures.Future()

        def run():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(snapshot(self.worker))
                except BaseException as e:  # noqa: B902 - handed to the waiting thread
                    fut.set_exception(e)

        try:
            self.loop.call_soon_threadsafe(run)
            self._last = fut.result(SCRAPE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            fut.cancel()               # loop busy or closed: serve the last numbers
        return self._last

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, timeout=5.0):
        """Stop serving and free the port (blocking: call it off the event loop)."""
        with self._lock:
            self._closed = True
            serving = self._serving
        if serving:
            # Wake the serving thread's wait for a connection: it then sees _closed.
            host, port = self.sock.getsockname()[:2]
            if host in ("0.0.0.0", "::", ""):
                host = "::1" if self.sock.family == socket.AF_INET6 else "127.0.0.1"
            try:
                socket.create_connection((host, port), timeout=timeout).close()
            except OSError:
                pass
        self._thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass


def _rss(fallback):
    """The process's resident memory now (psutil is thread-safe)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return fallback


def _task_states():
    """The worker's task states (read when first scraped: this module is imported by
    core-worker's option checking, which must not load the compiled core)."""
    global _TASK_STATES
    if _TASK_STATES is None:
        from taskcore.core.worker_state import STATES

        _TASK_STATES = tuple(st for st in STATES if st != "forgotten")
    return _TASK_STATES


_TASK_STATES = None


# (metric name, heartbeat field, help): the memory manager's gauges (worker_memory.py).
_MEMORY_GAUGES = (
    ("spilled_bytes", "spilled_bytes", "Bytes of results spilled to disk (as measured by sizeof)"),
    ("spilled_keys", "spilled_count", "Results spilled to disk"),
    ("spilled_disk_bytes", "spilled_disk_bytes",
     "Bytes the spilled results take on disk (after lz4)"),
    ("managed_bytes", "managed_bytes", "Bytes of results held in memory (as measured by sizeof)"),
    ("unmanaged_bytes", "unmanaged_bytes",
     "Process memory not accounted for by results in memory"),
    ("memory_limit_bytes", "memory_limit", "The worker's memory limit (0: none)"),
    ("device_bytes", "device_bytes", "Bytes of GPU results in device memory"),
    ("device_host_bytes", "device_host_bytes",
     "Bytes of GPU results moved to host memory by device_memory_limit"),
    ("device_memory_limit_bytes", "device_memory_limit",
     "The worker's device memory limit (0: none)"),
)


class _Collector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.server.read()
        if s is None:
            return
        tasks = GaugeMetricFamily("taskcore_worker_tasks", "Tasks on this worker by state",
                                  labels=["state"])
        # Every state, zeros included: a series that vanished when its count hit zero
        # would break rate() and alerts on it.
        states = _task_states()
        for state in states:
            tasks.add_metric([state], s["tasks"].get(state, 0))
        for state, n in sorted(s["tasks"].items()):
            if state not in states:
                tasks.add_metric([state], n)
        yield tasks
        yield GaugeMetricFamily("taskcore_worker_executing", "Tasks executing now",
                                value=s["executing"])
        yield GaugeMetricFamily("taskcore_worker_memory_bytes",
                                "Bytes of results held (as measured by sizeof)",
                                value=s["memory"])
        m = s["mem"]
        for name, key, doc in _MEMORY_GAUGES:
            default = s["memory"] if key == "managed_bytes" else 0
            yield GaugeMetricFamily(f"taskcore_worker_{name}", doc, value=m.get(key, default))
        yield GaugeMetricFamily("taskcore_worker_paused",
                                "1 while memory pressure keeps the worker from starting tasks",
                                value=1 if m.get("paused") else 0)
        for name, what in (("count", "Results written to / read from disk"),
                           ("bytes_total", "Bytes (by sizeof) written to / read from disk"),
                           ("seconds", "Seconds spent writing to / reading from disk")):
            fam = CounterMetricFamily(f"taskcore_worker_spill_{name}".replace("_total", ""),
                                      what, labels=["activity"])
            fam.add_metric(["spill"], m.get(f"spill_{name}", 0))
            fam.add_metric(["unspill"], m.get(f"unspill_{name}", 0))
            yield fam
        yield CounterMetricFamily("taskcore_worker_device_spills",
                                  "GPU results moved to host memory (device_memory_limit)",
                                  value=m.get("device_spill_count", 0))
        yield CounterMetricFamily("taskcore_worker_memory_pauses",
                                  "Times the worker paused for memory",
                                  value=m.get("pause_count", 0))
        yield CounterMetricFamily("taskcore_worker_transfer_incoming_bytes",
                                  "Bytes fetched from other workers",
                                  value=s["incoming_bytes"])
        yield CounterMetricFamily("taskcore_worker_transfer_outgoing_bytes",
                                  "Bytes served to other workers and clients",
                                  value=s["outgoing_bytes"])
        yield CounterMetricFamily("taskcore_worker_transfer_incoming_count",
                                  "Fetches from other workers", value=s["incoming_count"])
        yield CounterMetricFamily("taskcore_worker_transfer_outgoing_count",
                                  "Data requests served", value=s["outgoing_count"])
        yield GaugeMetricFamily("taskcore_worker_event_loop_delay_seconds",
                                "How late the event loop's last heartbeat timer fired",
                                value=s["event_loop_delay"])
        yield GaugeMetricFamily("taskcore_worker_comms", "Open connections to peers",
                                value=s["comms"])
        yield GaugeMetricFamily("taskcore_worker_rss_bytes", "Resident memory of the process",
                                value=_rss(s["rss"]))
        yield GaugeMetricFamily("taskcore_worker_cpu_percent",
                                "CPU use of the process since the last heartbeat",
                                value=s["cpu"])

