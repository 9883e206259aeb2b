"""The stand-in kubelet's container runtime (standin/kubelet.py), with real processes.

Each test runs PodRunners on its own event loop (`asyncio.run`), records every status they
report, checks every reported status against the Kubernetes Pod schema (kubernetes-validate,
strict), and checks at the end that no process of the pod is left.
"""
import asyncio
import functools
import json
import os
import random
import re
import signal
import socket
import sys
import time

import kubernetes_validate
import psutil
import pytest

from .standin.kubelet import PodRunner, expand, go_duration

PY = sys.executable
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
NANO_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")
SLEEP = "import time; time.sleep(600)"


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 90))
    return wrapper


def fresh_ip() -> str:
    """A loopback address of its own for each pod (all of 127/8 reaches lo)."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def py(code: str, name: str = "main", **extra) -> dict:
    return {"name": name, "image": "python:3.11", "command": [PY, "-c", code], **extra}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left running: {left}")
        time.sleep(0.05)


class Pod:
    """A PodRunner, the statuses it reported (with when), and waiting helpers."""

    def __init__(self, tmp_path, name, containers, *, spec=None, metadata=None, **kw):
        self.manifest = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns1", "uid": f"uid-{name}",
                         **(metadata or {})},
            "spec": {"containers": containers, **(spec or {})}}
        self.name = name
        self.ip = kw.pop("pod_ip", None) or fresh_ip()
        kw.setdefault("backoff_base", 0.2)
        kw.setdefault("backoff_max", 0.8)
        self.history = []          # (time.monotonic(), status)
        self.runner = PodRunner(self.manifest, self.ip, log_dir=tmp_path / "pods",
                                on_status=lambda st: self.history.append((time.monotonic(), st)),
                                **kw)

    async def __aenter__(self):
        await self.runner.start()
        return self

    async def __aexit__(self, exc_type, *_):
        await self.runner.terminate(grace=2)
        if exc_type is None:
            self.check_clean()

    def check_clean(self):
        assert self.runner.finished and self.runner.pids() == []
        mine = {c.pid for c in psutil.Process().children()}
        leaked = mine & self.main_pids()
        assert not leaked, f"container processes not reaped: {leaked}"
        assert_gone(self.main_pids())
        for _, status in self.history:
            validate(self.manifest, status)

    @property
    def status(self):
        return self.runner.status

    def cs(self, name=None, status=None):
        statuses = (status or self.status)["containerStatuses"]
        return statuses[0] if name is None else next(c for c in statuses if c["name"] == name)

    def cond(self, type_, status=None):
        return next(c for c in (status or self.status)["conditions"] if c["type"] == type_)

    def main_pids(self):
        ids = {c.get("containerID", "") for _, st in self.history for c in st["containerStatuses"]}
        return {int(i.split("//")[1]) for i in ids if i.split("//")[-1].isdigit()}

    async def wait(self, pred, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            status = self.status
            try:
                if pred(status):
                    return status
            except (KeyError, StopIteration, IndexError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {status}")
            await asyncio.sleep(0.02)

    async def wait_log(self, text, container=None, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                out = self.runner.log(container)
            except LookupError:
                out = ""
            if text in out:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r} in the log: {out!r}")
            await asyncio.sleep(0.02)

    async def wait_line(self, prefix, container=None):
        """The first complete line of the log that starts with `prefix` (with PYTHONUNBUFFERED
        a print() may arrive in pieces)."""
        deadline = time.monotonic() + 20
        while True:
            try:
                out = self.runner.log(container)
            except LookupError:
                out = ""
            for line in out.splitlines(keepends=True):
                if line.startswith(prefix) and line.endswith("\n"):
                    return line.rstrip("\n")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for a line {prefix!r}...: {out!r}")
            await asyncio.sleep(0.02)

    def waiting_reasons(self, name=None):
        """Each waiting reason the container went through, consecutive repeats merged."""
        out, prev = [], None
        for _, st in self.history:
            w = self.cs(name, st)["state"].get("waiting")
            item = (w["reason"], w.get("message", "")) if w else None
            if item and item != prev:
                out.append(item)
            prev = item
        return out


def validate(manifest, status):
    obj = {**manifest, "status": status}
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        first_line = str(e).splitlines()[0]
        raise AssertionError(f"not a valid Pod status: {first_line}\n{status}") from None


# ---------------------------------------------------------------------------------------------
def test_expand_and_go_duration():
    env = {"A": "x", "B": "$(A)"}
    assert expand("$(A)-$(B)", env) == "x-$(A)"             # values are not re-expanded
    assert expand("$(NOPE) $$(A) $$ $x $( $(A", env) == "$(NOPE) $(A) $ $x $( $(A"
    assert expand("a$", env) == "a$" and expand("$()", env) == "$()"
    assert [go_duration(s) for s in (0.2, 0.8, 1.6, 10, 80, 300, 3600)] == [
        "200ms", "800ms", "1.6s", "10s", "1m20s", "5m0s", "1h0m0s"]


def test_unsupported_specs_are_refused(tmp_path):
    def make(containers, **spec):
        pod = {"metadata": {"name": "p"}, "spec": {"containers": containers, **spec}}
        return PodRunner(pod, "127.0.0.2", log_dir=tmp_path, on_status=print)

    with pytest.raises(NotImplementedError, match="initContainers"):
        make([py("pass")], initContainers=[py("pass", "init")])
    with pytest.raises(NotImplementedError, match="envFrom"):
        make([py("pass", envFrom=[{"configMapRef": {"name": "c"}}])])
    with pytest.raises(NotImplementedError, match="readinessProbe"):
        make([py("pass", readinessProbe={"exec": {"command": ["true"]}})])
    with pytest.raises(NotImplementedError, match="livenessProbe"):
        make([py("pass", livenessProbe={"tcpSocket": {"port": 1}})])
    with pytest.raises(ValueError, match="restartPolicy"):
        make([py("pass")], restartPolicy="Sometimes")
    with pytest.raises(ValueError, match="unique"):
        make([py("pass"), py("pass")])
    with pytest.raises(NotImplementedError, match="volumes other than secret"):
        make([py("pass")], volumes=[{"name": "v", "emptyDir": {}}])
    with pytest.raises(ValueError, match="names volume 'nope'"):
        make([py("pass", volumeMounts=[{"name": "nope", "mountPath": "/x"}])])
    with pytest.raises(NotImplementedError, match="subPath"):
        make([py("pass", volumeMounts=[{"name": "v", "mountPath": "/x", "subPath": "a"}])],
             volumes=[{"name": "v", "secret": {"secretName": "s"}}])
    runner = make([py("pass")])            # fine, and reports nothing before start()
    assert runner.status["phase"] == "Pending" and not runner.finished


ENV_DUMP = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ),"
            " 'cwd': os.getcwd()}), flush=True); print('to stderr', file=sys.stderr, flush=True);"
            " import time; time.sleep(600)")


@async_test
async def test_running_pod_env_logs_and_graceful_delete(tmp_path):
    env = [
        {"name": "GREETING", "value": "hello"},
        {"name": "COMBINED", "value": "$(GREETING)-world-$(SVC_HOST)"},
        {"name": "EARLY", "value": "$(LATER)"},               # defined below: stays literal
        {"name": "LATER", "value": "later"},
        {"name": "SHADOWED", "value": "container"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "NOLABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]
    container = py(ENV_DUMP, env=env, args=["$(GREETING)", "$$(GREETING)", "$(NOPE)",
                                            "$(SVC_HOST)", "$(PATH)", "x$(LATER)", "$(POD_IP)",
                                            "0.0.0.0", "0.0.0.0:8787", "--bind=0.0.0.0",
                                            "10.0.0.0", "0.0.0.01"])
    pod = Pod(tmp_path, "envpod", [container], spec={"serviceAccountName": "runner-sa"},
              metadata={"labels": {"app": "demo"}, "annotations": {"note": "n1"}},
              node_name="node-7", host_ip="127.0.0.1",
              base_env={"PATH": os.environ["PATH"], "ONLY_BASE": "b", "SHADOWED": "base"},
              extra_env={"SVC_HOST": "10.0.0.1", "SHADOWED": "extra"})
    async with pod:
        st = await pod.wait(lambda s: s["phase"] == "Running"
                            and pod.cond("Ready", s)["status"] == "True", "Running and Ready")
        out = await pod.wait_log("to stderr\n")
        dump = json.loads(out.splitlines()[0])
        # (a wildcard bind is narrowed to the pod's IP: the stand-in has no network namespace)
        assert dump["argv"] == ["hello", "$(GREETING)", "$(NOPE)", "10.0.0.1", "$(PATH)",
                                "xlater", pod.ip, pod.ip, f"{pod.ip}:8787", f"--bind={pod.ip}",
                                "10.0.0.0", "0.0.0.01"]
        e = dump["env"]
        names = ("GREETING", "COMBINED", "EARLY", "LATER", "POD_NAME", "POD_NS", "POD_UID", "APP",
                 "NOTE", "NOLABEL", "NODE", "SA", "POD_IP", "HOST_IP", "HOSTNAME", "ONLY_BASE",
                 "SVC_HOST", "SHADOWED")
        assert {k: e.get(k) for k in names} == {
            "GREETING": "hello", "COMBINED": "hello-world-10.0.0.1", "EARLY": "$(LATER)",
            "LATER": "later", "POD_NAME": "envpod", "POD_NS": "ns1", "POD_UID": "uid-envpod",
            "APP": "demo", "NOTE": "n1", "NOLABEL": "", "NODE": "node-7", "SA": "runner-sa",
            "POD_IP": pod.ip, "HOST_IP": "127.0.0.1", "HOSTNAME": "envpod", "ONLY_BASE": "b",
            "SVC_HOST": "10.0.0.1", "SHADOWED": "container"}
        assert dump["cwd"] == str(pod.runner.pod_dir / "_workdir")
        assert pod.runner.pod_dir == tmp_path / "pods" / "ns1_envpod_uid-envpod"

        # The status, field by field.
        pid, = pod.runner.pids()
        assert st["podIP"] == pod.ip and st["podIPs"] == [{"ip": pod.ip}]
        assert st["hostIP"] == "127.0.0.1" and st["hostIPs"] == [{"ip": "127.0.0.1"}]
        assert TIME.match(st["startTime"]) and st["qosClass"] == "BestEffort"
        assert [(c["type"], c["status"]) for c in st["conditions"]] == [
            ("PodReadyToStartContainers", "True"), ("Initialized", "True"), ("Ready", "True"),
            ("ContainersReady", "True"), ("PodScheduled", "True")]
        assert all(TIME.match(c["lastTransitionTime"]) for c in st["conditions"])
        cs = pod.cs(status=st)
        assert cs["containerID"] == f"standin://{pid}" and cs["ready"] and cs["started"]
        assert cs["name"] == "main" and cs["image"] == "python:3.11" and cs["restartCount"] == 0
        assert cs["imageID"].startswith("python@sha256:")
        assert TIME.match(cs["state"]["running"]["startedAt"]) and cs["lastState"] == {}
        first = pod.history[0][1]
        assert first["phase"] == "Pending"
        assert pod.cs(status=first)["state"] == {"waiting": {"reason": "ContainerCreating"}}
        assert pod.cond("Ready", first)["reason"] == "ContainersNotReady"
        assert pod.cond("Ready", first)["message"] == "containers with unready status: [main]"

        # Logs: stdout and stderr in order; timestamps; tail.
        assert out.endswith("to stderr\n") and len(out.splitlines()) == 2
        stamped = pod.runner.log(timestamps=True).splitlines()
        assert len(stamped) == 2 and all(NANO_PREFIX.match(line) for line in stamped)
        assert stamped[1].endswith(" to stderr")
        assert pod.runner.log(tail_lines=1) == "to stderr\n"
        assert pod.runner.log(tail_lines=0) == ""
        assert (pod.runner.pod_dir / "main" / "0.log").read_text() == out

        # Graceful delete: python's default SIGTERM action ends it at once.
        t0 = time.monotonic()
        await pod.runner.terminate(grace=10)
        assert time.monotonic() - t0 < 5
        st = pod.status
        term = pod.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"], term["signal"]) == (143, "Error", 15)
        assert term["containerID"] == f"standin://{pid}" and TIME.match(term["finishedAt"])
        assert st["phase"] == "Failed" and pod.runner.finished and pod.runner.pids() == []
        assert pod.cond("Ready", st)["reason"] == "PodCompleted"
        assert pod.cond("PodReadyToStartContainers", st)["status"] == "False"
        await pod.runner.terminate()           # idempotent
        assert pod.status == st


SECRET_DUMP = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': "
               "{k: v for k, v in os.environ.items() if k.startswith('S_')}, 'key': "
               "open(sys.argv[1].split('=', 1)[1]).read()}), flush=True); "
               "import time; time.sleep(600)")


@async_test
async def test_secret_volumes_and_secret_variables(tmp_path):
    """A secret volume: the Secret's keys (items) as files in the kubelet's layout, with
    their modes, at a directory that stands in for mountPath in the container's arguments
    and variables; secretKeyRef variables. A missing Secret keeps the container in
    ContainerCreating until it appears."""
    import base64
    import stat

    def b64(text):
        return base64.b64encode(text.encode()).decode()

    secrets = {}
    volumes = [{"name": "creds", "secret": {
        "secretName": "creds", "defaultMode": 0o400,
        "items": [{"key": "tls.key", "path": "tls.key"},
                  {"key": "ca.crt", "path": "sub/ca.crt", "mode": 0o444}]}}]
    env = [{"name": "S_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
           {"name": "S_OPTIONAL", "valueFrom": {"secretKeyRef": {
               "name": "other", "key": "x", "optional": True}}},
           {"name": "S_DIR", "value": "/etc/creds"}]
    container = py(SECRET_DUMP, env=env, args=["--key=/etc/creds/tls.key", "/etc/credsx/no",
                                               "/etc/creds/sub/ca.crt"],
                   volumeMounts=[{"name": "creds", "mountPath": "/etc/creds/", "readOnly": True}])
    pod = Pod(tmp_path, "secretpod", [container], spec={"volumes": volumes},
              secrets=lambda ns, name: secrets.get((ns, name)))
    async with pod:
        st = await pod.wait(lambda s: pod.cs(status=s)["state"].get("waiting", {}).get(
            "message", "").startswith("MountVolume"), "a volume that cannot be set up")
        assert pod.cs(status=st)["state"]["waiting"] == {
            "reason": "ContainerCreating",
            "message": 'MountVolume.SetUp failed for volume "creds" : secret "creds" not found'}
        assert st["phase"] == "Pending" and pod.runner.pids() == []
        secrets[("ns1", "creds")] = {"data": {"tls.key": b64("KEY"), "ca.crt": b64("CA"),
                                              "token": b64("tok\n")}}
        await pod.wait(lambda s: s["phase"] == "Running", "Running once the Secret exists")
        line = await pod.wait_line("{")
        dump = json.loads(line)
        root = pod.runner.pod_dir / "volumes" / "kubernetes.io~secret" / "creds"
        assert dump["argv"] == [f"--key={root}/tls.key", "/etc/credsx/no", f"{root}/sub/ca.crt"]
        assert dump["key"] == "KEY"
        assert dump["env"] == {"S_TOKEN": "tok\n", "S_DIR": str(root)}   # optional: unset
        assert stat.S_IMODE(os.stat(root / "tls.key").st_mode) == 0o400
        assert stat.S_IMODE(os.stat(root / "sub" / "ca.crt").st_mode) == 0o444
        assert (root / "tls.key").is_symlink() and os.readlink(root / "tls.key") == \
            "..data/tls.key"
        assert os.readlink(root / "..data").startswith("..20")
        assert sorted(os.listdir(root / "..data")) == ["sub", "tls.key"]     # no token file

    # A missing key, and a variable from a Secret without that key.
    secrets[("ns1", "creds")] = {"data": {"tls.key": b64("KEY")}}
    nokey = Pod(tmp_path, "nokey", [dict(container, name="main")], spec={"volumes": volumes},
                secrets=lambda ns, name: secrets.get((ns, name)))
    novar = Pod(tmp_path, "novar", [py(SLEEP, env=env[:1])],
                secrets=lambda ns, name: secrets.get((ns, name)))
    async with nokey, novar:
        st = await nokey.wait(lambda s: "message" in nokey.cs(status=s)["state"].get(
            "waiting", {}), "a missing key")
        assert nokey.cs(status=st)["state"]["waiting"]["message"] == (
            'MountVolume.SetUp failed for volume "creds" : references non-existent secret key: '
            'ca.crt')
        st = await novar.wait(lambda s: novar.cs(status=s)["state"].get("waiting", {}).get(
            "reason") == "CreateContainerConfigError", "CreateContainerConfigError")
        assert novar.cs(status=st)["state"]["waiting"]["message"] == (
            "couldn't find key token in Secret ns1/creds")


@async_test
async def test_crash_loop_back_off(tmp_path):
    code = "import os, sys; print('run', os.getpid(), flush=True); sys.exit(3)"
    async with Pod(tmp_path, "crasher", [py(code)]) as pod:
        st = await pod.wait(lambda s: pod.cs(status=s)["restartCount"] >= 4, "4 restarts")
        assert st["phase"] == "Running"
        messages = [m for reason, m in pod.waiting_reasons() if reason == "CrashLoopBackOff"]
        ref = "restarting failed container=main pod=crasher_ns1(uid-crasher)"
        assert messages[:4] == [f"back-off {d} {ref}" for d in ("200ms", "400ms", "800ms", "800ms")]

        # Every exit is reported (state terminated), then the back-off (restartCount + 1),
        # and the next run starts no earlier than the delay.
        runs, exits, backoffs = [], [], []
        for t, s in pod.history:
            c = pod.cs(status=s)
            if "running" in c["state"] and (not runs or runs[-1][1] != c["containerID"]):
                runs.append((t, c["containerID"]))
            if "terminated" in c["state"] and (not exits or exits[-1][1] != c["containerID"]):
                exits.append((t, c["containerID"], c["restartCount"]))
            if "waiting" in c["state"] and c["restartCount"] and (
                    not backoffs or backoffs[-1][1] != c["restartCount"]):
                backoffs.append((t, c["restartCount"], c["lastState"]["terminated"]))
        assert [r for _, _, r in exits[:4]] == [0, 1, 2, 3]
        assert [n for _, n, _ in backoffs[:4]] == [1, 2, 3, 4]
        for (_, cid, _), (_, _, last) in zip(exits, backoffs):
            assert (last["exitCode"], last["reason"], last["containerID"]) == (3, "Error", cid)
            assert "signal" not in last and TIME.match(last["startedAt"])
        for (t_back, _, _), (t_run, _), delay in zip(backoffs, runs[1:], (0.2, 0.4, 0.8)):
            assert t_run - t_back >= delay - 0.02

        # During the back-off: not ready, and the logs are those of the last run (previous too).
        st = await pod.wait(lambda s: "waiting" in pod.cs(status=s)["state"], "a back-off")
        cs = pod.cs(status=st)
        assert cs["ready"] is False and cs["started"] is False
        assert pod.cond("Ready", st)["status"] == "False"
        last_pid = cs["lastState"]["terminated"]["containerID"].split("//")[1]
        assert pod.runner.log() == pod.runner.log(previous=True) == f"run {last_pid}\n"
        logs = {p.name for p in (pod.runner.pod_dir / "main").iterdir()}
        assert {"0.log", "1.log", "2.log", "3.log"} <= logs

        await pod.runner.terminate()
        st = pod.status
        cs = pod.cs(status=st)
        assert st["phase"] == "Failed"
        assert cs["state"]["terminated"]["reason"] in ("ContainerStatusUnknown", "Error")
        assert cs["lastState"]["terminated"]["exitCode"] == 3


@async_test
async def test_back_off_resets_after_a_long_run(tmp_path):
    # Runs 1-3 crash at once, run 4 lasts 1.7 s (> 10 x base 0.15 s), then crash at once again.
    code = ("import os, sys, time; n = len(os.listdir('.')) + 1; open(f'run{n}', 'w').close();"
            " time.sleep(1.7 if n == 4 else 0); sys.exit(1)")
    async with Pod(tmp_path, "resetter", [py(code)], backoff_base=0.15, backoff_max=5) as pod:
        await pod.wait(lambda s: pod.cs(status=s)["restartCount"] >= 5, "5 restarts")
        delays = [m.split()[1] for r, m in pod.waiting_reasons() if r == "CrashLoopBackOff"]
        assert delays[:5] == ["150ms", "300ms", "600ms", "150ms", "300ms"]


@async_test
async def test_restart_policies_never_and_onfailure(tmp_path):
    flaky = ("import os, sys; first = not os.path.exists('ran'); open('ran', 'w').close();"
             " print('first' if first else 'second', flush=True); sys.exit(1 if first else 0)")
    ok = Pod(tmp_path, "never-ok", [py("print('done')")], spec={"restartPolicy": "Never"})
    bad = Pod(tmp_path, "never-bad", [py("import sys; sys.exit(5)")],
              spec={"restartPolicy": "Never"})
    onf = Pod(tmp_path, "onfailure", [py(flaky)], spec={"restartPolicy": "OnFailure"})
    two = Pod(tmp_path, "never-two", [py("import sys; sys.exit(1)", "a"), py(SLEEP, "b")],
              spec={"restartPolicy": "Never"})
    async with ok, bad, onf, two:
        st = await ok.wait(lambda s: s["phase"] == "Succeeded", "Succeeded")
        term = ok.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (0, "Completed")
        assert ok.cond("Ready", st)["reason"] == "PodCompleted"
        assert ok.cond("PodReadyToStartContainers", st)["status"] == "False"
        assert ok.runner.log() == "done\n"
        with pytest.raises(LookupError, match='previous terminated container "main" in '
                                              'pod "never-ok" not found'):
            ok.runner.log(previous=True)

        st = await bad.wait(lambda s: s["phase"] == "Failed", "Failed")
        term = bad.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (5, "Error")
        assert bad.cs(status=st)["restartCount"] == 0

        st = await onf.wait(lambda s: s["phase"] == "Succeeded", "OnFailure: Succeeded")
        cs = onf.cs(status=st)
        assert cs["restartCount"] == 1 and cs["state"]["terminated"]["exitCode"] == 0
        assert cs["lastState"]["terminated"]["exitCode"] == 1
        assert onf.runner.log() == "second\n" and onf.runner.log(previous=True) == "first\n"
        assert [s["phase"] for _, s in onf.history if s["phase"] != "Pending"][0] == "Running"

        # Never, two containers: Running while one runs, Failed once both have ended.
        st = await two.wait(lambda s: "terminated" in two.cs("a", s)["state"]
                            and "running" in two.cs("b", s)["state"], "a ended, b running")
        assert st["phase"] == "Running"
        assert two.cond("Ready", st)["message"] == "containers with unready status: [a]"
        assert ok.runner.finished and bad.runner.finished and onf.runner.finished
        assert not two.runner.finished
        two.runner.kill_container("b", signal.SIGTERM)
        st = await two.wait(lambda s: s["phase"] == "Failed", "Failed")
        assert two.cs("b", st)["state"]["terminated"]["exitCode"] == 143
        assert two.cs("b", st)["restartCount"] == 0 and two.runner.finished


@async_test
async def test_image_pull_back_off(tmp_path):
    pullable = set()
    image = "registry.example/team/nope:1"
    pod = Pod(tmp_path, "puller", [py(SLEEP, image=image)], image_pullable=pullable.__contains__,
              pull_seconds=0.3)
    async with pod:
        st = await pod.wait(lambda s: [r for r, _ in pod.waiting_reasons()].count("ErrImagePull")
                            >= 2, "two failed pulls")
        assert st["phase"] == "Pending" and pod.cs(status=st)["imageID"] == ""
        reasons = pod.waiting_reasons()
        assert [r for r, _ in reasons[:4]] == ["ContainerCreating", "ErrImagePull",
                                               "ImagePullBackOff", "ContainerCreating"]
        assert reasons[2][1] == f'Back-off pulling image "{image}"'
        assert image in reasons[1][1]
        # The "pull" takes pull_seconds before failing.
        t_created = pod.history[0][0]
        t_failed = next(t for t, s in pod.history
                        if "ErrImagePull" in str(pod.cs(status=s)["state"]))
        assert t_failed - t_created >= 0.28
        with pytest.raises(LookupError, match="waiting to start: (trying and failing to pull image|"
                                              "image can't be pulled|ContainerCreating)"):
            pod.runner.log()
        assert pod.runner.pids() == []

        pullable.add(image)
        st = await pod.wait(lambda s: s["phase"] == "Running", "Running once pullable")
        cs = pod.cs(status=st)
        assert cs["imageID"].startswith("registry.example/team/nope@sha256:")
        assert cs["restartCount"] == 0 and cs["ready"]


@async_test
async def test_container_create_and_start_errors(tmp_path):
    nocmd = Pod(tmp_path, "nocmd", [{"name": "main", "image": "busybox", "args": ["x"]}],
                spec={"restartPolicy": "Never"})
    secret = Pod(tmp_path, "secret", [py(SLEEP, env=[{"name": "PW", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "pw"}}}])])
    nodir = Pod(tmp_path, "nodir", [py(SLEEP, workingDir=str(tmp_path / "missing"))])
    noexe = Pod(tmp_path, "noexe", [{"name": "main", "image": "busybox",
                                     "command": ["no-such-binary-xyz", "--help"]}],
                spec={"restartPolicy": "Never"})
    async with nocmd, secret, nodir, noexe:
        st = await nocmd.wait(lambda s: nocmd.cs(status=s)["state"]["waiting"]["reason"]
                              == "CreateContainerError", "CreateContainerError")
        assert "explicit command" in nocmd.cs(status=st)["state"]["waiting"]["message"]
        st = await secret.wait(lambda s: secret.cs(status=s)["state"]["waiting"]["reason"]
                               == "CreateContainerConfigError", "CreateContainerConfigError")
        assert secret.cs(status=st)["state"]["waiting"]["message"] == 'secret "s" not found'
        st = await nodir.wait(lambda s: nodir.cs(status=s)["state"]["waiting"]["reason"]
                              == "CreateContainerError", "CreateContainerError (workingDir)")
        assert "missing" in nodir.cs(status=st)["state"]["waiting"]["message"]

        # Never created: retried (with back-off) whatever the policy; the pod stays Pending.
        await asyncio.sleep(1.0)
        for pod in (nocmd, secret, nodir):
            st = pod.status
            assert st["phase"] == "Pending", pod.name
            assert pod.cs(status=st)["restartCount"] == 0 and pod.runner.pids() == []
        with pytest.raises(LookupError, match="is waiting to start: CreateContainerError"):
            nocmd.runner.log()

        # Created but not startable: StartError, exit code 128, and Never makes it Failed.
        st = await noexe.wait(lambda s: s["phase"] == "Failed", "StartError -> Failed")
        term = noexe.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (128, "StartError")
        assert 'exec: "no-such-binary-xyz": executable file not found in $PATH' in term["message"]
        assert term["startedAt"] == "1970-01-01T00:00:00Z"
        assert noexe.runner.log() == ""

        await nocmd.runner.terminate()
        st = nocmd.status
        assert st["phase"] == "Failed"
        assert nocmd.cs(status=st)["state"]["terminated"]["reason"] == "ContainerStatusUnknown"


LISTENER = """
import os, socket, time
time.sleep(0.8)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ['POD_IP'], int(os.environ['PORT'])))
s.listen(16)
s.settimeout(0.05)
print('listening', flush=True)
while not os.path.exists('close'):
    try:
        s.accept()[0].close()
    except socket.timeout:
        pass
s.close()
print('closed', flush=True)
time.sleep(600)
"""


@async_test
async def test_readiness_probes(tmp_path):
    ip = fresh_ip()
    tcp_port, http_port = free_port(ip), free_port(ip)
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    listener = py(LISTENER, "tcp", env=[pod_ip, {"name": "PORT", "value": str(tcp_port)}],
                  ports=[{"name": "probe-port", "containerPort": tcp_port}],
                  readinessProbe={"tcpSocket": {"port": "probe-port"}, "periodSeconds": 10,
                                  "failureThreshold": 2})
    web = {"name": "web", "image": "python:3.11", "env": [pod_ip],
           "command": [PY, "-m", "http.server", "--bind", "$(POD_IP)", str(http_port)],
           "readinessProbe": {"httpGet": {"path": "/", "port": http_port},
                              "initialDelaySeconds": 30, "periodSeconds": 1}}
    async with Pod(tmp_path, "probed", [listener, web], pod_ip=ip) as pod:
        st = await pod.wait(lambda s: s["phase"] == "Running"
                            and all("running" in c["state"] for c in s["containerStatuses"]),
                            "both running")
        assert pod.cs("tcp", st)["ready"] is False and pod.cs("tcp", st)["started"] is True
        assert pod.cond("Ready", st)["status"] == "False"

        st = await pod.wait(lambda s: pod.cond("Ready", s)["status"] == "True", "Ready")
        # Not before the listener listens, 0.8 s after its start.
        t_running = next(t for t, s in pod.history if "running" in pod.cs("tcp", s)["state"])
        t_ready = next(t for t, s in pod.history if pod.cs("tcp", s)["ready"])
        assert t_ready - t_running >= 0.75
        await pod.wait_log("listening", "tcp")
        assert pod.cs("tcp", st)["ready"] and pod.cs("web", st)["ready"]
        assert pod.cond("ContainersReady", st)["status"] == "True"

        # The listener closes its socket: unready after failureThreshold failures.
        (pod.runner.pod_dir / "_workdir" / "close").touch()
        st = await pod.wait(lambda s: pod.cond("Ready", s)["status"] == "False", "unready")
        assert pod.cs("tcp", st)["ready"] is False and pod.cs("web", st)["ready"] is True
        assert pod.cond("Ready", st)["message"] == "containers with unready status: [tcp]"
        await pod.wait_log("closed", "tcp")
        await pod.wait_log("GET / HTTP", "web")     # http.server logs the probes
        assert st["phase"] == "Running"


TRAP = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
def on_term(*_):
    open('got-term', 'w').close()
    print('got SIGTERM', flush=True)
    if os.environ['MODE'] == 'exit':
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print('child', child.pid, flush=True)
while True:
    time.sleep(0.05)
"""


@async_test
async def test_terminate_sigterm_then_sigkill(tmp_path):
    polite = Pod(tmp_path, "polite", [py(TRAP, env=[{"name": "MODE", "value": "exit"}])])
    stubborn = Pod(tmp_path, "stubborn", [py(TRAP, env=[{"name": "MODE", "value": "stay"}])],
                   spec={"terminationGracePeriodSeconds": 1})
    async with polite, stubborn:
        children = []
        for pod in (polite, stubborn):
            children.append(int((await pod.wait_line("child ")).split()[1]))
            assert alive(children[-1])

        t0 = time.monotonic()
        await polite.runner.terminate(grace=10)
        assert time.monotonic() - t0 < 5
        assert (polite.runner.pod_dir / "_workdir" / "got-term").exists()
        st = polite.status
        term = polite.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (0, "Completed") and "signal" not in term
        assert st["phase"] == "Succeeded"             # every container exited 0 on SIGTERM
        assert "got SIGTERM" in polite.runner.log()

        # Ignores SIGTERM: killed (with its whole group) after the pod's grace period, 1 s.
        # Two concurrent deletes and a late one all return once it is gone.
        t0 = time.monotonic()
        await asyncio.gather(stubborn.runner.terminate(), stubborn.runner.terminate())
        took = time.monotonic() - t0
        assert 0.9 <= took < 6, took
        await stubborn.runner.terminate()
        assert (stubborn.runner.pod_dir / "_workdir" / "got-term").exists()
        st = stubborn.status
        term = stubborn.cs(status=st)["state"]["terminated"]
        assert (term["exitCode"], term["reason"], term["signal"]) == (137, "Error", 9)
        assert st["phase"] == "Failed" and stubborn.runner.finished
        assert_gone(children)


@async_test
async def test_terminate_at_any_moment(tmp_path):
    # Deleted while its processes are being created, pulled, or just started: no process may
    # survive, nothing restarts, and the final status is terminal.
    before = {c.pid for c in psutil.Process().children()}   # the session's own daemons
    pods = [Pod(tmp_path, f"racer{i}", [py(SLEEP, "a"), py(SLEEP, "b")],
                pull_seconds=0.2 if i == 5 else 0) for i in range(6)]
    for i, pod in enumerate(pods):
        await pod.runner.start()
        for _ in range(i):
            await asyncio.sleep(0.005 * i)
        await pod.runner.terminate(grace=1)
        st = pod.status
        assert st["phase"] == "Failed" and pod.runner.finished and pod.runner.pids() == []
        assert all("terminated" in c["state"] for c in st["containerStatuses"])
        pod.check_clean()
    await asyncio.sleep(0.3)
    assert all(pod.runner.pids() == [] for pod in pods)
    assert [c for c in psutil.Process().children() if c.pid not in before] == []


@async_test
async def test_evict(tmp_path):
    stay = [{"name": "MODE", "value": "stay"}]
    async with Pod(tmp_path, "evictee", [py(SLEEP, "a"), py(TRAP, "b", env=stay)]) as pod:
        child = int((await pod.wait_line("child ", "b")).split()[1])
        await pod.wait(lambda s: pod.cond("Ready", s)["status"] == "True", "Ready")
        t0 = time.monotonic()
        await pod.runner.evict()
        assert time.monotonic() - t0 < 3                 # no grace period
        st = pod.status
        assert (st["phase"], st["reason"], st["message"]) == (
            "Failed", "Evicted", "The node was low on resource: memory.")
        disruption = pod.cond("DisruptionTarget", st)
        assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")
        for name in ("a", "b"):
            term = pod.cs(name, st)["state"]["terminated"]
            assert (term["exitCode"], term["reason"], term["signal"]) == (137, "Error", 9)
        assert not (pod.runner.pod_dir / "_workdir" / "got-term").exists()   # SIGKILL only
        assert pod.runner.finished and pod.runner.pids() == []
        await asyncio.sleep(0.5)                        # and nothing restarts
        assert pod.status == st and pod.runner.pids() == []
        assert_gone([child])


@async_test
async def test_kill_container_restarts_with_previous_logs(tmp_path):
    code = "import os, time; print('instance', os.getpid(), flush=True); time.sleep(600)"
    async with Pod(tmp_path, "killed", [py(code)]) as pod:
        await pod.wait_line("instance")
        first, = pod.runner.pids()
        with pytest.raises(LookupError, match='previous terminated container "main" in '
                                              'pod "killed" not found'):
            pod.runner.log(previous=True)
        with pytest.raises(LookupError, match="container nope is not valid for pod killed"):
            pod.runner.log("nope")

        pod.runner.kill_container()
        st = await pod.wait(lambda s: "running" in pod.cs(status=s)["state"]
                            and pod.cs(status=s)["restartCount"] == 1, "restarted")
        cs = pod.cs(status=st)
        last = cs["lastState"]["terminated"]
        assert (last["exitCode"], last["reason"], last["signal"]) == (137, "Error", 9)
        assert last["containerID"] == f"standin://{first}"
        assert cs["containerID"] != last["containerID"]
        second, = pod.runner.pids()
        assert second != first and not alive(first)
        await pod.wait_line(f"instance {second}")
        assert pod.runner.log(previous=True) == f"instance {first}\n"
        assert pod.runner.log() == f"instance {second}\n"
        assert st["phase"] == "Running"


def test_under_uvloop(tmp_path):
    uvloop = pytest.importorskip("uvloop")

    async def scenario():
        code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"
        pod = Pod(tmp_path, "uv", [py(code, readinessProbe={"tcpSocket": {"port": 9}})])
        async with pod:
            await pod.wait(lambda s: s["phase"] == "Running", "Running")
            await pod.wait_line("pid ")
            first, = pod.runner.pids()
            pod.runner.kill_container(sig=signal.SIGTERM)
            st = await pod.wait(lambda s: "running" in pod.cs(status=s)["state"]
                                and pod.cs(status=s)["restartCount"] == 1, "restarted")
            assert pod.cs(status=st)["lastState"]["terminated"]["exitCode"] == 143
            assert pod.cs(status=st)["ready"] is False            # nothing listens on port 9
            await pod.wait_line("pid ")
            assert pod.runner.log() != pod.runner.log(previous=True)
            assert pod.runner.log(previous=True) == f"pid {first}\n"
            await pod.runner.terminate()
            assert pod.status["phase"] == "Failed"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))
