"""Statistical profiling of a worker: a sampler thread, call trees, and merging them.

A `Sampler` is a daemon thread that, every `interval` seconds, takes
`sys._current_frames()` and folds the stack of every task thread that is running a
task into a call tree (and the event-loop thread's stack into a second tree, the
"server" profile). Trees are cut into cycles of `cycle` seconds, kept in a bounded
deque (`history` cycles, about an hour), and merged for a time range on request
(`client.profile`).

The tree has dask.distributed's shape, so tools written for dask's profiles read ours::

    {"identifier": "root", "count": 12, "description": {"filename": "", "name": "",
     "line_number": 0, "line": ""},
     "children": {"inc;/path/mod.py;3": {"identifier": ..., "count": 12,
                                          "description": {...}, "children": {...}}}}

`count` is the number of samples whose stack passed through the node (the root's is
the number of samples). A node's identifier is "name;filename;first line", so the
same function merges across cycles, threads and workers.

Which task a thread runs: the task threads' loop (`TaskExecutor._run`, executor.py)
keeps the running task's id in its local `tid`; the sampler reads it from that frame
and looks the key up in the worker's state, so every sample is also added to a tree
per key prefix (`key=` in `client.profile`).

Tiny tasks run inline on the event loop (core/worker_dispatch.pyx), not on a task
thread: their samples land in the server profile (`server=True`), not in the
per-prefix trees.

Cost: each sample holds the GIL for a few microseconds per busy thread (stack walk
plus dict updates); idle threads cost a frame lookup. The default interval was
chosen from the throughput measured with the sampler on and off (docs/diagnostics.md).
"""
from __future__ import annotations

import collections
import linecache
import sys
import threading
import time

#: Seconds between samples. Configurable per worker (`Worker(profile_interval=...)`,
#: 0 disables the sampler). 20 ms: at 10 ms an event loop busy with tiny tasks ran
#: ~2% slower, at 20 ms under 1% (docs/diagnostics.md, "What the profiler costs").
DEFAULT_INTERVAL = 0.02
#: Seconds of samples per tree in the history.
DEFAULT_CYCLE = 1.0
#: Cycles kept (3600 one-second cycles: the last hour).
DEFAULT_HISTORY = 3600
#: Frames kept per stack, innermost dropped beyond (deep recursion would otherwise
#: make trees too deep to merge or ship).
MAX_DEPTH = 100

_ASYNCIO_EVENTS = ("asyncio/events.py", "asyncio\\events.py")
_SELECTORS = ("selectors.py",)
_ROOT_DESCRIPTION = {"filename": "", "name": "", "line_number": 0, "line": ""}
_COMPILED = {"identifier": "<compiled>;<compiled>;0",
             "description": {"filename": "<compiled>", "name": "<compiled code>",
                             "line_number": 0, "line": ""}}


def create() -> dict:
    """An empty tree (dask's `profile.create()`)."""
    return {"count": 0, "children": {}, "identifier": "root",
            "description": dict(_ROOT_DESCRIPTION)}


def merge(*trees: dict) -> dict:
    """One tree adding up the counts of `trees` (nodes matched by identifier)."""
    if not trees:
        return create()
    idents = {t["identifier"] for t in trees}
    if len(idents) != 1:
        raise ValueError(f"cannot merge profile nodes with different identifiers: {idents}")
    children: dict = {}
    for t in trees:
        for ident, child in t["children"].items():
            children.setdefault(ident, []).append(child)
    return {"count": sum(t["count"] for t in trees),
            "children": {k: (v[0] if len(v) == 1 else merge(*v)) for k, v in children.items()},
            "identifier": trees[0]["identifier"],
            "description": trees[0]["description"]}


def copy(tree: dict) -> dict:
    """A deep copy of a tree's counts and children (descriptions are shared: never
    mutated)."""
    return {"count": tree["count"], "identifier": tree["identifier"],
            "description": tree["description"],
            "children": {k: copy(c) for k, c in tree["children"].items()}}


def flatten(tree: dict) -> list:
    """Rows `[parent row, identifier, count, filename, name, line_number, line]`, parents
    first: a flat form for the wire (msgpack limits nesting; trees can be 200 deep)."""
    rows = []
    stack = [(-1, tree)]
    while stack:
        parent, node = stack.pop()
        d = node["description"]
        rows.append([parent, node["identifier"], node["count"], d.get("filename", ""),
                     d.get("name", ""), d.get("line_number", 0), d.get("line", "")])
        me = len(rows) - 1
        for child in node["children"].values():
            stack.append((me, child))
    return rows


def unflatten(rows: list) -> dict:
    """The tree of `flatten`'s rows."""
    if not rows:
        return create()
    nodes = []
    for parent, ident, count, filename, name, line_number, line in rows:
        node = {"count": count, "children": {}, "identifier": ident,
                "description": {"filename": filename, "name": name,
                                "line_number": line_number, "line": line}}
        nodes.append(node)
        if parent >= 0:
            nodes[parent]["children"][ident] = node
    return nodes[0]


def total(tree: dict) -> int:
    return tree["count"]


class _Frames:
    """Identifiers and descriptions per code object, computed once (a sample then
    costs dict lookups, not string formatting or file reads)."""

    def __init__(self, limit=20_000):
        self.limit = limit
        self.cache: dict = {}

    def node_of(self, frame):
        code = frame.f_code
        hit = self.cache.get(code)
        if hit is None:
            if len(self.cache) > self.limit:
                self.cache.clear()
            ident = f"{code.co_name};{code.co_filename};{code.co_firstlineno}"
            lineno = frame.f_lineno or code.co_firstlineno
            try:
                line = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
            except Exception:
                line = ""
            hit = (ident, {"filename": code.co_filename, "name": code.co_name,
                           "line_number": lineno, "line": line})
            self.cache[code] = hit
        return hit


def add_stack(tree: dict, stack: list, frames: _Frames) -> None:
    """Count one sample: `stack` is the frames outermost first (empty: compiled code
    only, counted under a "<compiled code>" node)."""
    tree["count"] += 1
    node = tree
    if not stack:
        ident, desc = _COMPILED["identifier"], _COMPILED["description"]
        child = node["children"].get(ident)
        if child is None:
            child = node["children"][ident] = {"count": 0, "children": {},
                                               "identifier": ident, "description": desc}
        child["count"] += 1
        return
    for f in stack:
        ident, desc = frames.node_of(f)
        children = node["children"]
        child = children.get(ident)
        if child is None:
            child = children[ident] = {"count": 0, "children": {}, "identifier": ident,
                                       "description": desc}
        child["count"] += 1
        node = child


def _executor_markers():
    """The code object of the task threads' loop and the line numbers of its two
    calls: `get()` (idle, waiting for a task) and `fn()` (running one)."""
    import inspect

    from taskcore.executor import TaskExecutor

    code = TaskExecutor._run.__code__
    idle = busy = None
    try:
        lines, first = inspect.getsourcelines(TaskExecutor._run)
        for i, text in enumerate(lines):
            s = text.strip()
            if idle is None and s.startswith("item = get()"):
                idle = first + i
            elif busy is None and s.startswith("value = fn()"):
                busy = first + i
    except (OSError, TypeError):
        pass
    return code, idle, busy


class Cycle:
    """The trees of one cycle: all task threads, per key prefix, the event loop."""

    __slots__ = ("start", "stop", "tasks", "by_prefix", "server")

    def __init__(self, start):
        self.start = start
        self.stop = None
        self.tasks = create()
        self.by_prefix: dict = {}
        self.server = create()


class Sampler:
    """The sampling thread of one worker (see the module doc).

    `worker` gives `executor.threads` (the task threads) and `state.get_task(tid)`;
    `loop_thread` is the event loop's thread id and `loop_base` the frame that runs
    the loop (set by `mark_loop` from a loop callback): loop-thread stacks are taken
    above it, and a stack that is just it is an idle loop, not counted.
    """

    def __init__(self, worker, interval=None, cycle=DEFAULT_CYCLE, history=DEFAULT_HISTORY):
        interval = DEFAULT_INTERVAL if interval is None else float(interval)
        if interval <= 0:
            raise ValueError(f"profile interval must be > 0 seconds, got {interval}")
        if cycle <= 0 or history < 1:
            raise ValueError("profile cycle must be > 0 seconds and history >= 1 cycle")
        self.worker = worker
        self.interval = interval
        self.cycle = float(cycle)
        self.history: collections.deque = collections.deque(maxlen=int(history))
        self.lock = threading.Lock()
        self.current = Cycle(time.time())
        self.frames = _Frames()
        self.loop_thread = None
        self.loop_base = None
        self._stop = threading.Event()
        self._thread = None
        self._tid_prefix: dict = {}      # thread id -> (task id, key prefix)
        self._run_code, self._idle_line, self._busy_line = _executor_markers()
        self.samples = 0
        self.cpu_seconds = 0.0          # CPU the sampler itself used (its cost)

    # -- lifecycle ------------------------------------------------------------------
    def mark_loop(self):
        """Call from a callback of the worker's event loop (not from a coroutine)."""
        self.loop_thread = threading.get_ident()
        base = sys._getframe(1)
        if base.f_code.co_filename.endswith(_ASYNCIO_EVENTS):
            # asyncio's own loop (not uvloop) runs each callback from frames of its own
            # (Handle._run under _run_once) that change every time: start at the frame
            # of run_forever instead; its idle stacks end in selectors.py.
            f = base
            while f is not None and f.f_code.co_name != "run_forever":
                f = f.f_back
            if f is not None:
                base = f
        self.loop_base = base

    def start(self):
        self._thread = threading.Thread(target=self._run, name="taskcore-profile",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.loop_base = None

    # -- sampling -------------------------------------------------------------------
    def _run(self):
        # time.sleep, not Event.wait(timeout): one GIL round trip per wake-up, without
        # the Python-level Condition machinery; stop() is seen within one interval.
        sleep = time.sleep
        stopped = self._stop.is_set
        interval = self.interval
        clock = time.thread_time
        while True:
            sleep(interval)
            if stopped():
                return
            t0 = clock()
            try:
                self.sample()
            except Exception:
                # A racing shutdown (threads gone, state replaced) must not kill the
                # sampler; the next sample starts afresh.
                pass
            self.cpu_seconds += clock() - t0

    def sample(self, now=None):
        now = time.time() if now is None else now
        cur = self.current
        if now - cur.start >= self.cycle:
            with self.lock:
                cur.stop = now
                self.history.append(cur)
                cur = self.current = Cycle(now)
        frames = sys._current_frames()
        executor = getattr(self.worker, "executor", None)
        threads = tuple(executor.threads) if executor is not None else ()
        run_code = self._run_code
        with self.lock:
            for t in threads:
                frame = frames.get(t.ident)
                if frame is None:
                    continue
                stack = []
                f = frame
                while f is not None and f.f_code is not run_code:
                    stack.append(f)
                    f = f.f_back
                if f is None:
                    continue                    # not yet (or no longer) in the task loop
                if not stack and f.f_lineno != self._busy_line:
                    continue                    # idle: waiting for a task
                stack.reverse()
                del stack[MAX_DEPTH:]
                add_stack(cur.tasks, stack, self.frames)
                prefix = self._prefix(t.ident, f)
                if prefix is not None:
                    tree = cur.by_prefix.get(prefix)
                    if tree is None:
                        tree = cur.by_prefix[prefix] = create()
                    add_stack(tree, stack, self.frames)
            base = self.loop_base
            if base is not None:
                frame = frames.get(self.loop_thread)
                stack = []
                f = frame
                while f is not None and f is not base:
                    stack.append(f)
                    f = f.f_back
                if f is not None and stack and not stack[0].f_code.co_filename.endswith(
                        _SELECTORS):
                    stack.reverse()
                    del stack[MAX_DEPTH:]
                    add_stack(cur.server, stack, self.frames)
        self.samples += 1
        del frames

    def _prefix(self, ident, run_frame):
        """The key prefix of the task the thread runs (from `tid` in its loop's frame)."""
        try:
            local = run_frame.f_locals
            tid = local.get("tid")
            # The snapshot would keep the loop's other locals (the previous task's
            # result) alive until the next sample: drop it now.
            local.clear()
        except Exception:
            return None
        hit = self._tid_prefix.get(ident)
        if hit is not None and hit[0] == tid:
            return hit[1]
        state = getattr(self.worker, "state", None)
        ts = state.get_task(tid) if state is not None and tid is not None else None
        if ts is None:
            return None
        from taskcore.core.worker_dispatch import key_prefix

        prefix = key_prefix(ts.key)
        if not isinstance(prefix, str):
            prefix = str(prefix)
        if len(self._tid_prefix) > 1000:     # threads come and go (secede)
            self._tid_prefix.clear()
        self._tid_prefix[ident] = (tid, prefix)
        return prefix

    # -- queries ----------------------------------------------------------------------
    def collect(self, start=None, stop=None, key=None, server=False) -> dict:
        """The merged tree of the cycles overlapping [start, stop] (wall-clock seconds;
        None: unbounded), for one key prefix (`key`) or all task threads, or the event
        loop (`server`). Safe from any thread; merging runs outside the lock."""
        with self.lock:
            cycles = list(self.history)
            cur = self.current
            current = _pick(cur, key, server)
            current = copy(current) if current is not None else None
            cur_start = cur.start
        trees = []
        for c in cycles:
            if (start is None or c.stop >= start) and (stop is None or c.start <= stop):
                t = _pick(c, key, server)
                if t is not None:
                    trees.append(t)
        if current is not None and (stop is None or cur_start <= stop):
            trees.append(current)
        return merge(*trees) if trees else create()


def _pick(cycle, key, server):
    if server:
        return cycle.server
    if key is None:
        return cycle.tasks
    return cycle.by_prefix.get(key)


def key_filter(key):
    """The key prefix that `client.profile(key=...)` selects: a prefix ("inc") as it is,
    a full key ("inc-3fa2", ("x-ab", 0)) as its prefix."""
    if key is None:
        return None
    from taskcore.core.worker_dispatch import key_prefix

    p = key_prefix(key)
    return p if isinstance(p, str) else str(p)
