"""A local registry of running clusters: one JSON file per cluster name.

Why files: a cluster made with `shutdown_on_close=False` outlives the Python
process that created it, so what another process needs to find and manage it
again (the scheduler address, every process's host and PID, how to start
more workers) must live outside any process. One small file per cluster,
replaced atomically on every change, needs no daemon and no locking for
readers.

Where: `$TASKCORE_CLUSTERS_DIR`, else `$XDG_STATE_HOME/taskcore/clusters`,
else `~/.local/state/taskcore/clusters`. Files are created mode 0600 (they
may hold SSH connection options; never passwords, which are dropped).

Entry format (version 2)::

    {"version": 2, "name": ..., "backend": "ssh",
     "cls": "taskcore.deploy.ssh.SSHCluster",
     "created": <epoch>, "updated": <epoch>, "host": <where the manager ran>,
     "manager_pid": <pid of the managing process, null once detached>,
     "detached": <true when the processes outlive their manager>,
     "scheduler_address": ..., "scheduler": <process record>,
     "workers": {name: {"record": <member record>, "worker_group": ...}},
     "config": {<the backend's own attributes, for its _restore>},
     "spec": {"scheduler": ..., "worker": ..., "worker_groups": ...,
              "workers": {name: spec}, "cluster": {<SpecCluster options>}}}

A member record is what the member's `record()` returns (for a process: host,
PIDs and their start times, address, log file; for a batch job: its job id).
`spec` (detached clusters only) is the cluster's spec as data
(deploy/specdata.py): with the records it rebuilds any backend the same way.

The class that rebuilds an entry is found by `backend` in the
`taskcore.deploy` entry-point group, else by its dotted `cls`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time

from taskcore.utils import read_json_file

VERSION = 2
ENTRY_POINT_GROUP = "taskcore.deploy"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ClusterNotFound(LookupError):
    """No cluster of that name in the registry."""


def registry_dir() -> str:
    path = os.environ.get("TASKCORE_CLUSTERS_DIR")
    if not path:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".local", "state")
        path = os.path.join(base, "taskcore", "clusters")
    return path


def check_name(name: str) -> str:
    """Cluster names become file names: letters, digits, '.', '_' and '-' only."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid cluster name {name!r}: use letters, digits, '.', '_' and '-' "
                         f"(at most 128, not starting with a punctuation mark)")
    return name


def _path(name: str) -> str:
    return os.path.join(registry_dir(), check_name(name) + ".json")


def log_dir(name: str) -> str:
    """Where a detached local cluster's processes write their logs."""
    return os.path.join(registry_dir(), check_name(name) + ".logs")


def save(entry: dict) -> None:
    """Write (replace) one entry atomically, readable by its owner only."""
    d = registry_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    entry = dict(entry, version=VERSION, updated=time.time())
    path = _path(entry["name"])
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(name: str) -> dict:
    entry = read_json_file(_path(name))  # None when missing
    if entry is None:
        known = names()
        hint = f"; known clusters: {', '.join(known)}" if known else "; the registry is empty"
        raise ClusterNotFound(f"no cluster named {name!r} in {registry_dir()}{hint}")
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        raise ValueError(f"registry entry {_path(name)} has an unknown format")
    return entry


def backends() -> dict:
    """{backend name: entry point} of the installed cluster backends."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(entry: dict):
    """The cluster class that made `entry`: its backend's entry point, else its dotted cls."""
    from taskcore.deploy.specdata import import_dotted

    name = entry.get("backend")
    ep = backends().get(name) if name else None
    where = f"backend {name!r}" if ep is not None else repr(entry.get("cls"))
    try:
        return ep.load() if ep is not None else import_dotted(entry.get("cls") or "")
    except (ImportError, AttributeError, ValueError) as e:
        raise TypeError(f"cluster {entry.get('name')!r} was made by {where}, which cannot be "
                        f"imported here: {e}") from None


def remove(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def names() -> list[str]:
    try:
        files = os.listdir(registry_dir())
    except FileNotFoundError:
        return []
    return sorted(f[:-5] for f in files if f.endswith(".json") and ".tmp-" not in f)


def entries() -> list[dict]:
    out = []
    for n in names():
        try:
            out.append(load(n))
        except (ClusterNotFound, ValueError, OSError):
            continue
    return out


def _reachable(address: str | None, timeout: float = 0.5) -> bool:
    """Can we open a TCP connection to the scheduler? (No handshake: cheap and side-effect free.)"""
    if not address:
        return False
    try:
        from taskcore.transports.addressing import parse_address, parse_host_port

        scheme, loc = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return False
        host, port = parse_host_port(loc)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _local_processes_dead(entry: dict) -> bool:
    """True when every recorded process ran on this machine and none of them is left."""
    from taskcore.deploy.launcher import is_alive

    records = [entry.get("scheduler") or {}]
    records += [w.get("record") or {} for w in (entry.get("workers") or {}).values()]
    me = socket.gethostname()
    for r in records:
        target = r.get("target") or {}
        if target.get("kind") != "local" or r.get("machine") not in (None, me):
            return False
        launch = r.get("launch") or {}
        if is_alive(launch.get("pid"), launch.get("pid_start")) or \
                is_alive(launch.get("child_pid"), launch.get("child_start")):
            return False
    return True


def status_of(entry: dict) -> str:
    """running: the scheduler answers. dead: nothing of it is left. unreachable: cannot tell."""
    if not entry.get("detached"):
        owner = entry.get("manager_pid")
        if entry.get("host") == socket.gethostname() and owner is not None:
            from taskcore.deploy.launcher import is_alive

            if not is_alive(owner):
                return "dead"
    if _reachable(entry.get("scheduler_address")):
        return "running"
    if entry.get("scheduler") and _local_processes_dead(entry):
        return "dead"
    return "unreachable"


def list_clusters(check: bool = True) -> list[dict]:
    """The registered clusters, each a summary dict.

    Keys: name, cls, scheduler_address, workers (count), detached, host,
    manager_pid, created, and with `check=True` a status: "running" (the
    scheduler accepts connections), "dead" (its processes are verifiably gone:
    `prune()` removes it) or "unreachable".
    """
    out = []
    for e in entries():
        info = {"name": e["name"], "cls": e.get("cls"),
                "scheduler_address": e.get("scheduler_address"),
                "workers": len(e.get("workers") or {}), "detached": bool(e.get("detached")),
                "host": e.get("host"), "manager_pid": e.get("manager_pid"),
                "created": e.get("created")}
        if check:
            info["status"] = status_of(e)
        out.append(info)
    return out


def prune() -> list[str]:
    """Remove the entries of clusters that are verifiably gone; returns their names."""
    gone = []
    for e in entries():
        if status_of(e) == "dead":
            remove(e["name"])
            gone.append(e["name"])
    return gone
