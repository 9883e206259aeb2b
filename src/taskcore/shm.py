"""Shared memory between workers on one host: large get-data values as files in /dev/shm.

Negotiation. A worker that uses shared memory creates a marker file at start,
`/dev/shm/taskcore-<pid>-<id>-marker`, holding a random nonce. Its get-data requests carry
`"shm": {"marker": <name>, "nonce": <nonce>}`. The serving worker writes to shared memory
only if it can read that marker with that nonce: then both processes see the same
/dev/shm (a hostname says nothing about containers or network namespaces; a random
nonce cannot be matched by another host's file of the same name). Inproc workers
(one process) never take part.

Format. Each value whose `Serialized` is at least `threshold` bytes goes into one
fresh file, `/dev/shm/taskcore-<pid>-<id>-<n>` (O_EXCL, mode 0600), its frames written
with `os.pwrite` at 64-byte aligned offsets (numpy's buffers stay aligned). The reply
keeps `{"status": "OK", "data": {...}}` for the other values and adds
`"shm": {key: {"name", "kind", "size", "frames": [[offset, nbytes], ...]}}`.
The requester maps the file copy-on-write (values are writable, as over tcp), unlinks
it at once and rebuilds `Serialized(kind, [slices of the mapping])`: the mapping lives
as long as the objects built on it (each slice holds the mmap).

Cleanup. The requester unlinks on mapping. The server also holds the names it sent on
a connection until the next request on it arrives, the connection closes, or
`hold_timeout` passes, and then unlinks any still there (a requester that failed
before mapping). A worker removes its own files and marker on close; the nanny removes
`/dev/shm/taskcore-<pid>-*` of a worker process that ended (a crash included). For
workers killed without a nanny, a starting worker removes what dead ones left
(`sweep`): a worker holds an exclusive `flock` on its marker while it lives, which the
kernel drops when the process ends, however it ends and whatever PID namespace it ran
in; a marker that can be locked belongs to nobody, and goes with its owner's files.

Fallback. A server that cannot write a value (e.g. /dev/shm full: ENOSPC), or whose
value would take more than half of what is free there, sends it in the reply as usual.
A requester that cannot map a file (missing, permissions, wrong
size) asks for those keys again without shared memory on the same connection, logs
once per peer and stops offering shared memory to that peer.
"""
from __future__ import annotations

import asyncio
import fcntl
import glob
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import time

from taskcore.core.serialize import Serialized
from taskcore.utils import parse_bytes

logger = logging.getLogger("taskcore.shm")

SHM_DIR = "/dev/shm"
PREFIX = "taskcore-"
DEFAULT_THRESHOLD = 1 << 20
HOLD_TIMEOUT = 60.0
ALIGN = 64
_NAME = re.compile(r"taskcore-[0-9]+-[0-9a-f]+-(?:[0-9]+|marker)\Z")
_NONCE_BYTES = 16
_VERIFIED_CAP = 1024          # tokens remembered by a server (accepted or refused)


def threshold_option(value) -> int:
    """A worker's `shm_threshold` in bytes, 0 when shared memory is off: None, 0 or False
    turn it off, and so does the environment variable TASKCORE_SHM=0."""
    if os.environ.get("TASKCORE_SHM", "").strip().lower() in ("0", "false", "no", "off"):
        return 0
    if value is None or value is False:
        return 0
    try:
        n = parse_bytes(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"shm_threshold must be a size in bytes (or 0/None: off), "
                         f"got {value!r}") from e
    return int(n)


def process_files(pid, directory=SHM_DIR) -> list:
    """The shared-memory files of process `pid`: its markers and exported values."""
    return glob.glob(os.path.join(glob.escape(directory), f"{PREFIX}{int(pid)}-*"))


def remove_process_files(pid, directory=SHM_DIR) -> int:
    """Unlink process `pid`'s files (after it ended); how many were removed."""
    removed = 0
    for path in process_files(pid, directory):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass                    # its requester mapped and unlinked it meanwhile
        except OSError as e:
            logger.warning("could not remove shared-memory file %s: %s", path, e)
    return removed


def _unlink_quiet(path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _unowned(marker_path) -> bool:
    """True when no live process holds the marker locked (its owner ended)."""
    try:
        fd = os.open(marker_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False                        # gone meanwhile, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False                        # locked: its owner lives
    finally:
        os.close(fd)                        # releases the lock taken above, if any
    return True


def _byte_view(frame) -> memoryview:
    mv = frame if type(frame) is memoryview else memoryview(frame)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")           # TypeError for a non-contiguous buffer: sent inline
    return mv


def _pwrite_all(fd, mv, offset):
    while mv.nbytes:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


class SharedMemory:
    """One worker's use of /dev/shm (see the module doc). `start()` creates the marker;
    `close()` removes it and every file this object exported.

    Counters: `sent_count`/`sent_bytes` (values served through shared memory),
    `received_count`/`received_bytes` (values fetched through it), `fallback_count`
    (values a requester had to fetch again over the transport).
    """

    def __init__(self, threshold=DEFAULT_THRESHOLD, directory=SHM_DIR,
                 hold_timeout=HOLD_TIMEOUT):
        threshold = int(threshold)
        if threshold <= 0:
            raise ValueError(f"SharedMemory needs a threshold > 0 bytes, got {threshold}")
        if hold_timeout is None or hold_timeout <= 0:
            raise ValueError(f"hold_timeout must be > 0 seconds, got {hold_timeout!r}")
        self.threshold = threshold
        self.directory = directory
        self.hold_timeout = float(hold_timeout)
        self.prefix = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self.token = None
        self._marker = None
        self._marker_fd = None      # open and flock()ed while this object is started
        self._names = itertools.count(1)   # next() is atomic: writes run on helper threads
        self._held = {}             # owner (a comm) -> (names, timer)
        self._verified = {}         # (marker, nonce) -> bool
        self._refused_peers = set()
        self._write_failed = False
        self.sent_count = self.sent_bytes = 0
        self.received_count = self.received_bytes = 0
        self.fallback_count = 0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        """Create the marker and lock it for this process's lifetime; OSError when
        /dev/shm cannot be written."""
        nonce = secrets.token_hex(_NONCE_BYTES)
        name = self.prefix + "marker"
        path = os.path.join(self.directory, name)
        # Locked and written under a name sweeps ignore, then renamed: a sweep never
        # sees the marker unlocked.
        tmp = os.path.join(self.directory, self.prefix + "new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, nonce.encode())
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        self._marker_fd = fd
        self._marker = path
        self.token = {"marker": name, "nonce": nonce}
        self.sweep()
        return self

    def sweep(self) -> int:
        """Remove what processes that ended without cleaning up left here: each marker
        nobody holds locked, with its owner's values, and values older than twice the
        hold timeout whose owner has no marker; how many files."""
        removed = 0
        too_old = time.time() - 2 * self.hold_timeout
        paths = glob.glob(os.path.join(glob.escape(self.directory), PREFIX + "*"))
        live = set()
        for path in paths:
            name = os.path.basename(path)
            if not _NAME.match(name) or not name.endswith("marker"):
                continue
            owner = name[:-len("marker")]
            if path == self._marker or not _unowned(path):
                live.add(owner)
                continue
            if _unlink_quiet(path):
                removed += 1
        for path in paths:
            name = os.path.basename(path)
            if not _NAME.match(name) or name.endswith("marker"):
                continue
            owner = name[:name.rindex("-") + 1]
            if owner in live or owner == self.prefix:
                continue
            try:
                if os.stat(path).st_mtime < too_old and _unlink_quiet(path):
                    removed += 1
            except OSError:
                continue                    # gone meanwhile
        return removed

    def close(self):
        """Remove the marker and every file still here (requesters that mapped one keep
        their mapping)."""
        for names, timer in self._held.values():
            timer.cancel()
        self._held.clear()
        for path in glob.glob(os.path.join(glob.escape(self.directory),
                                           glob.escape(self.prefix) + "*")):
            _unlink_quiet(path)
        if self._marker_fd is not None:
            os.close(self._marker_fd)       # the lock goes with it
            self._marker_fd = None
        self._marker = None
        self.token = None

    # -- requester ----------------------------------------------------------------------------
    def offer(self, peer):
        """The token to put in a get-data request to `peer`, or None (not offered)."""
        if self.token is None or peer in self._refused_peers:
            return None
        return self.token

    async def receive(self, peer, comm, request, reply):
        """The reply with its shared-memory values mapped into `data`. Keys that could not
        be mapped are asked for again from `peer` over `comm`, without shared memory;
        the combined reply is returned (status "busy" if the peer was busy for that)."""
        shared = reply.pop("shm", None)
        if not shared:
            return reply
        data = reply.setdefault("data", {})
        failed = []
        first_error = None
        for key, desc in shared.items():
            try:
                ser = self.attach(desc)
            except (OSError, ValueError, TypeError, KeyError) as e:
                failed.append(key)
                first_error = first_error or e
                continue
            data[key] = ser
            self.received_count += 1
            self.received_bytes += ser.nbytes
        if not failed:
            return reply
        if peer not in self._refused_peers:
            logger.warning("shared memory from %s failed (%s); fetching over the transport "
                           "from now on", peer, first_error)
            self._refused_peers.add(peer)
        self.fallback_count += len(failed)
        again = {k: v for k, v in request.items() if k != "shm"}
        again["keys"] = failed
        await comm.write(again)
        second = await comm.read()
        if second.get("status") != "OK":
            return second
        data.update(second.get("data") or {})
        if second.get("errors"):
            reply.setdefault("errors", {}).update(second["errors"])
        return reply

    def attach(self, desc) -> Serialized:
        """Map one exported value and unlink its file; the frames are slices of the map."""
        name = desc["name"]
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith("marker"):
            raise ValueError(f"not a taskcore shared-memory name: {name!r}")
        size = int(desc["size"])
        frames = [(int(o), int(n)) for o, n in desc["frames"]]
        for o, n in frames:
            if o < 0 or n < 0 or o + n > size:
                raise ValueError(f"frame [{o}, {o + n}) outside {name} of {size} bytes")
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise ValueError(f"{name}: {st.st_size} bytes, expected {size}")
            # Copy-on-write: the value is writable, as one read from a socket is, and a
            # write never reaches the file.
            view = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY)) if size else \
                memoryview(b"")
        finally:
            os.close(fd)
        _unlink_quiet(path)
        return Serialized(int(desc["kind"]), [view[o:o + n] for o, n in frames])

    # -- server --------------------------------------------------------------------------------
    def accepts(self, token) -> bool:
        """True when `token`'s marker is in our /dev/shm with its nonce: one host, one
        /dev/shm."""
        try:
            name, nonce = token["marker"], token["nonce"]
        except (TypeError, KeyError):
            return False
        if not (isinstance(name, str) and isinstance(nonce, str)):
            return False
        ok = self._verified.get((name, nonce))
        if ok is None:
            ok = _NAME.match(name) is not None and name.endswith("marker") and \
                self._marker_says(os.path.join(self.directory, name), nonce)
            if len(self._verified) >= _VERIFIED_CAP:
                self._verified.clear()
            self._verified[(name, nonce)] = ok
        return ok

    @staticmethod
    def _marker_says(path, nonce) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return os.read(fd, 2 * _NONCE_BYTES + 1).decode("ascii", "replace") == nonce
        except OSError:
            return False
        finally:
            os.close(fd)

    async def export(self, owner, token, data) -> dict:
        """Move `data`'s large `Serialized` values into shared-memory files (written on a
        helper thread) and return their descriptors, {} when `token` is refused. The
        files are held for `owner` (a comm) until `release(owner)` or the timeout. A
        value that cannot be written stays in `data`, sent inline."""
        big = [(k, v) for k, v in data.items()
               if type(v) is Serialized and v.nbytes >= self.threshold]
        if not big or not self.accepts(token):
            return {}
        loop = asyncio.get_running_loop()
        written = await loop.run_in_executor(None, self._write_many, big)
        if self.token is None:              # closed meanwhile: its sweep missed these
            for _, desc in written:
                _unlink_quiet(os.path.join(self.directory, desc["name"]))
            return {}
        out = {}
        names = []
        for key, desc in written:
            out[key] = desc
            names.append(desc["name"])
            self.sent_count += 1
            self.sent_bytes += data.pop(key).nbytes
        if names:
            self._hold(owner, names, loop)
        return out

    def _write_many(self, items):
        done = []
        for key, ser in items:
            if not self._room_for(ser.nbytes):
                continue                    # inline: /dev/shm is for others too
            try:
                done.append((key, self.write(ser)))
            except (OSError, TypeError, ValueError) as e:
                if not self._write_failed:
                    self._write_failed = True
                    logger.warning("could not write a value into %s (%s); sending such "
                                   "values over the transport", self.directory, e)
        return done

    def _room_for(self, nbytes) -> bool:
        """Whether a value of `nbytes` leaves at least as much of /dev/shm free. A mapped
        value keeps its pages in /dev/shm for as long as the requester holds it (unlinked
        or not), and a container's /dev/shm is often small (Docker: 64 MB): other
        programs there must not run out because of us."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        return 2 * nbytes <= st.f_bavail * st.f_frsize

    def write(self, ser) -> dict:
        """One value into a fresh file; its descriptor. The file is removed on failure."""
        views = [_byte_view(f) for f in ser.frames]
        layout = []
        offset = 0
        for mv in views:
            offset = -(-offset // ALIGN) * ALIGN
            layout.append([offset, mv.nbytes])
            offset += mv.nbytes
        name = f"{self.prefix}{next(self._names)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, offset)
            for mv, (o, _) in zip(views, layout):
                _pwrite_all(fd, mv, o)
        except BaseException:
            _unlink_quiet(path)
            raise
        finally:
            os.close(fd)
        return {"name": name, "kind": ser.kind, "size": offset, "frames": layout}

    def _hold(self, owner, names, loop):
        prev = self._held.pop(owner, None)
        if prev is not None:
            prev[1].cancel()
            names = prev[0] + names
        timer = loop.call_later(self.hold_timeout, self._expire, owner, names)
        self._held[owner] = (names, timer)

    def _expire(self, owner, names):
        held = self._held.get(owner)
        if held is not None and held[0] is names:
            self.release(owner)

    def release(self, owner) -> int:
        """Unlink the files held for `owner` that are still there (their requester has
        not mapped them); how many were."""
        held = self._held.pop(owner, None)
        if held is None:
            return 0
        held[1].cancel()
        return sum(_unlink_quiet(os.path.join(self.directory, n)) for n in held[0])
