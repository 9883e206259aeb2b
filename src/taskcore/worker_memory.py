"""A worker's memory policy: fractions of `memory_limit`, as dask.distributed has them.

    target    0.6   managed memory (the results this worker holds, by `sizeof`) above
                    target x limit: spill least recently used results to disk until below
    spill     0.7   process memory (RSS) above spill x limit: spill until RSS is below
                    target x limit, or nothing is left to spill
    pause     0.8   RSS above pause x limit: the worker starts no new task (the state
                    machine's PauseEvent) but keeps serving its data; it resumes below
                    (pause - 0.05) x limit. Paused for longer than `memory_pause_timeout`
                    (60 s), it restarts gracefully: its nanny is told to start a new worker
                    once this one exits, and the worker retires through the scheduler,
                    which moves its data to other workers first
    terminate 0.95  the nanny kills the worker (nanny.py), telling the scheduler why first,
                    so tasks that keep killing workers end as KilledWorker naming memory

Each is a `Worker`/`Nanny` keyword argument (`memory_target_fraction`, ...); False, None
or 0 turns that one off, and no `memory_limit` turns them all off. The worker's options
travel to a nanny's worker in `--worker-options` like any other worker keyword.

Who does what. `SpillStore` (spill.py) holds the spilled values and the LRU order. This
module's `WorkerMemoryManager` is the policy around it:

* the *target* check runs at the end of every pass of the worker's compiled loop
  (`WorkerDispatch.handle`): one comparison of C integers, `memory_over_target()` only
  when managed memory is over the target;
* a monitor on the event loop (a timer callback) reads RSS from /proc/self/statm (one
  pread, ~2 us; psutil costs ~20 us) and applies *spill* and *pause*. It looks every
  `memory_monitor_interval` (0.1 s) near the thresholds, and less often (up to every
  0.5 s) when RSS could not reach the first threshold sooner growing at 2 GiB/s: a
  worker with a 12 GiB limit using 100 MB looks twice a second;
* unmanaged memory is handed back: once at least `TRIM_MIN_BYTES` of managed memory was
  spilled or released, and at most every `TRIM_INTERVAL` seconds, glibc's
  `malloc_trim(0)` runs on a helper thread (ctypes releases the GIL);
* a task thread that misses a spilled dependency reads it back itself
  (`load_dependency`), then the event loop puts it back into memory as the most recently
  used value; a peer or a client fetching a spilled key gets the stored frames as they
  are (read on a helper thread, never unpickled for the transfer), and the value comes
  back into memory only if it fits under the target and the worker is not paused.

`metrics()` is what the heartbeat and `/metrics` report: managed, unmanaged (RSS minus
managed) and spilled bytes, spill counts, paused.

GPU memory: `device_memory_limit` (a `Worker`/`Nanny` keyword, `core-worker
--device-memory-limit`; bytes, a size like "10GB", a fraction of the GPU's memory, "auto" for
0.8 of it, or False/None: off, the default). With it, results that are GPU objects (their
type exposes `__cuda_array_interface__`: CuPy, Numba, PyTorch CUDA tensors) are tracked in
the spill store's DEVICE tier as they are stored; past the limit the least recently used move
to host memory (the store's HOST tier: serialized once, kept in RAM), where they count as
managed memory, so the target and spill thresholds move them on to disk like any other value.
A task, a peer or a client that needs one gets it through the paths that serve spilled keys;
a task gets it back as a GPU object. How the check is paid for: a worker with a device limit
has `Worker._result_event_device` in place of the compiled `result_event` (a Python call per
result, only on such workers), which tracks GPU results and, past the limit, arms the
compiled loop's end-of-pass target check (`memory_target_bytes` set to `_ARMED`) so that
`over_target` runs once at the end of the pass. Without a device limit nothing of this runs.
The device memory a worker holds is counted by the results it tracks (device objects at the
top level of a result); memory held by a library's pool or by GPU objects inside containers
is not.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time

from taskcore.utils import format_bytes, parse_bytes, parse_timedelta

# The spill store's tiers (spill.DEVICE, spill.HOST; spill.py loads the compiled core, which
# the nanny's option checks here must not).
DEVICE, HOST = 0, 1

logger = logging.getLogger("taskcore.worker")

DEFAULT_FRACTIONS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
DEFAULT_PAUSE_TIMEOUT = 60.0
DEFAULT_MONITOR_INTERVAL = 0.1
UNPAUSE_MARGIN = 0.05               # resume below (pause - this) x limit
TRIM_INTERVAL = 2.0                 # malloc_trim at most this often (s)
TRIM_MIN_BYTES = 32 * 2**20         # ... and after at least this much was freed
GC_INTERVAL = 1.0                   # gc.collect() under pressure at most this often (s)
MAX_MONITOR_INTERVAL = 0.5          # the monitor's longest pause, far below the thresholds (s)
ASSUMED_GROWTH = 2 * 2**30          # bytes/s a process may allocate: how soon to look again
HIGH_UNMANAGED_WARN_INTERVAL = 30.0
DEVICE_AUTO_FRACTION = 0.8          # device_memory_limit="auto": this much of the GPU's memory
# memory_target_bytes while a GPU object is to be moved off the device: the compiled loop's
# end-of-pass check (managed bytes > memory_target_bytes) then calls over_target.
_ARMED = -(1 << 62)


# -- options -------------------------------------------------------------------------------------
def parse_fraction(name, value):
    """A memory fraction option: a float in (0, 1], or None when turned off (False, None,
    0, "false", "none", "off")."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "none", "off", "no", "0"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a fraction of memory_limit in (0, 1] or False, "
                             f"got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a fraction of memory_limit in (0, 1] or False, "
                         f"got {value!r}")
    f = float(value)
    if f == 0:
        return None
    if not 0 < f <= 1:
        raise ValueError(f"{name} must be a fraction of memory_limit in (0, 1] or False, "
                         f"got {value!r}")
    return f


_OFF = (None, False, 0, "0", "false", "none")


def _parse_or_off(name, value, parse):
    """None for an "off" value, else `parse(value)`; a bad value names the option."""
    if value in _OFF:
        return None
    try:
        return parse(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def memory_options(memory_target_fraction=DEFAULT_FRACTIONS["target"],
                   memory_spill_fraction=DEFAULT_FRACTIONS["spill"],
                   memory_pause_fraction=DEFAULT_FRACTIONS["pause"],
                   memory_terminate_fraction=DEFAULT_FRACTIONS["terminate"],
                   memory_pause_timeout=DEFAULT_PAUSE_TIMEOUT,
                   memory_monitor_interval=DEFAULT_MONITOR_INTERVAL,
                   memory_max_spill=False, memory_spill_compression=True):
    """The worker's memory options, checked and normalized (fractions: float or None;
    durations: seconds or None; max_spill: bytes or None). Raises ValueError naming the
    bad option."""
    opts = {
        "target": parse_fraction("memory_target_fraction", memory_target_fraction),
        "spill": parse_fraction("memory_spill_fraction", memory_spill_fraction),
        "pause": parse_fraction("memory_pause_fraction", memory_pause_fraction),
        "terminate": parse_fraction("memory_terminate_fraction", memory_terminate_fraction),
    }
    opts["pause_timeout"] = _parse_or_off("memory_pause_timeout", memory_pause_timeout,
                                          parse_timedelta)
    interval = _parse_or_off("memory_monitor_interval", memory_monitor_interval,
                             parse_timedelta)
    if not interval or interval <= 0:
        raise ValueError(f"memory_monitor_interval must be > 0, got {memory_monitor_interval!r}")
    opts["monitor_interval"] = interval
    opts["max_spill"] = _parse_or_off("memory_max_spill", memory_max_spill, parse_bytes)
    opts["compression"] = bool(memory_spill_compression) and \
        str(memory_spill_compression).lower() not in ("false", "none", "off")
    return opts


def _device_limit_spec(value):
    """("off", None), ("bytes", n) or ("fraction", f) for a device_memory_limit; ValueError
    (naming the option) for anything else."""
    if value is None or value is False:
        return "off", None
    if isinstance(value, bool):
        raise ValueError(f"device_memory_limit must be bytes, a size like '10GB', a fraction "
                         f"of the GPU's memory in (0, 1], 'auto' or False, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "0", "false", "none", "off", "no"):
            return "off", None
        if text == "auto":
            return "fraction", DEVICE_AUTO_FRACTION
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and 0 < number <= 1 and "." in text:
            return "fraction", number
    elif isinstance(value, float) and 0 < value <= 1:
        return "fraction", value
    try:
        n = parse_bytes(value)
    except ValueError as e:
        raise ValueError(f"device_memory_limit: {e} (or a fraction of the GPU's memory in "
                         f"(0, 1], 'auto', False)") from None
    return ("bytes", n) if n else ("off", None)


def check_device_memory_limit(value):
    """Check a device_memory_limit's form without asking the GPU (the nanny and core-worker
    check; the worker resolves fractions in its own process, which sees its own GPU)."""
    _device_limit_spec(value)
    return value


def parse_device_memory_limit(value):
    """A device_memory_limit in bytes, or None when off. Fractions ("auto" = 0.8) are of the
    total memory of this process's GPU (the first of CUDA_VISIBLE_DEVICES), which
    `taskcore.nvml` reads."""
    kind, number = _device_limit_spec(value)
    if kind == "off":
        return None
    if kind == "bytes":
        return number
    try:
        from taskcore.nvml import device_total_memory
    except ImportError as e:
        raise ValueError(f"device_memory_limit={value!r} is a fraction of the GPU's memory, "
                         f"which needs taskcore.nvml (pip install 'taskcore[cuda]'): {e}; "
                         f"or give a size like '10GB'") from None
    try:
        total = int(device_total_memory(None))
    except Exception as e:
        raise ValueError(f"device_memory_limit={value!r} is a fraction of the GPU's memory, "
                         f"which cannot be read here: {type(e).__name__}: {e}; or give a size "
                         f"like '10GB'") from None
    return int(total * number)


# -- process memory ------------------------------------------------------------------------------
class ProcessMemory:
    """This process's resident memory: /proc/self/statm read with one pread on a file
    kept open (psutil opens, reads and parses a file per call: ~10x the cost)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.fd = None                          # opened on the first call
        self._proc = None

    def __call__(self):
        if self.fd is not None:
            return int(os.pread(self.fd, 256, 0).split()[1]) * self.page
        if self._proc is None:
            try:
                self.fd = os.open(f"/proc/{os.getpid()}/statm", os.O_RDONLY | os.O_CLOEXEC)
                return self()
            except OSError:
                import psutil

                self._proc = psutil.Process()
        return self._proc.memory_info().rss

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def _load_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, ...: nothing to call)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version            # glibc only
        trim = libc.malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def malloc_trim():
    """Hand the allocator's free memory back to the OS (glibc); False where unavailable."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


# -- the policy ----------------------------------------------------------------------------------
class WorkerMemoryManager:
    """The memory policy of one worker (see the module doc). Built in `Worker.__init__`
    (no I/O), `start()`ed with the worker, `close()`d with it."""

    def __init__(self, worker, memory_limit, opts, local_directory=None, device_limit=0):
        self.worker = worker
        self.memory_limit = int(memory_limit or 0)
        self.device_limit = int(device_limit or 0)
        limit = self.memory_limit
        self.target_fraction = opts["target"]
        self.spill_fraction = opts["spill"]
        self.pause_fraction = opts["pause"]
        self.terminate_fraction = opts["terminate"]   # the nanny's; reported only
        self.pause_timeout = opts["pause_timeout"]
        self.monitor_interval = opts["monitor_interval"]

        def bytes_of(f):
            return int(limit * f) if limit and f else 0

        self.target_bytes = bytes_of(self.target_fraction)
        self.spill_bytes = bytes_of(self.spill_fraction)
        self.pause_bytes = bytes_of(self.pause_fraction)
        self.unpause_bytes = bytes_of(max(self.pause_fraction - UNPAUSE_MARGIN,
                                          self.pause_fraction / 2)) if self.pause_bytes else 0
        self.store = None
        if self.target_bytes or self.spill_bytes or self.device_limit:
            # Here, not at the top: the nanny checks options with this module and must
            # not load the compiled core for it.
            from taskcore.spill import SpillStore, scratch_root

            if self.device_limit:
                from taskcore.core.serialize import device_nbytes

                self._device_nbytes = device_nbytes
            self.store = SpillStore(worker.data, scratch_root(local_directory),
                                    compression=opts["compression"], max_spill=opts["max_spill"])
        self.rss = 0
        self.pause_count = 0
        self.paused_since = None            # monotonic time of the pause, while paused
        self.restart_requested = False
        self.trim_count = 0
        self.trim_seconds = 0.0
        self._read_rss = ProcessMemory()
        self._timer = None
        # Below this RSS the monitor has nothing to do (no spill, no pause).
        self._quiet_below = min([b for b in (self.spill_bytes, self.pause_bytes) if b] or
                                [1 << 62])
        self._loop_ident = None
        self._last_managed = 0
        self._freed = 0                     # managed bytes spilled or released since the last trim
        self._last_trim = 0.0
        self._last_gc = 0.0
        self._stuck_at = None               # managed bytes in memory when spilling fell short
        self._retry_growth = max(2**20, self.target_bytes // 100)
        self._high_unmanaged_warned = 0.0
        self._device_stuck_at = None        # device bytes when moving to host fell short
        self._device_retry_growth = max(2**20, self.device_limit // 100)

    @property
    def enabled(self):
        return self.store is not None or bool(self.pause_bytes)

    def install(self):
        """Give the worker's compiled loop its fields (worker_dispatch.pxd)."""
        w = self.worker
        w.memory_managed = self.store is not None
        w.memory_target_bytes = self._target_field()
        w.spilled = self.store.index if self.store is not None else {}
        w.spilled_bytes = 0

    def _target_field(self):
        """What the compiled loop's `memory_target_bytes` holds when not armed."""
        return self.target_bytes if self.store is not None else 0

    def start(self):
        self._loop_ident = threading.get_ident()
        if self.enabled:
            self._schedule(self.monitor_interval)

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.store is not None:
            self.store.close()
        self._read_rss.close()

    def clear(self):
        """The worker starts over with an empty data store."""
        if self.store is not None:
            self.store.clear()
            self._sync()

    # -- managed memory -------------------------------------------------------------------------
    def managed_in_memory(self):
        """Managed bytes in RAM: results in `data` and GPU objects moved to host, less what
        is on disk and the GPU objects still on the device."""
        state = self.worker.state
        if state is None:
            return 0
        store = self.store
        off = store.spilled_bytes + store.device_bytes if store is not None else 0
        return max(0, state.memory_bytes - off)

    def _sync(self):
        # The compiled loop's managed bytes are memory_bytes - spilled_bytes: neither what
        # is on disk nor GPU objects on the device take RAM.
        self.worker.spilled_bytes = self.store.spilled_bytes + self.store.device_bytes

    def over_target(self):
        """Managed memory is over target x limit: spill LRU values until it is not (the
        compiled loop calls this at the end of a pass). When what is left cannot be
        spilled (too small, unpicklable), the next look waits until managed memory has
        grown by `_retry_growth`: each look walks every value in memory."""
        store = self.store
        if store is None:
            return
        if self.device_limit:
            self.worker.memory_target_bytes = self._target_field()      # disarm
            if store.device_bytes > self.device_limit:
                self._evict_device()
        if not self.target_bytes:
            return
        state = self.worker.state
        stuck = self._stuck_at
        if stuck is not None:
            managed = state.memory_bytes - store.spilled_bytes - store.device_bytes
            if managed < stuck:
                self._stuck_at = managed                # released some: a new baseline
                return
            if managed < stuck + self._retry_growth:
                return
        target = self.target_bytes

        def enough():
            return state.memory_bytes - store.spilled_bytes - store.device_bytes <= target

        try:
            store.evict(enough)
        finally:
            self._sync()
        self._stuck_at = None if enough() else \
            state.memory_bytes - store.spilled_bytes - store.device_bytes

    # -- GPU objects ------------------------------------------------------------------------------
    def stored(self, key, value):
        """`data[key]` was just set (a result, a fetched or scattered value): track it if it
        is a GPU object and, past the device limit, arm the compiled loop's end-of-pass
        check. Only called on workers with a device limit."""
        n = self._device_nbytes(value)
        store = self.store
        if n < 0:
            rec = store.index.get(key)
            if rec is not None and rec.tier == DEVICE:     # a GPU object replaced
                store.discard(key)
                self._sync()
            return
        store.track_device(key, n)
        self._sync()
        if store.device_bytes > self.device_limit:
            stuck = self._device_stuck_at
            if stuck is None or store.device_bytes >= stuck + self._device_retry_growth:
                self.worker.memory_target_bytes = _ARMED

    def _evict_device(self):
        """Over the device limit: move least recently used GPU objects to host memory."""
        store = self.store
        limit = self.device_limit

        def enough():
            return store.device_bytes <= limit

        try:
            store.evict_device(enough)
        finally:
            self._sync()
        self._device_stuck_at = None if enough() else store.device_bytes

    # -- values back from disk ------------------------------------------------------------------
    def load_dependency(self, key):
        """The value of a dependency that is not in `data` (called from the compiled
        execution path on a miss, on a task thread or the loop). KeyError if it is not
        spilled either."""
        store = self.store
        if store is None:
            raise KeyError(key)
        value, rec = store.load_record(key)
        if threading.get_ident() == self._loop_ident:
            self._restore(key, rec, value)
        else:
            loop = self.worker.loop
            try:
                loop.call_soon_threadsafe(self._restore, key, rec, value)
            except RuntimeError:            # the loop is closed: the worker is gone
                pass
        return value

    def _restore(self, key, rec, value):
        store = self.store
        if store.restore(key, rec, value):
            if self.device_limit:
                n = self._device_nbytes(value)
                if n >= 0:                  # a GPU object again: back on the device
                    store.track_device(key, n)
                    if store.device_bytes > self.device_limit:
                        self._evict_device()
            self._sync()
            if self.target_bytes and self.managed_in_memory() > self.target_bytes:
                self.over_target()          # what came back may push out older values

    def drop(self, key):
        """A spilled key's task was released."""
        self.store.discard(key)
        self._sync()

    def fits(self, weight):
        """Would a value of this weight fit in memory now (for unspilling on a fetch)?"""
        if self.worker.state is None or self.worker.state.paused:
            return False
        if self.target_bytes and self.managed_in_memory() + weight > self.target_bytes:
            return False
        if self.spill_bytes and self.rss + weight > self.spill_bytes:
            return False
        return True

    async def read_for_transfer(self, key):
        """A spilled key's frames for get-data (read on a helper thread). The value comes
        back into memory only if it fits; KeyError if the key is not spilled."""
        store = self.store
        rec = store.index.get(key)
        if rec is not None and rec.tier == HOST:
            # A GPU object moved to host: its frames as they are. It stays in the host tier
            # (bringing it back would take device memory for a value leaving anyway).
            return store.read_record(key)[0]
        ser, rec = await self.worker.loop.run_in_executor(None, store.read_record, key)
        if self.fits(rec.weight) and store.index.get(key) is rec:
            try:
                value = ser.deserialize()
            except Exception:
                return ser
            self._restore(key, rec, value)
        return ser

    # -- the monitor ----------------------------------------------------------------------------
    def _schedule(self, delay):
        self._timer = self.worker.loop.call_later(delay, self._tick)

    def _tick(self):
        """The monitor, as a timer callback (no task or coroutine per round: it runs
        ~10 times a second in every worker). Reads RSS; when something is to be done
        (spill, pause or resume, trim) hands over to `_act`, which schedules the next
        round when it is done. The next round comes sooner the closer RSS is to the
        first threshold (see `_delay`)."""
        self._timer = None
        w = self.worker
        if w.status not in ("running", "reconnecting"):
            return
        delay = self.monitor_interval
        if w.status == "running":
            try:
                rss = self.rss = self._read_rss()
                state = w.state
                managed = state.memory_bytes - self.worker.spilled_bytes
                if managed < self._last_managed:
                    self._freed += self._last_managed - managed
                self._last_managed = managed
                if (rss > self._quiet_below or state.paused or self._freed >= TRIM_MIN_BYTES):
                    w._spawn(self._act(rss))
                    return
                delay = self._delay(rss)
            except Exception:
                logger.exception("worker %s: memory monitor failed", w.address)
        self._schedule(delay)

    def _delay(self, rss):
        """Seconds to the next round: the time memory needs to reach the first threshold
        growing at `ASSUMED_GROWTH` bytes/s, between `monitor_interval` and
        `MAX_MONITOR_INTERVAL`."""
        return min(max(self.monitor_interval, (self._quiet_below - rss) / ASSUMED_GROWTH),
                   max(self.monitor_interval, MAX_MONITOR_INTERVAL))

    async def _act(self, rss):
        try:
            await self.check(rss)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("worker %s: memory monitor failed", self.worker.address)
        if self.worker.status in ("running", "reconnecting"):
            self._schedule(self.monitor_interval)

    async def check(self, rss=None):
        """One round of the monitor's work: spill on RSS, pause/unpause, trim."""
        if rss is None:
            rss = self.rss = self._read_rss()
            managed = self.managed_in_memory()
            if managed < self._last_managed:
                self._freed += self._last_managed - managed
            self._last_managed = managed
        if self.spill_bytes and rss > self.spill_bytes and self.store is not None:
            rss = await self._spill_rss(rss)
        if self.pause_bytes:
            self._pause_or_unpause(rss)
        if self._freed >= TRIM_MIN_BYTES:
            await self._trim()

    async def _spill_rss(self, rss):
        """RSS is over spill x limit: spill LRU values until it is under target x limit
        (spill x limit without a target) or nothing is left."""
        store = self.store
        w = self.worker
        target = self.target_bytes or self.spill_bytes
        need = rss - target
        spilled = 0
        freed_more = False
        t_yield = time.monotonic()
        while rss > target:
            n, weight = store.evict()
            self._sync()
            if not n:
                self._warn_unmanaged(rss)
                break
            spilled += weight
            self._freed += weight
            if spilled >= need and not freed_more:
                # As much was spilled as RSS is over: what RSS still shows may be held by the
                # allocator or by cycles. Free those before spilling more.
                freed_more = True
                self._gc()
                await self._trim()
            rss = self.rss = self._read_rss()
            if time.monotonic() - t_yield > 0.05:
                await asyncio.sleep(0)          # let the loop serve messages
                t_yield = time.monotonic()
                if w.status != "running":
                    break
        self._last_managed = self.managed_in_memory()
        logger.debug("worker %s: RSS over the spill threshold: spilled %s (need %s); process "
                     "memory now %s, managed in memory %s", w.address, format_bytes(spilled),
                     format_bytes(need), format_bytes(rss), format_bytes(self._last_managed))
        return rss

    def _warn_unmanaged(self, rss):
        now = time.monotonic()
        if now - self._high_unmanaged_warned < HIGH_UNMANAGED_WARN_INTERVAL:
            return
        self._high_unmanaged_warned = now
        logger.warning(
            "worker %s: process memory %s is over %.0f%% of the limit %s and nothing is left "
            "to spill (managed in memory: %s). Unmanaged memory this high may be a leak, or "
            "memory the allocator did not return to the system.", self.worker.address,
            format_bytes(rss), self.spill_fraction * 100, format_bytes(self.memory_limit),
            format_bytes(self.managed_in_memory()))

    def _pause_or_unpause(self, rss):
        from taskcore.core.worker_state import PauseEvent, UnpauseEvent

        w = self.worker
        paused = w.state.paused
        now = time.monotonic()
        if rss > self.pause_bytes:
            if not paused:
                self.pause_count += 1
                self.paused_since = now
                logger.warning("worker %s at %.0f%% of its memory limit (process memory %s, "
                               "limit %s): pausing, no new tasks start until it is below %.0f%%",
                               w.address, 100 * rss / self.memory_limit, format_bytes(rss),
                               format_bytes(self.memory_limit),
                               100 * self.unpause_bytes / self.memory_limit)
                w._handle(PauseEvent(f"memory-pause-{time.time()}"))
            else:
                self._gc()
        elif paused and self.paused_since is not None and rss < self.unpause_bytes:
            logger.warning("worker %s at %.0f%% of its memory limit (process memory %s): "
                           "resuming after %.1f s paused", w.address,
                           100 * rss / self.memory_limit, format_bytes(rss),
                           now - self.paused_since)
            self.paused_since = None
            w._handle(UnpauseEvent(f"memory-unpause-{time.time()}"))
        if (self.paused_since is not None and self.pause_timeout is not None
                and not self.restart_requested and now - self.paused_since > self.pause_timeout):
            self.restart_requested = True
            w._spawn(self.restart_gracefully())

    async def restart_gracefully(self):
        """Paused too long: have the nanny start a new worker once this one has exited,
        then retire through the scheduler (its data moves to other workers first)."""
        from taskcore.transports import connect

        w = self.worker
        if not w.nanny_address:
            logger.warning("worker %s has been paused for more than %s s and has no nanny to "
                           "restart it; it stays paused", w.address, self.pause_timeout)
            return
        reason = (f"paused for more than {self.pause_timeout:g} s at "
                  f"{100 * self.rss / self.memory_limit:.0f}% of the memory limit")
        logger.warning("worker %s %s: restarting it gracefully (its data moves to other "
                       "workers first)", w.address, reason)
        opts = {"security": w.security} if w.security is not None else {}
        try:
            comm = await connect(w.nanny_address, timeout=w.connection_timeout, role="worker",
                                 **opts)
            try:
                await comm.write({"op": "restart-after-retire", "worker": w.address,
                                  "reason": reason})
                reply = await asyncio.wait_for(comm.read(), 10)
            finally:
                await comm.close()
        except Exception as e:
            logger.warning("worker %s: the nanny at %s did not take the restart (%r); staying "
                           "paused", w.address, w.nanny_address, e)
            self.restart_requested = False      # try again after another timeout
            self.paused_since = time.monotonic()
            return
        if not (isinstance(reply, dict) and reply.get("ok")):
            logger.warning("worker %s: the nanny refused the restart: %r", w.address, reply)
            self.restart_requested = False
            self.paused_since = time.monotonic()
            return
        await w.close_gracefully(reason="memory-pause-timeout")

    # -- returning memory -------------------------------------------------------------------------
    def _gc(self):
        now = time.monotonic()
        if now - self._last_gc >= GC_INTERVAL:
            self._last_gc = now
            gc.collect()

    async def _trim(self):
        now = time.monotonic()
        if _malloc_trim is None or now - self._last_trim < TRIM_INTERVAL:
            return
        self._last_trim = now
        self._freed = 0
        t0 = time.perf_counter()
        await self.worker.loop.run_in_executor(None, malloc_trim)
        self.trim_count += 1
        self.trim_seconds += time.perf_counter() - t0

    # -- reporting --------------------------------------------------------------------------------
    def metrics(self):
        """The memory part of the heartbeat (and of /metrics)."""
        rss = self.rss or self._read_rss()
        managed = self.managed_in_memory()
        out = {"memory_limit": self.memory_limit, "managed_bytes": managed,
               "unmanaged_bytes": max(0, rss - managed),
               "paused": bool(self.worker.state is not None and self.worker.state.paused),
               "pause_count": self.pause_count, "trim_count": self.trim_count}
        if self.store is not None:
            out.update(self.store.stats())
        else:
            out.update(spilled_bytes=0, spilled_count=0)
        if self.device_limit:
            out["device_memory_limit"] = self.device_limit
            out.update(self.store.device_stats())
        return out
