"""Small helpers shared by the CLIs, the nanny and the deploy layer.

Nothing here imports the compiled core or the transports, so the CLIs can
validate their options (and fail fast with a clear message) before any
heavy import happens.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading

from taskcore.member import ClusterMember

logger = logging.getLogger("taskcore.utils")

# ---------------------------------------------------------------------------------------------
# Byte sizes
# ---------------------------------------------------------------------------------------------

# Decimal and binary units, case-insensitive. "k"/"kb" are decimal like every SI tool;
# the "i" variants are powers of two.
_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
    "p": 10**15, "pb": 10**15, "pib": 2**50,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value) -> int:
    """`"4GiB"` -> 4294967296, `"100 MB"` -> 100000000, `"1e9"` / `1e9` -> 1000000000.

    Raises ValueError (naming the bad input) for anything else, including negative sizes.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid byte size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"invalid byte size: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid byte size: {value!r} (expected a number or a string like '4GiB')")
    m = _BYTES_RE.match(value)
    if not m:
        raise ValueError(f"invalid byte size: {value!r} (expected something like '4GiB' or '500MB')")
    number, unit = m.groups()
    unit = unit.lower()
    if unit not in _BYTE_UNITS:
        raise ValueError(f"invalid byte size: {value!r}: unknown unit {m.group(2)!r} "
                         f"(use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(number) * _BYTE_UNITS[unit])


def format_bytes(n: int | float) -> str:
    """Human readable, binary units: 1536 -> '1.50 kiB', 4 * 2**30 -> '4.00 GiB'."""
    n = float(n)
    for prefix, k in (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("ki", 2**10)):
        if abs(n) >= k * 0.9:
            return f"{n / k:.2f} {prefix}B"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------

_TIME_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "us": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_timedelta(value) -> float | None:
    """`"10s"` -> 10.0, `"5 minutes"` -> 300.0, `"250ms"` -> 0.25, `3` -> 3.0, None -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"invalid duration: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration: {value!r}")
    m = _TIME_RE.match(value)
    if not m or m.group(2).lower() not in _TIME_UNITS:
        raise ValueError(f"invalid duration: {value!r} (expected something like '30s', '5m', '1h')")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


# ---------------------------------------------------------------------------------------------
# Machine size
# ---------------------------------------------------------------------------------------------

def _cgroup_memory_limit() -> int | None:
    """The container memory limit, if any (cgroup v2, then v1); None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            continue
        # cgroup v1 reports "unlimited" as a huge page-aligned number.
        if 0 < limit < 2**60:
            return limit
    return None


def system_memory() -> int:
    """Usable physical memory: the machine's total, capped by a container limit."""
    import psutil

    total = psutil.virtual_memory().total
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit else total


def cpu_count() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def parse_memory_limit(limit, nthreads: int = 1, total_cores: int | None = None) -> int | None:
    """Resolve a memory limit option into bytes (None = no limit).

    - `"auto"`: this worker's share of the machine, proportional to its threads
      (`system_memory * nthreads / cpu_count`, at most all of it).
    - a float in (0, 1]: that fraction of system memory.
    - an int or a string like `"4GiB"`: that many bytes.
    - None, 0, `"0"`, `"none"`: no limit.
    Limits above the machine's memory are capped to it (the OS would kill us first).
    """
    if limit is None:
        return None
    if isinstance(limit, str):
        text = limit.strip().lower()
        if text in ("none", "0", ""):
            return None
        if text == "auto":
            total_cores = total_cores or cpu_count()
            share = min(1.0, max(1, nthreads) / total_cores)
            return int(system_memory() * share)
        nbytes = parse_bytes(limit)
    elif isinstance(limit, float) and 0 < limit <= 1:
        return int(system_memory() * limit)
    else:
        nbytes = parse_bytes(limit)
    if nbytes == 0:
        return None
    return min(nbytes, system_memory())


# ---------------------------------------------------------------------------------------------
# Resources and interfaces
# ---------------------------------------------------------------------------------------------

_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def parse_resources(text) -> dict[str, float]:
    """`"GPU=2,MEM=10e9"` -> `{"GPU": 2.0, "MEM": 1e10}`. Spaces around items are allowed.

    A dict is validated and returned with float values. Raises ValueError with the bad part.
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        if not isinstance(text, str):
            raise ValueError(f"invalid resources: {text!r}")
        items = []
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            name, sep, amount = part.partition("=")
            if not sep:
                raise ValueError(f"invalid resource {part!r}: expected NAME=AMOUNT, like GPU=2")
            items.append((name.strip(), amount.strip()))
    out = {}
    for name, amount in items:
        if not isinstance(name, str) or not _RESOURCE_NAME.match(name):
            raise ValueError(f"invalid resource name {name!r}")
        try:
            value = float(amount)
        except (TypeError, ValueError):
            raise ValueError(f"invalid amount {amount!r} for resource {name!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid amount {amount!r} for resource {name!r}")
        out[name] = value
    return out


def get_ip_interface(ifname: str, family: str = "ipv4") -> str:
    """The first IP address of network interface `ifname` (like `eth0`), via psutil."""
    import socket

    import psutil

    addrs = psutil.net_if_addrs()
    if ifname not in addrs:
        raise ValueError(f"network interface {ifname!r} not found; available: "
                         f"{', '.join(sorted(addrs)) or 'none'}")
    want = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
    for snic in addrs[ifname]:
        if snic.family == want:
            # Strip a zone index like fe80::1%eth0: our addresses carry no zone.
            return snic.address.split("%", 1)[0]
    raise ValueError(f"network interface {ifname!r} has no {family} address")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_json_atomic(path: str, data) -> None:
    """Write JSON to `path` so readers never see a partial file (temp file + rename)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json_file(path: str):
    """Read a JSON file; None while it is missing or (being) empty."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    return json.loads(text)


# ---------------------------------------------------------------------------------------------
# A uvloop event loop in a background thread, for synchronous facades
# ---------------------------------------------------------------------------------------------

class LoopRunner:
    """Runs a uvloop event loop in a daemon thread; `run_sync` blocks the caller on a coroutine.

    Synchronous objects (a LocalCluster used from a plain script) keep their servers
    on this loop, so the caller's thread is free and may even have its own loop.
    """

    _shared: "LoopRunner | None" = None
    _shared_refs = 0
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "taskcore-loop"):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> "LoopRunner":
        """The process-wide runner (started), reference-counted: pair it with `release()`.

        Sync Clients share one loop thread instead of starting one each.
        """
        with cls._shared_lock:
            runner = LoopRunner._shared
            if runner is None or not runner.running:
                runner = LoopRunner._shared = cls(name="taskcore-shared-loop").start()
                LoopRunner._shared_refs = 0
            LoopRunner._shared_refs += 1
            return runner

    def release(self) -> None:
        """Drop one reference to the shared runner (stopping it at zero); stop a private one."""
        with LoopRunner._shared_lock:
            if self is LoopRunner._shared:
                LoopRunner._shared_refs -= 1
                if LoopRunner._shared_refs > 0:
                    return
                LoopRunner._shared = None
                LoopRunner._shared_refs = 0
        self.stop()

    def in_loop_thread(self) -> bool:
        """Is the caller running on this runner's loop thread?"""
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "LoopRunner":
        with self._lock:
            if self.running:
                return self
            import uvloop

            loop = uvloop.new_event_loop()
            started = threading.Event()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                try:
                    loop.run_forever()
                finally:
                    # Finish what is left (cancelled tasks' cleanup) before closing.
                    try:
                        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                        for t in pending:
                            t.cancel()
                        if pending:
                            loop.run_until_complete(
                                asyncio.gather(*pending, return_exceptions=True))
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        loop.close()

            self.loop = loop
            self._thread = threading.Thread(target=run, name=self.name, daemon=True)
            self._thread.start()
            started.wait()
            return self

    def run_sync(self, func, *args, timeout: float | None = None, **kwargs):
        """Run `func(*args, **kwargs)` (a coroutine function, or a coroutine) on the loop.

        Blocks until done and returns its result or raises its exception; raises
        TimeoutError after `timeout` seconds (the coroutine is then cancelled).
        """
        if not self.running:
            raise RuntimeError("LoopRunner is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_sync called from the loop's own thread would deadlock")
        coro = func if asyncio.iscoroutine(func) else func(*args, **kwargs)

        async def guarded():
            if timeout is None:
                return await coro
            # Not wait_for: its TimeoutError and one the coroutine raises itself (a task's,
            # a Lock's) look the same, and the coroutine's own message must survive.
            task = asyncio.ensure_future(coro)
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                task.cancel()
                raise TimeoutError(f"operation timed out after {timeout} s")
            return task.result()

        fut = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def call_soon(self, func, *args):
        """Schedule a plain callback on the loop from any thread."""
        self.loop.call_soon_threadsafe(func, *args)

    def stop(self, timeout: float = 10) -> None:
        with self._lock:
            thread, loop = self._thread, self.loop
            if thread is None:
                return
            if thread.is_alive() and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(loop.stop)
                except RuntimeError:
                    pass
            if thread is not threading.current_thread():
                thread.join(timeout)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside the block; it is back on after, if it was.

    Building a large task graph allocates millions of small containers, and
    none of them are cycles to collect; each burst of allocations starts a
    collection that walks everything alive, more and more of it as the graph
    grows. dask's graph work for an array graph took 31 µs per task with the
    collector on and 19 with it paused (53,362 tasks). Cycles made inside the
    block are found by the first collection after it.
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tune_gc(gen0=50_000, gen1=50, gen2=100):
    """Make cyclic GC rarer in server processes.

    Every message creates a few container objects, and with the default
    threshold (700) generation-0 collections ran every few hundred messages,
    taking 10-15% of a busy scheduler's CPU. The runtime itself creates few
    reference cycles, so collecting less often costs little memory. Only the
    defaults are changed: a process that chose its own thresholds keeps them.
    """
    import gc

    if gc.get_threshold()[0] == 700:
        gc.set_threshold(gen0, gen1, gen2)


async def run_user_function(payload, server, param_names):
    """Run a `client.run`/`run_on_scheduler` payload on a server's event loop.

    `payload` is a Serialized (or plain) `(func, args, kwargs)`. The server is
    passed as the first of `param_names` the function accepts (dask's
    `dask_worker=`/`dask_scheduler=` spellings included). Returns
    `["ok", Serialized result]` or `["error", Serialized exception]`.
    """
    import inspect

    from taskcore.core.serialize import Serialized, serialize_obj

    try:
        fn, args, kwargs = payload.deserialize() if isinstance(payload, Serialized) else payload
        kwargs = dict(kwargs or {})
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        for name in param_names:
            if name in params:
                kwargs[name] = server
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return ["ok", serialize_obj(result)]
    except Exception as e:
        return ["error", serialize_obj(e)]


class ServerLifecycle(ClusterMember):
    """What Scheduler and Worker share: `await server`, `async with server`, `finished()`
    and `_spawn` for background tasks that are cancelled on close. Both are cluster
    members as they are (taskcore/member.py): a SpecCluster holds them in process.

    Subclasses provide `start()`, `close()`, `status`, `_closed` (a future resolved on
    close) and `_tasks` (a set).
    """

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self):
        if self.status != "running":
            await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def finished(self):
        await asyncio.shield(self._closed)

    def _spawn(self, coro):
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t
