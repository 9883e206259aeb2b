"""ucxx for ucx:// (ucx.py): set up once per process, progressed by each event loop.

Progress
--------
ucxx's asyncio Endpoint awaits each request by spinning on ``asyncio.sleep(0)``
unless Python futures are enabled, and those are bound to the one loop that
initialised ucxx. A comm always has a receive pending, so spinning would burn a
core for good; and taskcore runs several loops in one process (a client's
thread, each test's loop). So ucxx is initialised once per process in
``blocking`` progress mode, and each event loop gets a `_LoopProgress` (installed
as ucxx's progress task for that loop, so ucxx starts none of its own): it
watches the worker's epoll descriptor, progresses the worker, and calls back the
comms whose requests completed, then re-arms the worker. Comms post requests on
the endpoint's `UCXEndpoint` directly. Messages a handler sends while such a
callback runs go out when it ends (one batch), like tcp's.

Environment (defaults, applied only where the variable is not set)
------------------------------------------------------------------
``UCX_TCP_TX_SEG_SIZE=1m`` and ``UCX_TCP_RX_SEG_SIZE=1m`` (2-3x the throughput of
UCX's defaults over tcp), ``UCX_WARN_UNUSED_ENV_VARS=n`` and
``UCXX_LOG_LEVEL=FATAL`` (ucxx logs every refused connection attempt as an error;
taskcore reports what matters itself).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading

logger = logging.getLogger("taskcore.transports.ucx")

ENV_DEFAULTS = {
    "UCX_TCP_TX_SEG_SIZE": "1m",
    "UCX_TCP_RX_SEG_SIZE": "1m",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCXX_LOG_LEVEL": "FATAL",
}
CUDA_TRANSPORTS = frozenset({"cuda_copy", "cuda_ipc", "gdr_copy"})

# -- ucxx, once per process --------------------------------------------------------------

_ucxx = None
_init_lock = threading.Lock()
_device = None          # None: not decided yet; else a (dumps, alloc) pair or False


def import_ucxx():
    """The ucxx module, imported once, with taskcore's UCX defaults in the environment."""
    global _ucxx
    if _ucxx is None:
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        try:
            import ucxx
        except ImportError as e:
            raise ImportError(f"ucx:// needs ucxx, which is not installed ({e}): "
                              f"pip install 'taskcore[ucx]'") from e
        _ucxx = ucxx
    return _ucxx


def progress():
    """This loop's `_LoopProgress`, initialising ucxx (blocking progress) on first use."""
    ucxx = import_ucxx()
    from ucxx._lib_async import application_context as appctx

    loop = asyncio.get_running_loop()
    tasks = appctx.ProgressTasks
    driver = tasks.get(loop)
    if isinstance(driver, _LoopProgress):
        return driver
    with _init_lock:
        # Dead loops (earlier tests, a closed client) would otherwise stay keys forever.
        for old in [lp for lp in tasks if lp.is_closed()]:
            del tasks[old]
        claim = _Claim()
        tasks[loop] = claim                  # ucxx now starts no progress task of its own here
        if ucxx.core._ctx is None:
            ucxx.init(progress_mode="blocking", enable_delayed_submission=False,
                      enable_python_future=False)
        ctx = ucxx.core._get_ctx()
        if ctx.progress_mode != "blocking":
            del tasks[loop]
            raise RuntimeError(f"ucx:// needs ucxx in 'blocking' progress mode, but ucxx was "
                               f"initialised in {ctx.progress_mode!r} mode (UCXPY_PROGRESS_MODE"
                               f" or an earlier ucxx.init())")
        driver = _LoopProgress(loop, ctx.worker)
        tasks[loop] = driver
    return driver


class _Claim:
    """A placeholder in ucxx's per-loop progress table while the real driver is made."""


_armed_worker = None     # the UCX worker put in blocking mode (one per ucxx context)


class _LoopProgress:
    """Progresses the UCX worker from one event loop and calls back completed requests.

    `watch(request, callback)`: `callback(request)` runs on this loop once the
    request completed (successfully or not: `request.check_error()` says)."""

    def __init__(self, loop, worker):
        self.loop = loop
        self.worker = worker
        self.watched = []                # [(request, callback)]
        self.dirty = []                  # comms whose queued sends go out after this callback
        self.depth = 0
        self.scheduled = False
        # Sends in flight are polled: UCX's tcp transport raises no event when its
        # socket can take more of a large message, so an armed worker would sleep with
        # a send half done until the safety sweep (a 0.5 s stall per 200 MB message).
        self.sends = 0
        self._send_timer = None
        self._send_delay = 0.0
        global _armed_worker
        if _armed_worker is not worker:
            worker.init_blocking_progress_mode()
            _armed_worker = worker
        self.fd = worker.epoll_file_descriptor
        loop.add_reader(self.fd, self.run)
        # UCX may consume an event without the descriptor waking us (progress called
        # by ucxx itself, on connect): a slow safety sweep, as ucxx's blocking mode has.
        self._timer = loop.call_later(0.5, self._sweep)

    def __hash__(self):                 # ucxx compares progress tasks by their loop
        return hash(self.loop)

    def _sweep(self):
        if self.loop.is_closed():
            return
        self.run()
        self._timer = self.loop.call_later(0.5, self._sweep)

    def watch(self, request, callback):
        self.watched.append((request, callback))
        if self.depth == 0:               # inside run() the loop there reaps it
            self.kick()

    def watch_send(self, request, callback):
        """`watch` for a send: polled until it completes (see `sends`)."""
        self.sends += 1

        def done(req):
            self.sends -= 1
            callback(req)
        self.watch(request, done)

    def _poll_sends(self):
        if self._send_timer is None and not self.loop.is_closed():
            self._send_timer = self.loop.call_later(self._send_delay, self._send_tick)

    def _send_tick(self):
        # At once while data moves; backing off to 2 ms while the peer does not read.
        self._send_timer = None
        moved = self.worker.progress_once()
        self._send_delay = 0.0 if moved else min(max(2 * self._send_delay, 1e-4), 2e-3)
        self.run()

    def kick(self):
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self):
        self.scheduled = False
        worker = self.worker
        self.depth += 1
        try:
            for _ in range(32):
                worker.progress()
                # A callback may post a receive whose message already arrived (UCX
                # completes it on the spot): reap those now, not a loop turn later.
                for _ in range(64):
                    if not self._reap():
                        break
                if worker.arm():             # nothing pending: the descriptor wakes us
                    if self.sends:
                        self._poll_sends()
                    break
            else:
                self.kick()                  # still busy: let the loop breathe, then go on
        finally:
            self.depth -= 1
            if self.depth == 0 and self.dirty:
                dirty, self.dirty = self.dirty, []
                for comm in dirty:
                    comm._flush()

    def _reap(self):
        """Call back the completed requests; False if there were none."""
        if not self.watched:
            return False
        done = None
        still = []
        for item in self.watched:
            if item[0].completed:
                if done is None:
                    done = []
                done.append(item)
            else:
                still.append(item)
        if done is None:
            return False
        self.watched = still
        for req, cb in done:
            try:
                cb(req)
            except Exception:
                logger.exception("ucx:// completion callback failed")
        return True


# -- device frames (taskcore.device, when UCX can carry device memory) --------------------

def device_support():
    """`(dumps_device, alloc)` when device frames can travel as device memory, else False.

    Needs a CUDA transport in this process's UCX context and taskcore's device
    runtime (`taskcore.device`, `taskcore.core.serialize.dumps_device`)."""
    global _device
    if _device is None:
        _device = False
        try:
            transports = set(import_ucxx().get_active_transports())
        except Exception:
            transports = set()
        if transports & CUDA_TRANSPORTS:
            try:
                from taskcore.core.serialize import dumps_device
                from taskcore.device import device_runtime, is_device_buffer

                runtime = device_runtime()      # DeviceRuntimeUnavailable is an ImportError
            except ImportError as e:
                logger.warning("UCX has CUDA transports but taskcore's device runtime is "
                               "missing (%s): device objects travel as host copies", e)
            else:
                _device = (dumps_device, runtime.alloc, is_device_buffer,
                           getattr(runtime, "synchronize", None))
    return _device
