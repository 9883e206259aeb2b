"""Plugins: code that runs on the scheduler, on every worker or on every nanny, now
and on members that join later (dask.distributed's `diagnostics/plugin.py`).

`client.register_plugin(plugin)` sends a plugin, by its type, to where it runs:

- `SchedulerPlugin`: unpickled on the scheduler; its hooks (`start`, `close`,
  `add_worker`, `remove_worker`, `add_client`, `remove_client`, `restart`,
  `transition`) are called by the scheduler server (scheduler.py).
- `WorkerPlugin`: the scheduler keeps it pickled (it never unpickles it) and hands it
  to every worker: those connected now get a `plugin-add` message, a worker that
  registers later (a new one, one restarted by its nanny, one that reconnected) gets
  every plugin in the scheduler's `registered` reply and sets them up before it reads
  its first task. `setup(worker)`, `teardown(worker)`, `transition(key, start, finish)`.
- `NannyPlugin`: likewise to every nanny (`setup(nanny)`, `teardown(nanny)`); with
  `restart = True` the nanny restarts its worker after the setup, so the new worker
  process sees what the plugin changed (environment, files).

`transition` hooks are called by the layer that carries out the state machines'
instructions (the servers), from the instructions it carries out: a task started
(`ready -> executing`), finished (`executing -> memory` / `error`), fetched
(`fetch -> flight`), dropped (`memory -> released`); the scheduler reports the
instructions it sends (`processing`, `memory` for a waiting client, `erred`,
`forgotten`). With no plugin that has a `transition`, none of this runs: the servers
replace their compiled `execute` by a Python one on the instance only while such a
plugin is registered, so the tiny-task path is untouched.

Stock plugins: `UploadFile` (what `client.upload_file` registers), `UploadDirectory`,
`PipInstall`, `Environ`.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile

logger = logging.getLogger("taskcore.plugins")

__all__ = ["SchedulerPlugin", "WorkerPlugin", "NannyPlugin", "UploadFile", "UploadDirectory",
           "PipInstall", "Environ", "plugin_name", "plugin_kind"]


class SchedulerPlugin:
    """Runs in the scheduler. Override the hooks you need; each may be a coroutine
    function where dask allows one (`start`, `close`)."""

    idempotent = False

    async def start(self, scheduler):
        """Registered on `scheduler` (a running Scheduler)."""

    async def close(self):
        """The scheduler closes, or the plugin is unregistered."""

    def restart(self, scheduler):
        """`client.restart()` ran."""

    def update_graph(self, scheduler, *, client=None, keys=None, tasks=None,
                     annotations=None, priority=None, stimulus_id=None, **kwargs):
        """A client's graph was added: `keys` it wants, `tasks` the keys of its tasks."""

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs):
        """The scheduler's state machine moved `key` from `start` to `finish`."""

    def add_worker(self, scheduler=None, worker=None):
        """Worker `worker` (its address) registered."""

    def remove_worker(self, scheduler=None, worker=None, *, stimulus_id=None, **kwargs):
        """Worker `worker` left."""

    def add_client(self, scheduler=None, client=None):
        """Client `client` (its id) connected."""

    def remove_client(self, scheduler=None, client=None):
        """Client `client` left."""


class WorkerPlugin:
    """Runs in every worker. `setup(worker)` when it arrives (or the worker starts),
    `teardown(worker)` when it is replaced, unregistered or the worker closes."""

    idempotent = False

    def setup(self, worker):
        """Set up on `worker`; may be a coroutine function."""

    def teardown(self, worker):
        """Undo `setup`; may be a coroutine function."""

    def transition(self, key, start, finish, **kwargs):
        """The worker carried out an instruction that moved `key` to `finish`."""


class NannyPlugin:
    """Runs in every nanny. `restart = True`: the nanny restarts its worker after
    `setup`, so the worker process starts with what the plugin set up."""

    restart = False
    idempotent = False

    def setup(self, nanny):
        """Set up on `nanny`; may be a coroutine function."""

    def teardown(self, nanny):
        """Undo `setup`; may be a coroutine function."""


def plugin_name(plugin, name=None):
    """The plugin's name: `name`, else its `name` attribute, else its type's name plus
    a unique suffix (as dask names them)."""
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a plugin name must be a non-empty str, got {name!r}")
        return name
    n = getattr(plugin, "name", None)
    if isinstance(n, str) and n:
        return n
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def plugin_kind(plugin):
    """"scheduler", "worker" or "nanny"; TypeError for anything else."""
    if isinstance(plugin, SchedulerPlugin):
        return "scheduler"
    if isinstance(plugin, NannyPlugin):
        return "nanny"
    if isinstance(plugin, WorkerPlugin):
        return "worker"
    raise TypeError(f"a plugin must be a SchedulerPlugin, WorkerPlugin or NannyPlugin "
                    f"(taskcore.plugins), got {type(plugin).__name__}")


def overrides(plugin, hook, base):
    """Whether `plugin` has its own `hook` (not the base class's empty one)."""
    fn = getattr(type(plugin), hook, None)
    if fn is None:
        return callable(getattr(plugin, hook, None))
    return fn is not getattr(base, hook, None)


async def call_hook(fn, *args, **kwargs):
    """Call a hook that may be a coroutine function."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


# -- the member side: a worker's or a nanny's registered plugins -----------------------

class PluginHost:
    """The plugins of one worker or nanny: {name: plugin}, set up in order, torn down
    when replaced, removed or the member closes. `transition_plugins` is the tuple of
    those with a `transition` hook (what the instruction layer calls)."""

    def __init__(self, member, base):
        self.member = member
        self.base = base
        self.plugins: dict = {}
        self.transition_plugins: tuple = ()

    async def add(self, name, plugin):
        old = self.plugins.pop(name, None)
        if old is not None:
            await self._teardown(name, old)
        self._refresh()
        if hasattr(plugin, "setup"):
            await call_hook(plugin.setup, self.member)
        self.plugins[name] = plugin
        self._refresh()

    async def remove(self, name):
        plugin = self.plugins.pop(name, None)
        self._refresh()
        if plugin is None:
            raise KeyError(f"no plugin named {name!r} on {getattr(self.member, 'address', '?')}")
        await self._teardown(name, plugin)

    async def close(self):
        plugins, self.plugins = self.plugins, {}
        self._refresh()
        for name, plugin in reversed(list(plugins.items())):
            await self._teardown(name, plugin)

    async def _teardown(self, name, plugin):
        if not hasattr(plugin, "teardown"):
            return
        try:
            await call_hook(plugin.teardown, self.member)
        except Exception:
            logger.exception("teardown of plugin %r failed", name)

    def _refresh(self):
        self.transition_plugins = tuple(p for p in self.plugins.values()
                                        if overrides(p, "transition", self.base))

    def transition(self, key, start, finish, **kwargs):
        for p in self.transition_plugins:
            try:
                p.transition(key, start, finish, **kwargs)
            except Exception:
                logger.exception("plugin transition hook failed for %r", key)


def outcome(e=None):
    """A member's answer to a plugin request: {"status": "OK"}, or {"status": "error",
    "exception": Serialized, "text": str} (the text for those that cannot unpickle it)."""
    if e is None:
        return {"status": "OK"}
    from taskcore.core.serialize import serialize_obj

    try:
        ser = serialize_obj(e)
    except Exception:
        ser = serialize_obj(RuntimeError(f"{type(e).__name__}: {e}"))
    return {"status": "error", "exception": ser, "text": f"{type(e).__name__}: {e}"}


# -- files ------------------------------------------------------------------------------

def member_directory(member):
    """The directory a worker or nanny keeps uploaded files in: its `local_directory`,
    else one temporary directory made for it on first use."""
    d = getattr(member, "local_directory", None)
    if d is None:
        opts = getattr(member, "_worker_options", None)     # a Nanny's
        if opts:
            d = opts.get("local_directory")
    if d is None:
        d = getattr(member, "_plugin_directory", None)
        if d is None:
            d = tempfile.mkdtemp(prefix="taskcore-files-")
            member._plugin_directory = d
    os.makedirs(d, exist_ok=True)
    return d


def _top_level_names(path):
    """The importable top-level modules and packages inside a .zip/.egg/.whl."""
    names = set()
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            first = n.split("/", 1)[0]
            if "/" in n and first.endswith((".dist-info", ".egg-info")) or first == "EGG-INFO":
                continue
            if "/" in n and n.split("/", 1)[1]:
                names.add(first)
            elif first.endswith(".py"):
                names.add(first[:-3])
    return sorted(x for x in names if x.isidentifier())


def load_file(path, load=True):
    """Make the file at `path` importable here (its directory, or the archive itself,
    on sys.path) and, with `load`, import it, or reload what was imported before."""
    importlib.invalidate_caches()
    if path.endswith(".py"):
        d = os.path.dirname(path)
        if d not in sys.path:
            sys.path.insert(0, d)
        names = [os.path.basename(path)[:-3]]
    else:
        if path not in sys.path:
            sys.path.insert(0, path)
        names = _top_level_names(path)
    if not load:
        return names
    for n in names:
        mod = sys.modules.get(n)
        if mod is not None:
            # A module from the archive caches the archive's directory listing:
            # drop it, so a new upload of the same archive is read anew.
            import zipimport

            zipimport._zip_directory_cache.pop(path, None)
            importlib.reload(mod)
        else:
            importlib.import_module(n)
    return names


class UploadFile(WorkerPlugin):
    """`client.upload_file(path)`: the file's bytes, written into each worker's
    directory and made importable (imported with `load`)."""

    def __init__(self, filename, data=None, load=True):
        if data is None:
            with open(filename, "rb") as f:
                data = f.read()
        self.filename = os.path.basename(filename)
        self.data = data
        self.load = load
        self.name = f"upload-file-{self.filename}"

    def setup(self, worker):
        path = os.path.join(member_directory(worker), self.filename)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with open(tmp, "wb") as f:
            f.write(self.data)
        os.replace(tmp, path)
        load_file(path, self.load)


class WorkerSetup(WorkerPlugin):
    """`client.register_worker_callbacks(setup)`: `setup(dask_worker=worker)` (or with
    no argument) on every worker."""

    def __init__(self, setup):
        self.setup_function = setup
        self.name = f"worker-setup-{uuid.uuid4()}"

    def setup(self, worker):
        params = inspect.signature(self.setup_function).parameters
        if "dask_worker" in params:
            return self.setup_function(dask_worker=worker)
        if "worker" in params:
            return self.setup_function(worker=worker)
        return self.setup_function()


class UploadDirectory(NannyPlugin):
    """Copy a local directory to every worker's machine (zipped once, here).

    `restart=True` restarts the workers afterwards; `update_path=True` puts the
    directory on the workers' `sys.path` (through their PYTHONPATH, so it lasts
    across restarts). Files under a path containing one of `skip_words`, or for
    which one of `skip` (callables on the file name) is true, are left out."""

    def __init__(self, path, restart=False, update_path=False,
                 skip_words=(".git", ".github", ".pytest_cache", "tests", "docs"),
                 skip=(lambda fn: os.path.splitext(fn)[1] == ".pyc",)):
        import io

        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise ValueError(f"UploadDirectory: {path!r} is not a directory")
        self.path = path
        self.restart = restart
        self.update_path = update_path
        self.name = f"upload-directory-{os.path.basename(os.path.normpath(path))}"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for root, dirs, files in os.walk(path):
                for fn in files:
                    full = os.path.join(root, fn)
                    rel = os.path.relpath(full, os.path.dirname(os.path.normpath(path)))
                    parts = rel.split(os.sep)
                    if any(w in parts for w in skip_words) or any(s(fn) for s in skip):
                        continue
                    z.write(full, rel)
        self.data = buf.getvalue()

    def setup(self, nanny):
        import io

        base = member_directory(nanny)
        with zipfile.ZipFile(io.BytesIO(self.data)) as z:
            z.extractall(base)
        target = os.path.join(base, os.path.basename(os.path.normpath(self.path)))
        if self.update_path:
            _prepend_path(nanny, target)
        return target


def _prepend_path(nanny, directory):
    env = getattr(nanny, "env", None)
    if env is None:
        return
    old = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    parts = [p for p in old.split(os.pathsep) if p]
    if directory not in parts:
        env["PYTHONPATH"] = os.pathsep.join([directory, *parts])


class PipInstall(WorkerPlugin):
    """`pip install packages` on every worker (once per machine and package list: a
    lock file makes workers sharing a machine install one after another).
    `restart_workers=True` restarts each worker afterwards through its nanny."""

    def __init__(self, packages, pip_options=None, restart_workers=False):
        if isinstance(packages, str) or not packages:
            raise TypeError("PipInstall takes a list of packages, e.g. ['scipy==1.12']")
        self.packages = list(packages)
        self.pip_options = list(pip_options or [])
        self.restart_workers = restart_workers
        self.name = f"pip-install-{uuid.uuid4().hex[:8]}"

    def command(self):
        return [sys.executable, "-m", "pip", "install", *self.pip_options, *self.packages]

    async def setup(self, worker):
        import fcntl

        lock_path = os.path.join(tempfile.gettempdir(), "taskcore-pip-install.lock")
        loop = asyncio.get_running_loop()

        def run():
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return subprocess.run(self.command(), capture_output=True, text=True)

        proc = await loop.run_in_executor(None, run)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(self.packages)} failed on "
                               f"{worker.address} (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        importlib.invalidate_caches()
        if self.restart_workers and getattr(worker, "nanny_address", None):
            # Asked of the nanny once this setup has answered: the scheduler's plugin
            # request completes first, then the worker process is replaced.
            loop.call_later(0.1, lambda: asyncio.ensure_future(_restart_through_nanny(worker)))


async def _restart_through_nanny(worker):
    from taskcore.transports import connect

    kw = {"security": worker.security} if worker.security is not None else {}
    try:
        comm = await connect(worker.nanny_address, timeout=5, role="worker",
                             token=worker.token, **kw)
        await comm.write({"op": "restart-worker", "reason": "PipInstall(restart_workers=True)"})
        await comm.close()
    except Exception as e:
        logger.warning("could not ask the nanny of %s to restart it: %r", worker.address, e)


class Environ(NannyPlugin):
    """Set environment variables for the workers: the nanny's environment for the
    worker process, then a restart, so the worker starts with them."""

    restart = True

    def __init__(self, environ=None):
        self.environ = {str(k): str(v) for k, v in (environ or {}).items()}
        self.name = "environ"

    def setup(self, nanny):
        nanny.env.update(self.environ)


# -- transition hooks, fed by the servers' instruction layer ------------------------------

def worker_host(worker):
    """The worker's PluginHost (made on first use)."""
    host = getattr(worker, "_plugin_host", None)
    if host is None:
        host = worker._plugin_host = PluginHost(worker, WorkerPlugin)
    return host


def update_worker_hook(worker):
    """Route the worker's instructions through `_worker_execute` while a plugin has a
    `transition`; otherwise take the instance attribute away, so the compiled `execute`
    runs as if no plugin existed."""
    host = worker_host(worker)
    if host.transition_plugins:
        worker.execute = lambda instructions: _worker_execute(worker, host, instructions)
    else:
        worker.__dict__.pop("execute", None)


def _worker_execute(worker, host, instructions):
    from taskcore.core.worker_dispatch import WorkerDispatch
    from taskcore.core.worker_state import (DropData, Execute, GatherDep, TaskErredMsg,
                                            TaskFinishedMsg)

    inline = WorkerDispatch.execute(worker, instructions)
    report = host.transition
    for ins in instructions:
        t = type(ins)
        if t is Execute:
            report(ins.key, "ready", "executing", stimulus_id=ins.stimulus_id)
        elif t is TaskFinishedMsg:
            report(ins.key, "executing", "memory", stimulus_id=ins.stimulus_id)
        elif t is TaskErredMsg:
            report(ins.key, "executing", "error", stimulus_id=ins.stimulus_id)
        elif t is DropData:
            report(ins.key, "memory", "released", stimulus_id=ins.stimulus_id)
        elif t is GatherDep:
            for k in ins.keys:
                report(k, "fetch", "flight", stimulus_id=ins.stimulus_id)
    return inline


def update_scheduler_hook(scheduler):
    """As `update_worker_hook`, for the scheduler's SchedulerPlugins. While one overrides
    `transition`, the scheduler's `execute` reports every transition its state machine
    made since the last call (from the machine's transition log), then executes; while
    one overrides `update_graph`, its `handle` calls it after a graph was added. With
    neither, the compiled methods stay: nothing runs per task."""
    plugins = tuple(scheduler.plugins.values())
    ps = tuple(p for p in plugins if overrides(p, "transition", SchedulerPlugin))
    if ps:
        cursor = [scheduler.state.n_transitions]
        scheduler.execute = lambda instructions: _scheduler_execute(scheduler, ps, cursor,
                                                                    instructions)
    else:
        scheduler.__dict__.pop("execute", None)
    graphs = tuple(p for p in plugins if overrides(p, "update_graph", SchedulerPlugin))
    if graphs:
        scheduler.handle = lambda ev: _scheduler_handle(scheduler, graphs, ev)
    else:
        scheduler.__dict__.pop("handle", None)


def _scheduler_handle(scheduler, plugins, ev):
    from taskcore.core.scheduler_dispatch import SchedulerDispatch
    from taskcore.core.scheduler_state import UpdateGraph

    r = SchedulerDispatch.handle(scheduler, ev)
    if type(ev) is UpdateGraph:
        for p in plugins:
            try:
                p.update_graph(scheduler, client=ev.client, keys=set(ev.keys),
                               tasks=list(ev.task_keys), annotations=ev.annotations,
                               priority=ev.priority, stimulus_id=ev.stimulus_id)
            except Exception:
                logger.exception("scheduler plugin update_graph hook failed")
    return r


def _scheduler_execute(scheduler, plugins, cursor, instructions):
    from taskcore.core.scheduler_dispatch import SchedulerDispatch

    state = scheduler.state
    done = state.transitions_since(cursor[0])
    cursor[0] = state.n_transitions
    r = SchedulerDispatch.execute(scheduler, instructions)
    for key, start, finish, stimulus_id in done:
        for p in plugins:
            try:
                p.transition(key, start, finish, stimulus_id=stimulus_id)
            except Exception:
                logger.exception("scheduler plugin transition hook failed for %r", key)
    return r
