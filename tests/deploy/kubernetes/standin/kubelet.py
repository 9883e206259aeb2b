"""A STAND-IN for the kubelet and its container runtime: one pod's containers as local processes.

No real Kubernetes can run on the test machines, so taskcore's Kubernetes support is tested
against a local stand-in of Kubernetes (this folder). This module is the stand-in's kubelet +
container runtime for ONE pod: `PodRunner` runs the pod's containers as ordinary processes of
this machine and reports the pod's `status` in the shape a real kubelet (Kubernetes 1.30+)
writes it: phase, conditions, container states, restart back-off, readiness probes, graceful
deletion, eviction. The stand-in's kubelet loop makes one PodRunner per pod bound to its node
and writes what `on_status` receives into the store.

What is NOT like a real container:
- There are no images: `image` is only reported, `image_pullable(image)` decides whether the
  "pull" succeeds, and an image's ENTRYPOINT is empty, so every container needs `command`.
- No namespaces or cgroups: processes share this machine's filesystem, user and network
  namespace. Each pod gets its own loopback IP (`pod_ip`, e.g. 127.0.1.7: all of 127.0.0.0/8
  reaches lo on Linux), which its processes must bind to; taskcore's do, via POD_IP or a
  wildcard: `0.0.0.0` in the container's arguments (a whole argument, or the host of
  HOST:PORT) is rewritten to the pod's IP, which stands for both the pod's own address and
  its localhost (where a real port-forward dials). So a process bound to the pod's IP only,
  which a real port-forward cannot reach, is not caught here. Resources and
  securityContext are ignored (qosClass is still computed from the resources).
- Volumes: only `secret` volumes (any other kind, subPath and mountPropagation are refused
  with NotImplementedError). The Secret's keys are written as the real kubelet writes them
  (`items` with their paths and modes, else every key; `defaultMode`, default 0644; the
  AtomicWriter layout: a timestamped directory, `..data` linking to it, each entry linking
  into `..data`) under `pod_dir/volumes/kubernetes.io~secret/<volume>/`, before the
  container starts; a missing Secret or key keeps the container waiting in
  ContainerCreating (retried with back-off), unless `optional`. With no mount namespace,
  the files cannot appear at `mountPath`: instead, a path under a `mountPath` in the
  container's command, args and env values (a whole word, or after `=`, `:` or `,`) is
  rewritten to that directory; a program that builds such a path by itself will not find
  it. Files keep their modes, but a write is not refused as on a read-only mount.
- A container's processes are one process group, standing in for its PID namespace: when the
  main process exits, the rest of the group is SIGKILLed, as when a container's PID 1 exits.
  A process that leaves the group (setsid) escapes, which no real container allows.
- The main process is not PID 1. A real PID 1 ignores SIGTERM unless it installs a handler
  (so `python app.py` without one takes the whole grace period to die in real Kubernetes);
  here the default action (exit) applies.
- Timings are scaled for tests: back-off starts at `backoff_base` (real: 10 s) and stops at
  `backoff_max` (real: 300 s); probe periods and initial delays are capped at 0.5 s.
- argv[0] is the command as found on the container's PATH (an absolute path), and only
  tcpSocket/httpGet readiness probes exist; init containers, envFrom, exec probes and
  liveness/startup probes are refused with NotImplementedError at construction.
- `valueFrom`: fieldRef and secretKeyRef (the Secret read through `secrets(namespace,
  name)`, given by the stand-in's kubelet loop: a missing Secret or key is
  CreateContainerConfigError, with the kubelet's message, unless `optional`); no config
  maps or resource fields.

Kubernetes behaviour kept on purpose, though it surprises: a container that cannot be
created (CreateContainerError, CreateContainerConfigError, ImagePullBackOff) is retried with
back-off whatever the restartPolicy and its pod stays Pending; a deleted pod ends Failed
unless every container exited 0, and a container that was not running then is reported
terminated with reason ContainerStatusUnknown (exit code 137).

Usage::

    runner = PodRunner(pod, "127.0.1.7", log_dir=tmp / "pods", on_status=store.set_status)
    await runner.start()            # returns at once; containers start in background tasks
    runner.log("worker", tail_lines=20)
    await runner.terminate()        # graceful delete: SIGTERM, grace period, SIGKILL
"""
from __future__ import annotations

import asyncio
import base64
import collections
import copy
import hashlib
import logging
import os
import pathlib
import re
import shutil
import signal
import time
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = ["PodRunner", "expand", "go_duration"]

# Real probes default to periodSeconds=10 and often wait initialDelaySeconds; the stand-in caps
# both at this many seconds so that tests waiting for Ready stay fast.
PROBE_TIME_CAP = 0.5

# What a kubelet with the TerminatePod rule reports for a container that never reached
# `terminated` when its pod ends (never started, or waiting out a back-off).
_STATUS_UNKNOWN = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                   "message": "The container could not be located when the pod was terminated"}


# -- formats ----------------------------------------------------------------------------------
def rfc3339(t: float | None = None) -> str:
    """API timestamps (metav1.Time): RFC 3339, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def rfc3339_nano(ns: int | None = None) -> str:
    """`kubectl logs --timestamps` prefixes: RFC 3339 with nanoseconds, fixed width."""
    secs, frac = divmod(time.time_ns() if ns is None else ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration.String() prints it (the kubelet's back-off messages):
    200ms, 1.6s, 10s, 1m20s, 5m0s."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    if ns < 10**9:
        for unit, size in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if ns >= size:
                return f"{ns / size:.6f}".rstrip("0").rstrip(".") + unit
    h, ns = divmod(ns, 3600 * 10**9)
    m, ns = divmod(ns, 60 * 10**9)
    out = f"{h}h" if h else ""
    if h or m:
        out += f"{m}m"
    return out + f"{ns / 1e9:.9f}".rstrip("0").rstrip(".") + "s"


def expand(text: str, mapping) -> str:
    """Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion), for command, args
    and env values: `$(VAR)` becomes VAR's value when `mapping` has VAR and stays as written
    otherwise; `$$` is an escaped `$` (so `$$(VAR)` gives a literal `$(VAR)`); any other `$` is
    kept."""
    out, checkpoint, i, n = [], 0, 0, len(text)
    while i < n:
        if text[i] == "$" and i + 1 < n:
            out.append(text[checkpoint:i])
            nxt = text[i + 1]
            advance = 1
            if nxt == "$":
                out.append("$")
            elif nxt == "(":
                close = text.find(")", i + 2)
                if close == -1:          # an unterminated reference is kept as written
                    out.append("$(")
                else:
                    name = text[i + 2:close]
                    out.append(mapping[name] if name in mapping else f"$({name})")
                    advance = close - i
            else:
                out.append("$" + nxt)
            i += advance
            checkpoint = i + 1
        i += 1
    out.append(text[checkpoint:])
    return "".join(out)


# 0.0.0.0 as a whole argument or as the host of HOST:PORT.
_WILDCARD = re.compile(r"(^|[=\s])0\.0\.0\.0(?=$|:)")


def _remap(text: str, mounts: dict) -> str:
    """`text` with each path under a mountPath (a whole word, or after `=`, `:` or `,`)
    moved to the host directory standing in for the mount (longest mountPath first)."""
    for mount in sorted(mounts, key=len, reverse=True):
        text = re.sub(r"(^|[=:,\s])" + re.escape(mount) + r"(?=/|$|[:,\s])",
                      lambda m, host=mounts[mount]: m.group(1) + host, text)
    return text


def _qos_class(containers: list) -> str:
    """The pod's QoS class (set by the API server in real Kubernetes; compared as strings, so
    "1" and "1000m" count as different quantities)."""
    any_set, guaranteed = False, True
    for c in containers:
        res = c.get("resources") or {}
        req = {k: str(v) for k, v in (res.get("requests") or {}).items() if k in ("cpu", "memory")}
        lim = {k: str(v) for k, v in (res.get("limits") or {}).items() if k in ("cpu", "memory")}
        any_set = any_set or bool(req or lim)
        # Guaranteed: every container limits cpu and memory, and its requests (which default
        # to the limits) equal them.
        if set(lim) != {"cpu", "memory"} or any(req.get(k, v) != v for k, v in lim.items()):
            guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _killpg(pgid: int, sig: int) -> None:
    # A group's id stays reserved while any member lives, so this cannot hit a stranger; once
    # the group is empty it fails with ESRCH, which is fine.
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _ConfigError(Exception):
    """A container that cannot be created: reported as state waiting with this reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# -- one run of a container -------------------------------------------------------------------
class _Instance:
    """One run of a container (what a container runtime calls a container): a process and
    its log file."""

    def __init__(self, index: int, log_path: pathlib.Path):
        self.index = index                    # restartCount when it started; names the log
        self.log_path = log_path
        self.line_times: list[str] = []       # when each line of the log began (--timestamps)
        self.proc: asyncio.subprocess.Process | None = None
        self.container_id = ""
        self.started_at = ""
        self.started_mono = self.finished_mono = 0.0
        self.ready = False
        self.terminated: dict | None = None   # state.terminated once it has ended
        self.reader_done: asyncio.Future | None = None
        self.reader: asyncio.BaseTransport | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _LogWriter(asyncio.Protocol):
    """Copies a container's output (stdout and stderr share one pipe, so the log is
    interleaved exactly as written) into its log file, noting when each line began."""

    def __init__(self, inst: _Instance, done: asyncio.Future):
        self.inst, self.done = inst, done
        self.file = open(inst.log_path, "ab", buffering=0)
        self.at_line_start = True

    def data_received(self, data: bytes) -> None:
        stamp = rfc3339_nano()
        pos = 0
        while pos < len(data):
            if self.at_line_start:
                self.inst.line_times.append(stamp)
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.at_line_start = False
                break
            self.at_line_start, pos = True, nl + 1
        self.file.write(data)

    def connection_lost(self, exc) -> None:
        self.file.close()
        if not self.done.done():
            self.done.set_result(None)


class _Container:
    """What the kubelet knows of one container of the pod across its runs."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.image = spec.get("image", "")
        self.image_id = ""                        # set once "pulled"
        self.restart_count = 0
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.current: _Instance | None = None     # the latest run
        self.last: _Instance | None = None        # the run lastState describes
        self.forced: dict | None = None           # terminated state set when the pod ended
        self.crashes = 0                          # back-offs in a row, for the delay
        self.task: asyncio.Task | None = None

    def state(self) -> dict:
        if self.forced is not None:
            return {"terminated": dict(self.forced)}
        if self.waiting is not None:
            reason, message = self.waiting
            return {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        inst = self.current
        if inst.terminated is None:
            return {"running": {"startedAt": inst.started_at}}
        return {"terminated": dict(inst.terminated)}

    @property
    def running(self) -> bool:
        return (self.forced is None and self.waiting is None and self.current is not None
                and self.current.terminated is None)

    def api_status(self) -> dict:
        running = self.running
        st = {"name": self.name, "image": self.image, "imageID": self.image_id,
              "ready": running and self.current.ready, "started": running,
              "restartCount": self.restart_count, "state": self.state(),
              "lastState": {"terminated": dict(self.last.terminated)} if self.last else {}}
        if self.current is not None:
            st["containerID"] = self.current.container_id
        return st


# -- the pod ----------------------------------------------------------------------------------
class PodRunner:
    """Runs one pod's containers as local processes and reports its status (see module doc).

    `on_status(status)` is called on the loop with the whole, new pod `status` each time
    anything in it changes. Logs go to `pod_dir/<container>/<restartCount>.log`, where
    `pod_dir` is `log_dir/<namespace>_<name>_<uid>` (the layout of the kubelet's
    /var/log/pods, so pods of the same name in two namespaces, or a deleted pod and its
    same-named successor, never share logs).
    """

    def __init__(self, pod: dict, pod_ip: str, *, node_name: str = "standin-node",
                 host_ip: str = "127.0.0.1", base_env: dict | None = None,
                 extra_env: dict | None = None, log_dir: pathlib.Path,
                 on_status: Callable[[dict], None],
                 image_pullable: Callable[[str], bool] = lambda image: True,
                 backoff_base: float = 1.0, backoff_max: float = 30.0,
                 pull_seconds: float = 0.0,
                 secrets: Callable[[str, str], dict | None] | None = None):
        self.pod = copy.deepcopy(pod)
        meta, spec = self.pod.get("metadata") or {}, self.pod.get("spec") or {}
        self.name = meta["name"]
        self.namespace = meta.get("namespace") or "default"
        self.uid = meta.get("uid") or ""
        self.spec = spec
        self.pod_ip, self.host_ip, self.node_name = pod_ip, host_ip, node_name
        self.restart_policy = spec.get("restartPolicy") or "Always"
        if self.restart_policy not in ("Always", "OnFailure", "Never"):
            raise ValueError(f"pod {self.name}: restartPolicy {self.restart_policy!r} is not "
                             "Always, OnFailure or Never")
        self._check_supported(spec)
        self._containers = [_Container(c) for c in spec["containers"]]
        self._by_name = {c.name: c for c in self._containers}
        self.hostname = (spec.get("hostname") or self.name)[:63]
        self.pod_dir = pathlib.Path(log_dir) / f"{self.namespace}_{self.name}_{self.uid}"
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._extra_env = {str(k): str(v) for k, v in (extra_env or {}).items()}
        self._on_status = on_status
        self._image_pullable = image_pullable
        self._backoff_base, self._backoff_max = float(backoff_base), float(backoff_max)
        self._pull_seconds = float(pull_seconds)
        # (namespace, name) -> the Secret as stored (data base64-encoded), or None
        self._secrets = secrets or (lambda ns, name: None)
        self._volumes = {v["name"]: v for v in spec.get("volumes") or []}
        self._volume_dirs: dict[str, pathlib.Path] = {}   # volumes set up so far
        grace = spec.get("terminationGracePeriodSeconds")
        self._grace = 30.0 if grace is None else float(grace)
        self._qos = _qos_class(spec["containers"])

        self._started = False
        self._stopping = False       # terminate()/evict() began: no (re)starts any more
        self._killing = False        # ... and the grace period is over: SIGKILL on sight
        self._terminal = False       # every process has exited after terminate()/evict()
        self._evicted: tuple[str, str] | None = None
        self._stop_event: asyncio.Event | None = None
        self._start_time = ""
        # type -> [status, lastTransitionTime]: the time only moves when the status flips
        self._conditions: dict[str, list] = {}
        scheduled = next((c for c in (self.pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled"), None)
        self._scheduled_at = (scheduled or {}).get("lastTransitionTime") or rfc3339()
        self._status: dict = {}

    @staticmethod
    def _check_supported(spec: dict) -> None:
        """Refuse, loudly, what the stand-in does not emulate: a pod quietly run differently
        from real Kubernetes would make tests pass for the wrong reason."""
        def no(what):
            raise NotImplementedError(f"the stand-in kubelet does not support {what}")

        containers = spec.get("containers") or []
        if not containers:
            raise ValueError("spec.containers: a pod needs at least one container")
        if spec.get("initContainers"):
            no("spec.initContainers")
        if spec.get("readinessGates"):
            no("spec.readinessGates")
        names = [c.get("name") for c in containers]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"spec.containers: names must be given and unique, got {names}")
        for c in containers:
            where = f"container {c['name']!r}"
            if c.get("envFrom"):
                no(f"envFrom ({where})")
            for probe in ("livenessProbe", "startupProbe"):
                if c.get(probe):
                    no(f"{probe} ({where})")
            probe = c.get("readinessProbe")
            if probe and not ("tcpSocket" in probe or "httpGet" in probe):
                no(f"readinessProbe other than tcpSocket or httpGet ({where}: "
                   f"{sorted(probe)})")
            volumes = {v.get("name") for v in spec.get("volumes") or []}
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:   # the API server refuses such a pod
                    raise ValueError(f"{where}: volumeMounts names volume {m.get('name')!r}, "
                                     "which the pod does not have")
                for field in ("subPath", "subPathExpr", "mountPropagation"):
                    if m.get(field):
                        no(f"volumeMounts[].{field} ({where})")
        for v in spec.get("volumes") or []:
            kinds = sorted(k for k in v if k != "name")
            if kinds != ["secret"]:
                no(f"volumes other than secret (volume {v.get('name')!r}: {kinds})")

    # -- public interface ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pod: report it acknowledged (startTime) and run each container in its own
        task on the running loop. Returns at once."""
        if self._started or self._stopping:
            return
        self._started = True
        self._stop_event = asyncio.Event()
        self._start_time = rfc3339()
        self._report()
        for c in self._containers:
            c.task = asyncio.create_task(self._run(c), name=f"kubelet {self.name}/{c.name}")

    async def terminate(self, grace: float | None = None) -> None:
        """Graceful deletion: no more (re)starts; SIGTERM to each container's main process
        (as the runtime signals PID 1; the rest of the group goes when it exits); SIGKILL to
        every group after `grace` seconds (default: terminationGracePeriodSeconds, else 30).
        Returns once every process has exited and been reaped, after reporting the final
        status. Idempotent; safe at any point (back-off, image pull, process start)."""
        grace = self._grace if grace is None else float(grace)
        self._stop()
        for inst in self._live():
            self._signal_main(inst, signal.SIGTERM)
        await self._wait_stopped(grace)

    async def evict(self, reason: str = "Evicted",
                    message: str = "The node was low on resource: memory.") -> None:
        """The kubelet evicts the pod: SIGKILL every container, no restarts, phase Failed with
        status.reason/message and a DisruptionTarget condition. A pod already finished or
        terminated is left as it is."""
        if not self._stopping and not self.finished:
            self._evicted = (reason, message)
        self._stop()
        await self._wait_stopped(0)

    def kill_container(self, container: str | None = None, sig: int = signal.SIGKILL) -> None:
        """Simulate a crash: send `sig` to the container's main process (the first container
        if None); the rest of its group dies with it and restartPolicy applies as usual. Does
        nothing when the container has no live process."""
        c = self._container(container)
        if c.current is not None and c.current.alive:
            self._signal_main(c.current, sig)

    def log(self, container: str | None = None, previous: bool = False,
            tail_lines: int | None = None, timestamps: bool = False) -> str:
        """The container's output (stdout and stderr interleaved as written), like
        `kubectl logs`: of its current run, or with `previous` of the run lastState describes.
        Raises LookupError with the kubelet's message when there is no such log."""
        c = self._container(container)
        inst = self._log_instance(c, previous)
        try:
            data = inst.log_path.read_bytes()
        except FileNotFoundError:
            data = b""
        # Lines end at "\n" only, as the timestamps were taken (not str.splitlines' \r etc.).
        parts = data.decode("utf-8", "replace").split("\n")
        lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        if timestamps:
            times = inst.line_times
            lines = [f"{times[min(i, len(times) - 1)] if times else rfc3339_nano(0)} {line}"
                     for i, line in enumerate(lines)]
        if tail_lines is not None and tail_lines >= 0:    # kubectl: -1 means all
            lines = lines[-tail_lines:] if tail_lines > 0 else []
        return "".join(lines)

    def pids(self) -> list[int]:
        """Pids of the containers' live main processes."""
        return [inst.proc.pid for inst in self._live()]

    @property
    def status(self) -> dict:
        """The latest pod status reported (a copy)."""
        if not self._status:
            # Not acknowledged by the kubelet yet: what the API server and scheduler wrote.
            return {"phase": "Pending", "qosClass": self._qos,
                    "conditions": [self._condition("PodScheduled", True)]}
        return copy.deepcopy(self._status)

    @property
    def finished(self) -> bool:
        """No process will run any more: terminated, evicted, or every container done for
        good (phase Succeeded or Failed)."""
        if self._terminal:
            return True
        return self._started and all(c.task is not None and c.task.done()
                                     for c in self._containers)

    # -- containers -----------------------------------------------------------------------------
    def _container(self, name: str | None) -> _Container:
        if name is None:
            return self._containers[0]
        try:
            return self._by_name[name]
        except KeyError:
            raise LookupError(f"container {name} is not valid for pod {self.name}") from None

    def _log_instance(self, c: _Container, previous: bool) -> _Instance:
        # The kubelet's validateContainerLogStatus: previous = lastState's run; otherwise the
        # running one, else the last one that ran (e.g. during CrashLoopBackOff).
        if previous:
            if c.last is None:
                raise LookupError(f'previous terminated container "{c.name}" in pod '
                                  f'"{self.name}" not found')
            return c.last
        if c.waiting is None and c.forced is None and c.current is not None:
            return c.current
        if c.last is not None:
            return c.last
        if c.forced is not None:
            raise LookupError(f'container "{c.name}" in pod "{self.name}" is terminated')
        reason = c.waiting[0]
        detail = {"ErrImagePull": "image can't be pulled",
                  "ImagePullBackOff": "trying and failing to pull image"}.get(reason, reason)
        raise LookupError(f'container "{c.name}" in pod "{self.name}" is waiting to start: '
                          f'{detail}')

    def _live(self) -> list[_Instance]:
        return [c.current for c in self._containers if c.current is not None and c.current.alive]

    @staticmethod
    def _signal_main(inst: _Instance, sig: int) -> None:
        try:
            os.kill(inst.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _backoff(self, n: int) -> float:
        return min(self._backoff_base * 2 ** (n - 1), self._backoff_max)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the pod is stopped; True if it was."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return self._stopping

    def _set_waiting(self, c: _Container, reason: str, message: str = "") -> None:
        c.waiting = (reason, message)
        self._report()

    async def _run(self, c: _Container) -> None:
        try:
            await self._run_container(c)
        except Exception as exc:
            # A bug of the stand-in: show it in the pod's status too, not only in a log.
            logger.exception("stand-in kubelet: container %s of pod %s failed", c.name, self.name)
            if c.current is not None and c.current.alive:
                _killpg(c.current.proc.pid, signal.SIGKILL)
            self._set_waiting(c, "StandinKubeletError", f"{type(exc).__name__}: {exc}")
        finally:
            # Whatever happened (even cancellation at loop shutdown), leave no process behind.
            if c.current is not None and c.current.alive:
                _killpg(c.current.proc.pid, signal.SIGKILL)

    async def _run_container(self, c: _Container) -> None:
        """One container's life: pull, create, start, wait, then restart after a back-off or
        stop, per restartPolicy, until the pod is stopped."""
        pull_failures = create_failures = 0
        while not self._stopping:
            if not c.image_id:
                if self._pull_seconds > 0:
                    self._set_waiting(c, "ContainerCreating")
                    if await self._sleep(self._pull_seconds):
                        break
                if not self._image_pullable(c.image):
                    # Like the kubelet: ErrImagePull, then ImagePullBackOff until the next try.
                    pull_failures += 1
                    self._set_waiting(c, "ErrImagePull",
                                      f'rpc error: code = NotFound desc = failed to pull and '
                                      f'unpack image "{c.image}": {c.image}: not found')
                    self._set_waiting(c, "ImagePullBackOff", f'Back-off pulling image "{c.image}"')
                    if await self._sleep(self._backoff(pull_failures)):
                        break
                    continue
                c.image_id = self._image_id(c.image)
            try:
                argv, env, cwd = self._config(c)
            except _ConfigError as e:
                # Never created, so restartCount stays and, as in Kubernetes, it is retried
                # whatever the restartPolicy (the pod stays Pending).
                create_failures += 1
                self._set_waiting(c, e.reason, e.message)
                if await self._sleep(self._backoff(create_failures)):
                    break
                continue
            inst = await self._start_instance(c, argv, env, cwd)
            if inst.proc is not None:
                await self._watch(c, inst)
            if self._stopping:
                break
            exit_code = inst.terminated["exitCode"]
            if self.restart_policy == "Never" or (self.restart_policy == "OnFailure"
                                                  and exit_code == 0):
                return
            # Back-off: doubling from the base, capped, and reset after a run of 10 base delays
            # (the kubelet: 10 s doubling to 5 min, reset after 10 min of running). Unlike the
            # kubelet, the first restart waits the base delay too.
            ran = inst.finished_mono - inst.started_mono
            c.crashes = 1 if ran >= 10 * self._backoff_base else c.crashes + 1
            delay = self._backoff(c.crashes)
            c.last = inst
            c.restart_count += 1
            self._set_waiting(c, "CrashLoopBackOff",
                              f"back-off {go_duration(delay)} restarting failed "
                              f"container={c.name} pod={self.name}_{self.namespace}({self.uid})")
            if await self._sleep(delay):
                break

    @staticmethod
    def _image_id(image: str) -> str:
        repo = image.split("@")[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        return f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"

    def _config(self, c: _Container) -> tuple[list[str], dict, str]:
        """argv, environment and working directory of the container's next run."""
        spec = c.spec
        command = [str(a) for a in spec.get("command") or []]
        if not command:
            raise _ConfigError("CreateContainerError",
                               f'the stand-in kubelet has no images, so no image ENTRYPOINT: '
                               f'container "{c.name}" needs an explicit command')
        # The kubelet's makeEnvironmentVariables: each `value` may refer to the service
        # variables (extra_env) and to the entries before it; valueFrom is not expanded.
        mounts = self._mount_volumes(c)
        service_env = self._extra_env
        own: dict[str, str] = {}
        refs = collections.ChainMap(own, service_env)
        for e in spec.get("env") or []:
            value = str(e.get("value") or "")
            if value:
                value = expand(value, refs)
            elif e.get("valueFrom"):
                value = self._value_from(c, e)
                if value is None:        # an optional reference to what does not exist
                    continue
            own[e["name"]] = value
        argv = [expand(a, refs) for a in command + [str(a) for a in spec.get("args") or []]]
        # No network namespace: a wildcard bind would take its port on every pod's address
        # (and collide with the same port of another pod), so it is narrowed to this pod's.
        argv = [_WILDCARD.sub(lambda m: m.group(1) + self.pod_ip, a) for a in argv]
        if mounts:
            argv = [_remap(a, mounts) for a in argv]
            own.update({k: _remap(v, mounts) for k, v in own.items()})
        # The image's environment (here: the test process's), the kubelet's variables,
        # HOSTNAME (set by the runtime), then the container's own. Only the latter two can be
        # referred to with $(VAR), as in Kubernetes (the image's PATH cannot).
        env = {**self._base_env, **service_env, "HOSTNAME": self.hostname, **own}
        cwd = spec.get("workingDir")
        if cwd:
            if not os.path.isdir(cwd):
                # A runtime would create it inside the container's filesystem; the stand-in
                # will not create directories on the host.
                raise _ConfigError("CreateContainerError",
                                   f"the stand-in runs containers on the host, where "
                                   f"workingDir {cwd!r} does not exist")
        else:
            cwd = str(self.pod_dir / "_workdir")
            os.makedirs(cwd, exist_ok=True)
        return argv, env, cwd

    # -- volumes ------------------------------------------------------------------------------
    def _mount_volumes(self, c: _Container) -> dict[str, str]:
        """Set up (once per pod) the volumes the container mounts; {mountPath: host dir}."""
        out = {}
        for m in c.spec.get("volumeMounts") or []:
            name = m["name"]
            if name not in self._volume_dirs:
                self._volume_dirs[name] = self._secret_volume(self._volumes[name])
            out[m["mountPath"].rstrip("/") or "/"] = str(self._volume_dirs[name])
        return out

    def _secret_volume(self, volume: dict) -> pathlib.Path:
        """The kubelet's secret volume plugin: the Secret's keys as files, in the AtomicWriter
        layout, with their modes. Raises _ConfigError (ContainerCreating) like its
        MountVolume.SetUp failures, which the kubelet retries."""
        name, src = volume["name"], volume["secret"]
        secret_name, optional = src.get("secretName"), bool(src.get("optional"))

        def fail(why):
            raise _ConfigError("ContainerCreating",
                               f'MountVolume.SetUp failed for volume "{name}" : {why}')

        secret = self._secrets(self.namespace, secret_name)
        if secret is None and not optional:
            fail(f'secret "{secret_name}" not found')
        data = (secret or {}).get("data") or {}
        default_mode = src.get("defaultMode", 0o644)
        files = {}
        items = src.get("items")
        for item in items if items is not None else [{"key": k, "path": k} for k in data]:
            key = item["key"]
            if key not in data:
                if optional:
                    continue
                fail(f"references non-existent secret key: {key}")
            path = item.get("path") or key
            if path.startswith("/") or ".." in path.split("/"):
                fail(f"invalid path {path!r}")
            files[path] = (base64.b64decode(data[key]), item.get("mode", default_mode))
        root = self.pod_dir / "volumes" / "kubernetes.io~secret" / name
        root.mkdir(parents=True, exist_ok=True)
        stamp = "..%s.%09d" % (time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime()),
                               time.time_ns() % 10**9)
        (root / stamp).mkdir(mode=0o755)
        for path, (content, mode) in files.items():
            target = root / stamp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            os.chmod(target, mode)
        (root / "..data").symlink_to(stamp)
        for top in sorted({p.split("/", 1)[0] for p in files}):
            (root / top).symlink_to(f"..data/{top}")
        return root

    def _value_from(self, c: _Container, e: dict) -> str | None:
        value_from = e["valueFrom"]
        secret_ref = value_from.get("secretKeyRef")
        if secret_ref is not None:
            name, key = secret_ref.get("name"), secret_ref.get("key")
            secret = self._secrets(self.namespace, name)
            data = (secret or {}).get("data") or {}
            if secret is None or key not in data:
                if secret_ref.get("optional"):
                    return None
                raise _ConfigError("CreateContainerConfigError",
                                   f'secret "{name}" not found' if secret is None else
                                   f"couldn't find key {key} in Secret {self.namespace}/{name}")
            return base64.b64decode(data[key]).decode("utf-8", "replace")
        field_ref = value_from.get("fieldRef")
        if field_ref:
            path = field_ref.get("fieldPath", "")
            meta = self.pod.get("metadata") or {}
            fields = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                      "metadata.uid": self.uid, "spec.nodeName": self.node_name,
                      "spec.serviceAccountName": (self.spec.get("serviceAccountName")
                                                  or self.spec.get("serviceAccount")
                                                  or "default"),
                      "status.podIP": self.pod_ip, "status.podIPs": self.pod_ip,
                      "status.hostIP": self.host_ip, "status.hostIPs": self.host_ip}
            if path in fields:
                return fields[path]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", path)
            if m:
                return str((meta.get(m[1]) or {}).get(m[2], ""))
            raise _ConfigError("CreateContainerConfigError",
                               f'env "{e["name"]}" of container "{c.name}": fieldPath '
                               f'{path!r} is not supported')
        kind = next(iter(value_from), "?")
        raise _ConfigError("CreateContainerConfigError",
                           f'env "{e["name"]}" of container "{c.name}": the stand-in kubelet '
                           f"cannot resolve valueFrom.{kind} (it has no config maps or "
                           "resource fields)")

    async def _start_instance(self, c: _Container, argv: list, env: dict, cwd: str) -> _Instance:
        """Create and start one run of the container. A command that cannot be executed ends
        the run at once, as the runtime's StartError (exit code 128)."""
        log_dir = self.pod_dir / c.name
        log_dir.mkdir(parents=True, exist_ok=True)
        inst = _Instance(c.restart_count, log_dir / f"{c.restart_count}.log")
        inst.log_path.write_bytes(b"")
        executable = self._resolve(argv[0], env, cwd)
        read_fd, write_fd = os.pipe()
        try:
            try:
                if executable is None:
                    raise FileNotFoundError(argv[0])
                # stdout and stderr on ONE pipe we read ourselves: the order of writes is
                # kept, and the subprocess transport has no pipes of its own, so wait()
                # returns when the process exits even if an escaped child keeps the pipe.
                # Its own session: the group stands in for the container's PID namespace.
                proc = await asyncio.create_subprocess_exec(
                    executable, *argv[1:], stdin=asyncio.subprocess.DEVNULL, stdout=write_fd,
                    stderr=write_fd, cwd=cwd, env=env, start_new_session=True)
            finally:
                os.close(write_fd)
        except OSError as exc:
            os.close(read_fd)
            if isinstance(exc, FileNotFoundError):
                why = (f'exec: "{argv[0]}": executable file not found in $PATH'
                       if "/" not in argv[0] else f"exec: {argv[0]!r}: no such file or directory")
            else:
                why = f'exec: "{argv[0]}": {exc.strerror or exc}'
            inst.container_id = (f"standin://start-error-{self.uid or self.name}-{c.name}-"
                                 f"{inst.index}")
            # As containerd reports it: startedAt is the zero time.
            inst.terminated = {
                "exitCode": 128, "reason": "StartError",
                "message": "failed to create containerd task: failed to create shim task: OCI "
                           "runtime create failed: runc create failed: unable to start "
                           f"container process: {why}: unknown",
                "startedAt": "1970-01-01T00:00:00Z", "finishedAt": rfc3339(),
                "containerID": inst.container_id}
            inst.started_mono = inst.finished_mono = time.monotonic()
            c.current, c.waiting = inst, None
            self._report()
            return inst
        # Registered and checked without an await in between: either terminate()/evict() sees
        # this process in _live(), or we see that they ran.
        inst.proc = proc
        inst.container_id = f"standin://{proc.pid}"
        inst.started_at, inst.started_mono = rfc3339(), time.monotonic()
        inst.ready = not c.spec.get("readinessProbe")
        c.current, c.waiting = inst, None
        if self._killing:
            _killpg(proc.pid, signal.SIGKILL)
        elif self._stopping:
            self._signal_main(inst, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        inst.reader_done = loop.create_future()
        try:
            inst.reader, _ = await loop.connect_read_pipe(
                lambda: _LogWriter(inst, inst.reader_done), os.fdopen(read_fd, "rb", 0))
        except BaseException:
            _killpg(proc.pid, signal.SIGKILL)
            raise
        return inst

    @staticmethod
    def _resolve(command: str, env: dict, cwd: str) -> str | None:
        """The executable as the container's PATH finds it (the test process's PATH, usually),
        done here so it behaves the same under asyncio and uvloop."""
        if "/" in command:
            path = os.path.join(cwd, command)
            return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
        return shutil.which(command, path=env.get("PATH", os.defpath))

    async def _watch(self, c: _Container, inst: _Instance) -> None:
        """Report the run, probe it, and record its end."""
        probe = c.spec.get("readinessProbe")
        prober = asyncio.create_task(self._probe_loop(c, inst, probe)) if probe else None
        self._report()
        try:
            rc = await inst.proc.wait()
        finally:
            # The main process ended: like a container whose PID 1 exits, nothing of it stays.
            _killpg(inst.proc.pid, signal.SIGKILL)
            if prober is not None:
                prober.cancel()
                await asyncio.gather(prober, return_exceptions=True)
        inst.finished_mono = time.monotonic()
        finished_at = rfc3339()
        try:
            await asyncio.wait_for(asyncio.shield(inst.reader_done), 5)
        except asyncio.TimeoutError:
            inst.reader.close()   # a process that left the group still holds the pipe
        exit_code, sig = (rc, 0) if rc >= 0 else (128 - rc, -rc)
        inst.ready = False
        inst.terminated = {"exitCode": exit_code,
                           "reason": "Completed" if exit_code == 0 else "Error",
                           **({"signal": sig} if sig else {}),
                           "startedAt": inst.started_at, "finishedAt": finished_at,
                           "containerID": inst.container_id}
        self._report()

    # -- readiness --------------------------------------------------------------------------
    async def _probe_loop(self, c: _Container, inst: _Instance, probe: dict) -> None:
        """The kubelet's readiness worker for one run: not ready until `successThreshold`
        successes in a row, unready again after `failureThreshold` failures in a row."""
        period = min(float(probe.get("periodSeconds") or 10), PROBE_TIME_CAP)
        timeout = float(probe.get("timeoutSeconds") or 1)
        need_ok = int(probe.get("successThreshold") or 1)
        need_fail = int(probe.get("failureThreshold") or 3)
        await asyncio.sleep(min(float(probe.get("initialDelaySeconds") or 0), PROBE_TIME_CAP))
        oks = fails = 0
        while True:
            ok = await self._probe_once(c, probe, timeout)
            oks, fails = (oks + 1, 0) if ok else (0, fails + 1)
            if ok and oks >= need_ok and not inst.ready:
                inst.ready = True
                self._report()
            elif not ok and fails >= need_fail and inst.ready:
                inst.ready = False
                self._report()
            await asyncio.sleep(period)

    async def _probe_once(self, c: _Container, probe: dict, timeout: float) -> bool:
        try:
            if "tcpSocket" in probe:
                p = probe["tcpSocket"]
                host, port = p.get("host") or self.pod_ip, self._port(c, p["port"])
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the result
                # when the connection opens just as the prober is cancelled, losing the
                # cancellation; the prober then probed on forever and its container's end
                # (and the pod's deletion) waited on it.
                async with asyncio.timeout(timeout):
                    _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return True
            import aiohttp   # only pods with HTTP probes need it

            p = probe["httpGet"]
            host, port = p.get("host") or self.pod_ip, self._port(c, p["port"])
            path = p.get("path") or "/"
            path = path if path.startswith("/") else "/" + path
            url = f"{(p.get('scheme') or 'HTTP').lower()}://{host}:{port}{path}"
            headers = {"User-Agent": "kube-probe/1.37", "Accept": "*/*",
                       **{h["name"]: h["value"] for h in p.get("httpHeaders") or []}}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                # The kubelet does not verify certificates of HTTPS probes either.
                async with s.get(url, headers=headers, ssl=False) as resp:
                    return 200 <= resp.status < 400
        except Exception:   # refused, timed out, unknown named port...: a failure
            return False

    @staticmethod
    def _port(c: _Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise LookupError(f"container {c.name!r} has no port named {port!r}")

    # -- stopping ---------------------------------------------------------------------------
    def _stop(self) -> None:
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._evicted is not None:
            self._kill_all()

    def _kill_all(self) -> None:
        self._killing = True
        for inst in self._live():
            _killpg(inst.proc.pid, signal.SIGKILL)

    async def _wait_stopped(self, grace: float) -> None:
        pending = [c.task for c in self._containers if c.task is not None and not c.task.done()]
        if pending and not self._killing:
            _, pending = await asyncio.wait(pending, timeout=max(grace, 0))
        if pending:
            self._kill_all()
            await asyncio.wait(pending)
        if not self._terminal:
            # The kubelet's TerminatePod: a container that never reached `terminated` is
            # reported terminated (ContainerStatusUnknown); the phase becomes terminal.
            self._terminal = True
            for c in self._containers:
                if "terminated" not in c.state():
                    c.forced = dict(_STATUS_UNKNOWN)
            self._report()

    # -- status -----------------------------------------------------------------------------
    def _phase(self) -> str:
        """The kubelet's getPhase."""
        if self._evicted is not None:
            return "Failed"
        waiting = running = stopped = succeeded = 0
        for c in self._containers:
            state = c.state()
            if "running" in state:
                running += 1
            elif "terminated" in state:
                stopped += 1
                succeeded += state["terminated"]["exitCode"] == 0
            elif c.last is not None:      # waiting to restart: counts as stopped
                stopped += 1
            else:                          # not started yet
                waiting += 1
        if waiting:
            phase = "Pending"
        elif running:
            phase = "Running"
        elif not self._terminal and self.restart_policy == "Always":
            phase = "Running"              # all restarting
        elif stopped == succeeded:
            phase = "Succeeded"
        elif self._terminal or self.restart_policy == "Never":
            phase = "Failed"
        else:
            phase = "Running"              # OnFailure, restarting the failed ones
        if self._terminal and phase in ("Pending", "Running"):
            phase = "Failed"
        return phase

    def _condition(self, type_: str, ok: bool, reason: str = "", message: str = "") -> dict:
        seen = self._conditions.get(type_)
        status = "True" if ok else "False"
        if seen is None or seen[0] != status:
            when = self._scheduled_at if type_ == "PodScheduled" else rfc3339()
            seen = self._conditions[type_] = [status, when]
        cond = {"type": type_, "status": status, "lastProbeTime": None,
                "lastTransitionTime": seen[1]}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _build_status(self) -> dict:
        phase = self._phase()
        done = phase in ("Succeeded", "Failed")
        unready = [c.name for c in self._containers if not (c.running and c.current.ready)]
        if done:
            ready = (False, "PodCompleted", "")
        elif unready:
            ready = (False, "ContainersNotReady",
                     f"containers with unready status: [{' '.join(unready)}]")
        else:
            ready = (True, "", "")
        conditions = [
            # The sandbox (here: nothing) exists from start until the pod is done.
            self._condition("PodReadyToStartContainers", not done),
            self._condition("Initialized", True),
            self._condition("Ready", *ready),
            self._condition("ContainersReady", *ready),
            self._condition("PodScheduled", True),
        ]
        if self._evicted is not None:
            conditions.append(self._condition("DisruptionTarget", True, "TerminationByKubelet",
                                              self._evicted[1]))
        status = {"phase": phase, "conditions": conditions,
                  "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
                  "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
                  "startTime": self._start_time,
                  "containerStatuses": [c.api_status() for c in self._containers],
                  "qosClass": self._qos}
        if self._evicted is not None:
            status["reason"], status["message"] = self._evicted
        return status

    def _report(self) -> None:
        """Rebuild the status; tell on_status if anything changed."""
        if not self._started:
            return
        status = self._build_status()
        if status == self._status:
            return
        self._status = status
        try:
            self._on_status(copy.deepcopy(status))
        except Exception:
            logger.exception("stand-in kubelet: on_status failed for pod %s", self.name)
