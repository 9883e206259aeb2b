"""Live progress bars: `taskcore.progress(futures or collections)`.

One bar per task prefix (the key without its token: "inc", "random_sample",
"mean_chunk", ...), drawn with tqdm in a terminal and with ipywidgets in
Jupyter when ipywidgets is installed.

How progress is learned, without slowing the computation down:

* Keys the client holds futures for report through the futures' callbacks:
  the client already receives one message per such key, so progress costs a
  counter increment on the client's loop per task and nothing elsewhere.
* A dask graph's intermediate keys (which no future refers to) are learned by
  polling the scheduler on a timer, never per task. The first poll registers
  the key list with the scheduler; later polls return only the indices that
  finished since the previous poll, and the scheduler drops finished keys from
  its list, so each poll costs time proportional to what is still running.
  The poll interval grows with the scheduler-side cost of a poll (kept under
  about 2% of one scheduler core).

Modes:
* synchronous client, terminal: `progress(...)` blocks until every tracked
  task is done, then returns None;
* asynchronous client (or `asynchronous=True`): `progress(...)` returns an
  awaitable: `await progress(...)`;
* Jupyter (ipywidgets available, or `notebook=True`): returns a widget at once
  and updates it in the background.
"""
from __future__ import annotations

import asyncio
import collections
import re
import sys
import threading
import time
import uuid
import weakref

from taskcore.futures import FINISHED, Future, futures_of

_MAX_BARS = 12
_POLL_BUDGET = 0.02            # a poll may use at most this fraction of the scheduler's time

# -------------------------------------------------------------------------------------------
# Key prefixes
# -------------------------------------------------------------------------------------------

_HEX8 = re.compile(r"^[a-f0-9]{8}$")
_HEX32 = re.compile(r"^[a-f0-9]{32}$")
_prefix_cache: dict = {}


def key_split(key):
    """Human-readable group of a key: 'inc-ab12..' -> 'inc', ('x-3f2..', 0, 1) -> 'x'."""
    cache = False
    while type(key) is tuple and key:
        key = key[0]
        cache = True            # the name of a chunked collection: shared by many keys
    if type(key) is bytes:
        key = key.decode("utf-8", "replace")
    if type(key) is not str:
        return "other"
    if cache:
        r = _prefix_cache.get(key)
        if r is not None:
            return r
    words = key.split("-")
    first = words[0]
    if not first[:1].isalpha():
        first = first.split(",")[0].strip("_'()\"")
    result = first
    for w in words[1:]:
        if w.isalpha() and not (len(w) == 8 and _HEX8.match(w)):
            result += "-" + w
        else:
            break
    if len(result) == 32 and _HEX32.match(result):
        result = "data"
    elif result[:1] == "<":
        result = result.strip("<>").split()[0].split(".")[-1]
    result = result or "other"
    if cache and len(_prefix_cache) < 100_000:
        _prefix_cache[key] = result
    return result


# -------------------------------------------------------------------------------------------
# Graph registry: which keys a computation's futures stand for
# -------------------------------------------------------------------------------------------

class _GraphRegistry:
    """Per client: wanted key -> every key submitted with it (bounded)."""

    MAX_KEYS = 2_000_000

    def __init__(self):
        self.by_key: dict = {}
        self.entries: collections.deque = collections.deque()
        self.total = 0

    def add(self, client, wanted, keys):
        entry = (tuple(keys), tuple(wanted))
        self.entries.append(entry)
        self.total += len(entry[0])
        for k in wanted:
            self.by_key[k] = entry
        while self.total > self.MAX_KEYS and len(self.entries) > 1:
            self._drop(self.entries.popleft())
        # Forget graphs whose futures are all gone (checked a few at a time).
        for _ in range(min(4, len(self.entries) - 1)):
            old = self.entries[0]
            if any(k in client._states for k in old[1][:8]):
                break
            self._drop(self.entries.popleft())

    def _drop(self, entry):
        self.total -= len(entry[0])
        for k in entry[1]:
            if self.by_key.get(k) is entry:
                del self.by_key[k]


_registries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def remember_graph(client, wanted, keys):
    """Called when a dask graph is submitted, so progress(futures) can show its whole graph."""
    if len(keys) <= len(wanted):
        return
    with _registry_lock:
        reg = _registries.get(client)
        if reg is None:
            reg = _registries[client] = _GraphRegistry()
        reg.add(client, wanted, keys)


def _graph_keys(client, futures):
    with _registry_lock:
        reg = _registries.get(client)
        if reg is None:
            return []
        seen = set()
        out = []
        for f in futures:
            entry = reg.by_key.get(f.key)
            if entry is not None and id(entry) not in seen:
                seen.add(id(entry))
                out.extend(entry[0])
        return out


# -------------------------------------------------------------------------------------------
# Scheduler side of the poll (runs through run_on_scheduler)
# -------------------------------------------------------------------------------------------

def _scheduler_progress(token, keys=None, scheduler=None):
    """Indices of the registered keys that finished (or erred) since the last poll."""
    t0 = time.perf_counter()
    reg = scheduler.__dict__.setdefault("_taskcore_progress", {})
    now = time.monotonic()
    for tok in [t for t, e in reg.items() if now - e[2] > 600]:
        del reg[tok]                      # a client that went away mid-progress
    if keys is not None:
        reg[token] = [keys, range(len(keys)), now]
    entry = reg.get(token)
    if entry is None:
        return [], [], 0.0
    keys, remaining, _ = entry
    entry[2] = now
    task_state = scheduler.state.task_state
    done, erred, still = [], [], []
    for i in remaining:
        s = task_state(keys[i])
        if s == "memory" or s == "forgotten" or s == "released":
            done.append(i)
        elif s == "erred":
            erred.append(i)
        else:
            still.append(i)
    entry[1] = still
    if not still:
        del reg[token]
    return done, erred, time.perf_counter() - t0


# -------------------------------------------------------------------------------------------
# The tracker: counts per prefix
# -------------------------------------------------------------------------------------------

class _Group:
    __slots__ = ("name", "total", "done", "erred", "tracker")

    def __init__(self, name, tracker):
        self.name = name
        self.total = 0
        self.done = 0
        self.erred = 0
        self.tracker = tracker

    def on_done(self, state):             # a FutureState callback, on the client's loop
        if state.status == FINISHED:
            self.done += 1
        else:
            self.erred += 1
        self.tracker.remaining -= 1


class _Tracker:
    def __init__(self, client, futures, extra_keys):
        self.client = client
        self.groups: dict = {}
        self.remaining = 0
        self.start = time.perf_counter()
        self.token = uuid.uuid4().hex
        self.registered = False
        self.futures = list({id(f): f for f in futures}.values())
        fkeys = {f.key for f in self.futures}
        # Groups appear in the order of extra_keys (execution order when they come
        # from a dask graph), then the futures' own prefixes.
        self.poll_keys = []
        self.poll_groups = []
        group = self._group
        for k in dict.fromkeys(extra_keys):
            g = group(key_split(k))
            if k in fkeys:
                continue
            g.total += 1
            self.poll_keys.append(k)
            self.poll_groups.append(g)
        self.future_groups = [group(key_split(f.key)) for f in self.futures]
        for g in self.future_groups:
            g.total += 1
        self.remaining = len(self.futures) + len(self.poll_keys)
        self.interval = 0.1

    def _group(self, name):
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = _Group(name, self)
        return g

    def attach(self):
        """Register future callbacks (must run on the client's loop)."""
        for f, g in zip(self.futures, self.future_groups):
            f._state.add_callback(g.on_done)

    def attach_threadsafe(self):
        if self.client._in_loop():
            self.attach()
            return
        ev = threading.Event()

        def run():
            try:
                self.attach()
            finally:
                ev.set()

        self.client.loop.call_soon_threadsafe(run)
        ev.wait()

    async def poll(self):
        """One scheduler poll for the intermediate keys (on the client's loop)."""
        if not self.poll_keys or self.remaining <= 0:
            return
        from taskcore.core.serialize import serialize_obj

        args = (self.token, self.poll_keys) if not self.registered else (self.token,)
        res = await self.client._rpc("run_on_scheduler",
                                     func=serialize_obj((_scheduler_progress, args, {})))
        status, value = res
        if hasattr(value, "deserialize"):
            value = value.deserialize()
        if status == "error":
            raise value
        self.registered = True
        done, erred, cost = value
        groups = self.poll_groups
        for i in done:
            groups[i].done += 1
        for i in erred:
            groups[i].erred += 1
        self.remaining -= len(done) + len(erred)
        # Keep polling cheap for the scheduler: slow down when a poll is expensive.
        self.interval = min(2.0, max(0.1, cost / _POLL_BUDGET))

    @property
    def finished(self):
        return self.remaining <= 0

    def snapshot(self):
        return [(g.name, g.done, g.erred, g.total) for g in self.groups.values()]


# -------------------------------------------------------------------------------------------
# Renderers
# -------------------------------------------------------------------------------------------

def _fold(rows, multi):
    """At most _MAX_BARS rows; with multi=False, one row for everything."""
    if not multi:
        return [("all", sum(r[1] for r in rows), sum(r[2] for r in rows),
                 sum(r[3] for r in rows))]
    if len(rows) <= _MAX_BARS:
        return rows
    head = rows[:_MAX_BARS - 1]
    tail = rows[_MAX_BARS - 1:]
    return head + [(f"({len(tail)} more)", sum(r[1] for r in tail), sum(r[2] for r in tail),
                    sum(r[3] for r in tail))]


class _TextBars:
    """Terminal bars: tqdm when installed, else plain text lines."""

    def __init__(self, rows, file=None, complete=True):
        self.file = file
        self.complete = complete
        self.bars = None
        try:
            import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm
        width = max([len(r[0]) for r in rows] + [4])
        if tqdm is not None:
            disable = False if file is not None else None   # None: off when not a tty
            self.bars = [tqdm.tqdm(total=r[3], desc=r[0].ljust(width), position=i,
                                   leave=complete, file=file, disable=disable,
                                   dynamic_ncols=True, unit="task", mininterval=0)
                         for i, r in enumerate(rows)]
        self.width = width
        self.last_text = None

    def update(self, rows, final=False):
        if self.bars is not None:
            for bar, (name, done, erred, total) in zip(self.bars, rows):
                n = done + erred
                if bar.n != n:
                    bar.n = n
                    if erred:
                        bar.set_postfix_str(f"{erred} erred", refresh=False)
                    bar.refresh()
            return
        if not final:
            return                       # without tqdm: one summary at the end
        out = self.file or sys.stderr
        for name, done, erred, total in rows:
            extra = f" ({erred} erred)" if erred else ""
            out.write(f"{name.ljust(self.width)} {done + erred}/{total}{extra}\n")
        out.flush()

    def close(self):
        if self.bars is not None:
            for bar in reversed(self.bars):
                bar.close()


class _WidgetBars:
    """ipywidgets bars for Jupyter."""

    def __init__(self, rows):
        import ipywidgets as w

        self.w = w
        self.bars = []
        self.labels = []
        boxes = []
        for name, done, erred, total in rows:
            bar = w.IntProgress(value=done + erred, min=0, max=max(total, 1),
                                bar_style="info", layout=w.Layout(width="60%"))
            label = w.HTML(f"{done + erred} / {total}")
            self.bars.append(bar)
            self.labels.append(label)
            boxes.append(w.HBox([w.HTML(f"<b>{name}</b>", layout=w.Layout(width="200px")),
                                 bar, label]))
        self.box = w.VBox(boxes)

    def update(self, rows, final=False):
        for bar, label, (name, done, erred, total) in zip(self.bars, self.labels, rows):
            bar.value = done + erred
            if erred:
                bar.bar_style = "danger"
            elif final or done == total:
                bar.bar_style = "success"
            label.value = f"{done + erred} / {total}" + (f" ({erred} erred)" if erred else "")

    def close(self):
        pass


def _in_notebook():
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


# -------------------------------------------------------------------------------------------
# The public entry point
# -------------------------------------------------------------------------------------------

class Progress:
    """A running progress display; `progress()` makes one (see its docstring)."""

    def __init__(self, tracker, multi=True, complete=True, file=None, notebook=False):
        self.tracker = tracker
        self.multi = multi
        self.complete = complete
        self.file = file
        self.notebook = notebook
        rows = _fold(tracker.snapshot(), multi)
        self.view = _WidgetBars(rows) if notebook else _TextBars(rows, file, complete)
        self.elapsed = None

    @property
    def widget(self):
        return getattr(self.view, "box", None)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.view.box)

    def _render(self, final=False):
        self.view.update(_fold(self.tracker.snapshot(), self.multi), final)

    def _finish(self):
        self.elapsed = time.perf_counter() - self.tracker.start
        self._render(final=True)
        self.view.close()

    # -- drivers -----------------------------------------------------------------------
    def run_sync(self):
        """Block the calling thread until done (sync client, terminal)."""
        t = self.tracker
        client = t.client
        t.attach_threadsafe()
        next_poll = 0.0
        try:
            while not t.finished:
                now = time.perf_counter()
                if t.poll_keys and now >= next_poll:
                    client.sync(t.poll)
                    next_poll = time.perf_counter() + t.interval
                self._render()
                if t.finished:
                    break
                time.sleep(0.1)
        finally:
            self._finish()

    async def run_async(self):
        """Update until done, as a coroutine (asynchronous client)."""
        t = self.tracker
        client = t.client
        on_loop = client._in_loop()
        if on_loop:
            t.attach()
        else:
            await asyncio.get_running_loop().run_in_executor(None, t.attach_threadsafe)
        next_poll = 0.0
        try:
            while not t.finished:
                now = time.perf_counter()
                if t.poll_keys and now >= next_poll:
                    if on_loop:
                        await t.poll()
                    else:
                        await asyncio.wrap_future(
                            asyncio.run_coroutine_threadsafe(t.poll(), client.loop))
                    next_poll = time.perf_counter() + t.interval
                self._render()
                if t.finished:
                    break
                await asyncio.sleep(0.1)
        finally:
            self._finish()

    def run_background(self):
        """Update from a daemon thread (notebook with a synchronous client)."""
        th = threading.Thread(target=self.run_sync, name="taskcore-progress", daemon=True)
        th.start()
        return th


def _collect(objs):
    futures = []
    for obj in objs:
        fs = futures_of(obj)
        if not fs and not isinstance(obj, (Future, list, tuple, set, frozenset, dict)):
            raise ValueError(
                f"{type(obj).__name__} holds no futures: persist it first "
                "(client.persist(x)) or pass the futures from client.compute(x)")
        futures.extend(fs)
    return futures


def progress(*futures, notebook=None, multi=True, complete=True, asynchronous=None,
             client=None, file=None, **kwargs):
    """Show progress bars (one per task prefix) for futures or persisted collections.

    Blocks until done with a synchronous client in a terminal; returns an
    awaitable with an asynchronous client or `asynchronous=True`; returns a
    widget at once in Jupyter. `multi=False` shows one bar; `file=` sends the
    terminal bars to a file-like object (tqdm draws them even when it is not a tty).
    """
    fs = _collect(futures)
    if client is None:
        if not fs:
            return None
        client = fs[0].client
    tracker = _Tracker(client, fs, _graph_keys(client, fs))
    if notebook is None:
        notebook = _in_notebook() and _has_ipywidgets()
    p = Progress(tracker, multi=multi, complete=complete, file=file, notebook=notebook)
    is_async = client.asynchronous if asynchronous is None else asynchronous
    if notebook:
        if is_async:
            _spawn(client, p.run_async())
        else:
            p.run_background()
        if kwargs.get("_display"):
            # From compute/persist(progress=True): nobody gets the widget to show it.
            from IPython.display import display

            display(p.view.box)
        return p
    if is_async:
        return p.run_async()
    if client._in_loop():
        raise RuntimeError("progress() on a synchronous client cannot block its own loop")
    p.run_sync()
    return None


_background_tasks: set = set()


def _spawn(client, coro):
    if client._in_loop():
        task = asyncio.ensure_future(coro)
        _background_tasks.add(task)
        task.add_done_callback(_background_tasks.discard)
    else:
        asyncio.run_coroutine_threadsafe(coro, client.loop)


def _has_ipywidgets():
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["progress", "Progress", "key_split"]
