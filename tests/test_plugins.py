"""Plugins (taskcore/plugins.py): worker, scheduler and nanny plugins on current and
future members, their hooks, the stock plugins, and the hook costing nothing unused."""
import io
import os
import sys
import zipfile

import cloudpickle
import pytest

from taskcore import (Client, Environ, LocalCluster, NannyPlugin, PipInstall, SchedulerPlugin,
                      UploadDirectory, WorkerPlugin)
from taskcore.testing import wait_until
from taskcore.worker import get_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


class Recorder(WorkerPlugin):
    """Records its hooks on the worker (worker.recorded)."""

    name = "recorder"

    def setup(self, worker):
        worker.recorded = [("setup",)]
        self.worker = worker

    def teardown(self, worker):
        worker.recorded.append(("teardown",))

    def transition(self, key, start, finish, **kwargs):
        self.worker.recorded.append((key, start, finish))


class Failing(WorkerPlugin):
    def setup(self, worker):
        raise RuntimeError("setup refused")


class SchedRecorder(SchedulerPlugin):
    def __init__(self):
        self.seen = []

    async def start(self, scheduler):
        self.seen.append(("start",))

    async def close(self):
        self.seen.append(("close",))

    def add_worker(self, scheduler=None, worker=None):
        self.seen.append(("add_worker", worker))

    def remove_worker(self, scheduler=None, worker=None, **kwargs):
        self.seen.append(("remove_worker", worker))

    def add_client(self, scheduler=None, client=None):
        self.seen.append(("add_client", client))

    def remove_client(self, scheduler=None, client=None):
        self.seen.append(("remove_client", client))

    def transition(self, key, start, finish, *args, **kwargs):
        self.seen.append(("transition", key, start, finish))

    def update_graph(self, scheduler, *, client=None, keys=None, tasks=None, **kwargs):
        self.seen.append(("update_graph", client, sorted(keys), sorted(tasks)))


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc:
        yield lc


@pytest.fixture
def c(lc):
    with Client(lc) as c:
        yield c


def test_worker_plugin_setup_transition_teardown(c, lc):
    assert set(c.register_plugin(Recorder())) == set(lc.scheduler.workers)
    assert c.submit(lambda: get_worker().recorded[0], pure=False).result() == ("setup",)
    f = c.submit(inc, 1, key="inc-plugin-1")
    assert f.result() == 2
    rec = c.run(lambda dask_worker: list(dask_worker.recorded))
    seen = [r for rs in rec.values() for r in rs if r[0] == "inc-plugin-1"]
    assert ("inc-plugin-1", "ready", "executing") in seen
    assert ("inc-plugin-1", "executing", "memory") in seen
    del f
    wait_until(lambda: any(("inc-plugin-1", "memory", "released") in rs
                           for rs in c.run(lambda dask_worker: dask_worker.recorded).values()),
               message="the release reported")
    c.unregister_worker_plugin("recorder")
    rec = c.run(lambda dask_worker: dask_worker.recorded[-1])
    assert set(rec.values()) == {("teardown",)}
    # Unregistered: the instruction layer is the compiled one again.
    assert not any(c.run(lambda dask_worker: "execute" in dask_worker.__dict__).values())
    with pytest.raises(ValueError, match="recorder"):
        c.unregister_worker_plugin("recorder")


def test_no_plugin_no_hook(c, lc):
    """Without a transition plugin, no Python runs per instruction: the servers keep the
    compiled `execute` (no instance attribute shadows it)."""
    assert "execute" not in lc.scheduler.__dict__
    assert not any(c.run(lambda dask_worker: "execute" in dask_worker.__dict__).values())

    class SetupOnly(WorkerPlugin):
        name = "setup-only"

    c.register_plugin(SetupOnly())
    try:
        assert not any(c.run(lambda dask_worker: "execute" in dask_worker.__dict__).values())
    finally:
        c.unregister_worker_plugin("setup-only")


def test_plugin_reaches_a_worker_that_joins_later(c, lc):
    c.register_plugin(Recorder(), name="later")
    try:
        lc.scale(3)
        c.wait_for_workers(3)
        new = [w for w in lc.scheduler.workers]
        # A new worker set it up before its first task: the first task sees it.
        out = c.run(lambda dask_worker: dask_worker.recorded[0])
        assert len(out) == 3 and set(out.values()) == {("setup",)}
        assert all(c.submit(lambda: get_worker().recorded[0], workers=[w], pure=False).result()
                   == ("setup",) for w in new)
    finally:
        c.unregister_worker_plugin("later")
        lc.scale(2)
        c.wait_for_workers(2)


def test_replacing_and_idempotent_registration(c):
    class Tag(WorkerPlugin):
        name = "tag"

        def __init__(self, v):
            self.v = v

        def setup(self, worker):
            worker.tag = self.v

        def teardown(self, worker):
            worker.tag_torn = self.v

    c.register_plugin(Tag(1))
    c.register_plugin(Tag(2))                        # replaces: the first torn down
    assert set(c.run(lambda dask_worker: (dask_worker.tag, dask_worker.tag_torn)).values()) \
        == {(2, 1)}
    c.register_plugin(Tag(3), idempotent=True)       # kept the registered one
    assert set(c.run(lambda dask_worker: dask_worker.tag).values()) == {2}
    with pytest.warns(DeprecationWarning):
        c.register_worker_plugin(Tag(4))             # the older name still works
    assert set(c.run(lambda dask_worker: dask_worker.tag).values()) == {4}
    c.unregister_worker_plugin("tag")


def test_errors(c):
    with pytest.raises(RuntimeError, match="setup refused"):
        c.register_plugin(Failing(), name="failing")
    c.unregister_worker_plugin("failing")
    with pytest.raises(TypeError, match="SchedulerPlugin, WorkerPlugin or NannyPlugin"):
        c.register_plugin(object())
    with pytest.raises(TypeError, match="name"):
        c.register_plugin(Recorder(), name="")


def test_scheduler_plugin_hooks(c, lc):
    sp = SchedRecorder()
    c.register_plugin(sp, name="sched-rec")
    s = lc.scheduler
    try:
        plugin = s.plugins["sched-rec"]
        assert plugin.seen == [("start",)]
        assert c.submit(inc, 10, key="inc-sched-10").result() == 11
        # Every transition of the scheduler's machine, in order (its transition log).
        def trans():
            return [x[2:] for x in plugin.seen
                    if x[0] == "transition" and x[1] == "inc-sched-10"]
        wait_until(lambda: len(trans()) >= 3, message="three transitions of the task")
        assert ("update_graph", c.id, ["inc-sched-10"], ["inc-sched-10"]) in plugin.seen
        assert trans()[:3] == [("released", "queued"), ("queued", "processing"),
                               ("processing", "memory")]
        with Client(lc, set_as_default=False) as c2:
            cid = c2.id
        wait_until(lambda: ("remove_client", cid) in plugin.seen, message="remove_client")
        assert ("add_client", cid) in plugin.seen
        lc.scale(3)
        c.wait_for_workers(3)
        wait_until(lambda: any(x[0] == "add_worker" for x in plugin.seen), message="add_worker")
        lc.scale(2)
        wait_until(lambda: any(x[0] == "remove_worker" for x in plugin.seen),
                   message="remove_worker")
    finally:
        c.unregister_scheduler_plugin("sched-rec")
    assert plugin.seen[-1] == ("close",)
    assert "execute" not in s.__dict__
    assert "handle" not in s.__dict__
    with pytest.raises(ValueError, match="sched-rec"):
        c.unregister_scheduler_plugin("sched-rec")


def test_plugin_from_inside_a_task(c):
    def register():
        from taskcore import get_client

        class FromTask(WorkerPlugin):
            name = "from-task"

            def setup(self, worker):
                worker.from_task = True

        get_client().register_plugin(FromTask())
        return True

    assert c.submit(register).result()
    assert all(c.run(lambda dask_worker: dask_worker.from_task).values())
    c.unregister_worker_plugin("from-task")


# -- nanny plugins, stock plugins, restarts: worker processes -------------------------------

class NannyTag(NannyPlugin):
    name = "nanny-tag"

    def setup(self, nanny):
        nanny.env["API2_NANNY_TAG"] = "tagged"


def _env(name):
    return os.environ.get(name)


@pytest.fixture(scope="module")
def plc():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as lc:
        with Client(lc) as c:
            yield lc, c


def _worker_pids(c):
    return set(c.run(os.getpid).values())


def test_environ_restarts_workers_and_reaches_new_nannies(plc, tmp_path):
    lc, c = plc
    before = _worker_pids(c)
    c.register_plugin(Environ({"API2_ENV": "one"}))
    c.wait_for_workers(1)
    assert _worker_pids(c).isdisjoint(before)           # restarted to see it
    assert c.submit(_env, "API2_ENV", pure=False).result() == "one"
    c.register_plugin(NannyTag())                       # no restart asked: next start
    c.restart()
    assert c.submit(_env, "API2_NANNY_TAG", pure=False).result() == "tagged"
    c.register_plugin(Recorder(), name="rec-p")
    lc.scale(2)
    # The new nanny sets its plugins up, then restarts its worker once.
    wait_until(lambda: len(c.scheduler_info()["workers"]) == 2 and all(
        v == ("one", "tagged") for v in c.run(lambda: (_env("API2_ENV"), _env("API2_NANNY_TAG")),
                                              on_error="ignore").values()
    ) and len(c.run(lambda: 1, on_error="ignore")) == 2, timeout=30,
        message="the new worker with the nanny plugins")
    # A worker restarted by its nanny gets the worker plugin again.
    assert set(c.run(lambda dask_worker: dask_worker.recorded[0]).values()) == {("setup",)}
    c.unregister_worker_plugin("rec-p")
    c.unregister_worker_plugin("nanny-tag", nanny=True)
    c.unregister_worker_plugin("environ", nanny=True)
    lc.scale(1)
    wait_until(lambda: len(c.scheduler_info()["workers"]) == 1, timeout=20,
               message="scaled down")


def test_upload_directory(plc, tmp_path):
    lc, c = plc
    pkg = tmp_path / "api2updir"
    (pkg / "api2dirpkg").mkdir(parents=True)
    (pkg / "api2dirpkg" / "__init__.py").write_text("VALUE = 'from the directory'\n")
    (pkg / "tests").mkdir()
    (pkg / "tests" / "skipped.py").write_text("")
    plugin = UploadDirectory(str(pkg), update_path=True, restart=True)
    names = zipfile.ZipFile(io.BytesIO(plugin.data)).namelist()
    assert "api2updir/api2dirpkg/__init__.py" in names
    assert not any("tests" in n for n in names)
    c.register_plugin(plugin)
    c.wait_for_workers(1)
    wait_until(lambda: c.run(lambda: 1, on_error="ignore"), message="worker back")
    got = c.submit(lambda: __import__("api2dirpkg").VALUE, pure=False).result()
    assert got == "from the directory"
    c.unregister_worker_plugin(plugin.name, nanny=True)
    with pytest.raises(ValueError, match="not a directory"):
        UploadDirectory(str(tmp_path / "missing"))


def _wheel(path, name="api2_pipdemo", version="0.1"):
    """A minimal pure-Python wheel (a zip with the dist-info pip reads)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 7\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"])
    whl = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return whl


def test_pip_install(plc, tmp_path):
    lc, c = plc
    whl = _wheel(tmp_path)
    target = tmp_path / "target"
    c.register_plugin(PipInstall([str(whl)], pip_options=["--no-index", "--no-deps",
                                                           "--target", str(target)]))
    assert (target / "api2_pipdemo.py").exists()
    with pytest.raises(RuntimeError, match="pip install"):
        c.register_plugin(PipInstall(["api2-no-such-package-xyz"], pip_options=["--no-index"]))
    with pytest.raises(TypeError):
        PipInstall("scipy")


def test_uploaded_file_survives_a_worker_restart(plc, tmp_path):
    lc, c = plc
    path = tmp_path / "api2_restart_mod.py"
    path.write_text("VALUE = 'after restart'\n")
    c.upload_file(str(path))
    before = _worker_pids(c)
    c.restart()
    assert _worker_pids(c).isdisjoint(before)
    # A new process: the file came with the plugins in its registration.
    assert c.submit(lambda: __import__("api2_restart_mod").VALUE, pure=False).result() \
        == "after restart"
    c.unregister_worker_plugin("upload-file-api2_restart_mod.py")
