"""Spilling to disk: a worker's least recently used results, as files.

`SpillStore` sits beside the worker's data store (`WorkerDispatch.data`, a plain dict
that compiled code reads and writes directly) and never wraps it:

* **LRU order is the dict's own order.** A Python dict iterates in insertion order, so
  the front of `data` holds the least recently stored values. `touch(key)` moves a key
  to the back (pop and insert again); the worker touches a task's dependencies when the
  task starts and a key when a peer fetches it, and only while memory is managed. A new
  result is inserted at the back by the dict itself: storing costs nothing extra.
* **Spilled values live here, not in `data`.** `spill(key)` serializes the value
  (`serialize_obj`: pickle protocol 5 with out-of-band buffers, so a numpy array is
  written from its own memory), compresses each frame with lz4 when a sample shows it
  pays (`compress_frames`), writes one file per key and deletes the key from `data`.
  `index` maps each spilled key to its record; the worker's compiled code sees the same
  dict as `WorkerDispatch.spilled`.
* **Reading back** (`load`, `read_serialized`) may run on any thread (a task thread
  missing a dependency, the executor serving a peer): the index is read under a lock and
  the file opened before it is released, so a concurrent `discard` (which unlinks) cannot
  pull the file from under a reader. Only the event loop's thread changes `data` or the
  index (`spill`, `restore`, `unspill`, `discard`, `clear`).
* **Failures never lose data.** A value that cannot be serialized, a full disk or the
  `max_spill` budget leaves the value in memory (moved to the back, so eviction goes on
  with the next one); each kind of failure is logged once as a warning. A value whose
  pickling failed is not tried again while it is the same object.

Weights are `serialize.nbytes(value)`, the size the worker reports to its state machine,
so `WorkerState.memory_bytes - spilled_bytes` is the managed memory still in RAM.

**GPU objects** (a worker with a `device_memory_limit`, worker_memory.py) add two tiers to
the index, so the worker's existing paths for keys missing from `data` serve them too:

* `DEVICE`: a GPU object that is in `data`. The record only tells the store (and through
  `spilled`, the compiled loop, which calls `drop_spilled` for a released key in `spilled`)
  what it weighs and when it goes: `device_bytes` is the device memory the results hold.
* `HOST`: a GPU object moved out of device memory by `to_host`: serialized once into host
  frames (`serialize_obj`: the device memory copied to host) and kept in RAM, not in `data`.
  Reading it back (`load`) rebuilds the GPU object; a peer gets the frames as they are.
  `host_bytes` is their weight, managed memory in RAM; `evict` writes these records to
  disk first (the frames as they are, not serialized again), then values from `data`.

`spilled_bytes`, `len(store)` and `key in store` keep meaning "on disk or in the host
tier" (`spilled_bytes`: on disk only); DEVICE records are not spilled values.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import struct
import tempfile
import threading
import time

from taskcore.core.serialize import (Serialized, compress_frames, decompress_frames,
                                     nbytes as sizeof, serialize_obj)

logger = logging.getLogger("taskcore.worker")

_MISSING = object()
_MAGIC = b"TCS1"
_HEAD = struct.Struct("<4sBxxxI")       # magic, Serialized.kind, frame count
_FRAME = struct.Struct("<BxxxxxxxQ")    # compression flag (0 or 1: lz4), stored length
_CHUNK = 1 << 30                        # the most one os.write/readinto moves at once
_SCRATCH = "taskcore-scratch"           # under the local directory: one folder per worker


class SpillFailed(Exception):
    """A value could not be written (a reason for the warning; the value stays in memory)."""


DEVICE, HOST, DISK = 0, 1, 2             # _Spilled.tier


class _Spilled:
    """Where a spilled value is and what it weighs."""

    __slots__ = ("path", "weight", "disk", "tier", "ser")

    def __init__(self, path, weight, disk, tier=DISK, ser=None):
        self.path = path
        self.weight = weight      # serialize.nbytes of the value (the managed size)
        self.disk = disk          # bytes in the file
        self.tier = tier
        self.ser = ser            # HOST: the Serialized value (host frames)


def scratch_root(local_directory=None):
    """The folder that holds every worker's spill folder on this host."""
    return os.path.join(local_directory or tempfile.gettempdir(), _SCRATCH)


def sweep_stale(root):
    """Remove spill folders of workers that are no longer running (a worker killed by
    SIGKILL cannot remove its own). Folders are named `worker-<pid>-<random>`."""
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    removed = 0
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "worker" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed += 1
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True           # someone else's process
    return True


class SpillStore:
    """Spilled values of one worker, and the LRU bookkeeping over its `data` dict.

    `fast` is the worker's data dict (shared, not copied). `root` is the folder under
    which this store makes its own folder on the first spill. `compression`: lz4 per
    frame when a sample shrinks (`compress_frames`); `min_bytes`: smaller values stay in
    memory (a file per 28-byte int frees nothing); `max_spill`: the most bytes on disk
    (None: no limit).
    """

    def __init__(self, fast, root=None, *, compression=True, min_bytes=1024, max_spill=None):
        self.fast = fast
        self.root = root or scratch_root()
        self.directory = None               # made on the first spill
        self.index: dict = {}               # key -> _Spilled
        self.compression = bool(compression)
        self.min_bytes = int(min_bytes)
        self.max_spill = int(max_spill) if max_spill else None
        self.spilled_bytes = 0              # weight of what is on disk
        self.disk_bytes = 0
        self.device_bytes = 0               # weight of the DEVICE records (GPU objects in data)
        self.host_bytes = 0                 # weight of the HOST records
        self.host: dict = {}                # key -> HOST record, oldest first
        self.n_device = 0
        self.device_spill_count = 0         # GPU objects moved to host (cumulative)
        self.device_spill_bytes_total = 0
        self.device_spill_seconds = 0.0
        self.device_host_reads = 0          # HOST records read (a task, a peer)
        # Cumulative counters (Prometheus counters and the heartbeat).
        self.spill_count = 0
        self.spill_bytes_total = 0
        self.spill_seconds = 0.0
        self.unspill_count = 0
        self.unspill_bytes_total = 0
        self.unspill_seconds = 0.0
        self.failed_count = 0
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._unpicklable: dict = {}        # key -> id() of a value that failed to pickle
        self._warned: set = set()
        self._disk_retry_at = 0.0           # after a write error: no writes before this

    # -- the LRU order (event loop thread) ------------------------------------------------
    def touch(self, key):
        """Mark `key` as just used: move it to the back of `data` (if it is in memory)."""
        fast = self.fast
        value = fast.pop(key, _MISSING)
        if value is not _MISSING:
            fast[key] = value

    def __contains__(self, key):
        rec = self.index.get(key)
        return rec is not None and rec.tier != DEVICE

    def __len__(self):
        return len(self.index) - self.n_device

    # -- GPU objects (event loop thread) ------------------------------------------------------
    def track_device(self, key, weight):
        """`data[key]` is now a GPU object of this weight (replacing any record of key)."""
        if key in self.index:
            self._forget(key)
        self.index[key] = _Spilled(None, weight, 0, DEVICE)
        self.device_bytes += weight
        self.n_device += 1

    def evict_device(self, enough, batch=32):
        """Move least recently used GPU objects from `data` to the host tier until
        `enough()` (after each) or none is left. Returns (objects moved, weight)."""
        fast, index = self.fast, self.index
        n = weight = 0
        left = len(fast)
        while left > 0 and self.n_device:
            keys = list(itertools.islice(fast, min(batch, left)))
            if not keys:
                break
            for key in keys:
                left -= 1
                rec = index.get(key)
                if rec is None or rec.tier != DEVICE:
                    continue
                w = self.to_host(key)
                if w < 0:
                    self.touch(key)
                    continue
                n += 1
                weight += w
                if enough():
                    return n, weight
        return n, weight

    def to_host(self, key):
        """Move the GPU object `data[key]` to the host tier: its weight, or -1 if it stays
        (too small, cannot be serialized or copied: warned once per kind)."""
        rec = self.index.get(key)
        value = self.fast.get(key, _MISSING)
        if rec is None or rec.tier != DEVICE or value is _MISSING:
            return -1
        if rec.weight < self.min_bytes:
            return -1
        if self._unpicklable and self._unpicklable.get(key) == id(value):
            return -1
        t0 = time.perf_counter()
        try:
            ser = serialize_obj(value)          # the device memory copied into host frames
        except Exception as e:
            self.failed_count += 1
            self._unpicklable[key] = id(value)
            self._warn_once("device", "cannot move %r (type %s) from the GPU to host memory; "
                            "it stays on the GPU: %s: %s", key, type(value).__name__,
                            type(e).__name__, e)
            return -1
        self._unpicklable.pop(key, None)
        new = _Spilled(None, rec.weight, 0, HOST, ser)
        with self._lock:
            self.index[key] = new
        del self.fast[key]
        self.device_bytes -= rec.weight
        self.n_device -= 1
        self.host[key] = new
        self.host_bytes += rec.weight
        self.device_spill_count += 1
        self.device_spill_bytes_total += rec.weight
        self.device_spill_seconds += time.perf_counter() - t0
        return rec.weight

    # -- spilling (event loop thread) -------------------------------------------------------
    def evict(self, enough=None, batch=32):
        """Spill least recently used values until `enough()` is true (after each spill;
        None: one value) or nothing spillable is left. Returns (values spilled, weight).
        Values that stay (too small, cannot be pickled, disk full) move to the back."""
        fast, index = self.fast, self.index
        n = weight = 0
        while self.host:                    # GPU objects moved to host: already serialized
            key = next(iter(self.host))
            w = self._host_to_disk(key)
            if w == -2:
                return n, weight
            n += 1
            weight += w
            if enough is None or enough():
                return n, weight
        left = len(fast)                    # look at each value at most once
        while left > 0:
            keys = list(itertools.islice(fast, min(batch, left)))
            if not keys:
                break
            for key in keys:
                left -= 1
                value = fast.get(key, _MISSING)
                if value is _MISSING or (index and key in index):   # GPU objects stay
                    continue
                w = self._spill(key, value)
                if w == -2:                 # disk full / over max_spill: stop for now
                    return n, weight
                if w < 0:
                    self.touch(key)
                    continue
                n += 1
                weight += w
                if enough is None or enough():
                    return n, weight
        return n, weight

    def spill(self, key):
        """Spill one key now. Returns its weight, or -1 if it stays in memory."""
        value = self.fast.get(key, _MISSING)
        if value is _MISSING:
            return -1
        w = self._spill(key, value)
        return -1 if w < 0 else w

    def _spill(self, key, value):
        """Write one value and drop it from `data`: its weight, -1 (stays, try the next
        one) or -2 (stays, and nothing else can be written now)."""
        try:
            weight = sizeof(value)
        except Exception:
            return -1
        if weight < self.min_bytes:
            return -1
        if self._unpicklable and self._unpicklable.get(key) == id(value):
            return -1
        if self._disk_retry_at and time.monotonic() < self._disk_retry_at:
            return -2
        if self.max_spill is not None and self.disk_bytes + weight > self.max_spill:
            self._warn_once("max_spill", "not spilling %r: the spill folder holds %d bytes, "
                            "max_spill is %d; values stay in memory", key, self.disk_bytes,
                            self.max_spill)
            return -2
        t0 = time.perf_counter()
        try:
            ser = serialize_obj(value)
        except Exception as e:
            self.failed_count += 1
            self._unpicklable[key] = id(value)
            self._warn_once("pickle", "cannot spill %r (type %s) to disk; it stays in memory: "
                            "%s: %s", key, type(value).__name__, type(e).__name__, e)
            return -1
        written = self._write_or_defer(ser)
        if written is None:
            return -2
        path, disk = written
        self._unpicklable.pop(key, None)
        del self.fast[key]
        self.index[key] = _Spilled(path, weight, disk)
        self.spilled_bytes += weight
        self.disk_bytes += disk
        self.spill_count += 1
        self.spill_bytes_total += weight
        self.spill_seconds += time.perf_counter() - t0
        return weight

    def _write_or_defer(self, ser):
        """(path, bytes on disk) of `ser` written to a file, or None when the disk refused
        (counted, logged once per errno, and no write is tried for 5 s)."""
        try:
            written = self._write(ser)
        except OSError as e:
            self.failed_count += 1
            self._disk_retry_at = time.monotonic() + 5.0
            self._warn_once(f"os-{e.errno}", "cannot write spilled data to %s (%s); values stay "
                            "in memory (retrying in 5 s)", self.directory or self.root,
                            os.strerror(e.errno) if e.errno else e)
            return None
        self._disk_retry_at = 0.0
        return written

    def _host_to_disk(self, key):
        """Write a HOST record's frames to a file: its weight, or -2 (it stays in the host
        tier, and nothing else can be written now)."""
        rec = self.host[key]
        if self._disk_retry_at and time.monotonic() < self._disk_retry_at:
            return -2
        if self.max_spill is not None and self.disk_bytes + rec.weight > self.max_spill:
            self._warn_once("max_spill", "not spilling %r: the spill folder holds %d bytes, "
                            "max_spill is %d; values stay in memory", key, self.disk_bytes,
                            self.max_spill)
            return -2
        t0 = time.perf_counter()
        written = self._write_or_defer(rec.ser)
        if written is None:
            return -2
        path, disk = written
        new = _Spilled(path, rec.weight, disk)
        with self._lock:
            self.index[key] = new
        del self.host[key]
        self.host_bytes -= rec.weight
        self.spilled_bytes += rec.weight
        self.disk_bytes += disk
        self.spill_count += 1
        self.spill_bytes_total += rec.weight
        self.spill_seconds += time.perf_counter() - t0
        return rec.weight

    def _write(self, ser):
        frames = ser.frames
        if self.compression:
            frames, flags = compress_frames(frames)
        else:
            flags = bytes(len(frames))
        views = []
        for f in frames:
            mv = memoryview(f)
            if mv.ndim != 1 or mv.format != "B":
                mv = mv.cast("B")
            views.append(mv)
        head = [_HEAD.pack(_MAGIC, ser.kind, len(views))]
        head += [_FRAME.pack(flags[i], mv.nbytes) for i, mv in enumerate(views)]
        head = b"".join(head)
        if self.directory is None:
            self._make_directory()
        path = os.path.join(self.directory, f"{next(self._names):x}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, head)
            for mv in views:
                _write_all(fd, mv)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return path, len(head) + sum(mv.nbytes for mv in views)

    def _make_directory(self):
        os.makedirs(self.root, exist_ok=True)
        sweep_stale(self.root)
        self.directory = tempfile.mkdtemp(prefix=f"worker-{os.getpid()}-", dir=self.root)

    # -- reading back (any thread) ------------------------------------------------------------
    def read_serialized(self, key):
        """The spilled value of `key` as a `Serialized` (frames read and decompressed, not
        unpickled): what get-data sends. KeyError if `key` is not spilled."""
        return self.read_record(key)[0]

    def read_record(self, key):
        """(Serialized, record) of a spilled key; the record is what `restore` checks."""
        t0 = time.perf_counter()
        with self._lock:
            rec = self.index.get(key)
            if rec is None or rec.tier == DEVICE:
                raise KeyError(key)
            if rec.tier == HOST:
                self.device_host_reads += 1
                return rec.ser, rec
            f = open(rec.path, "rb", buffering=0)
        with f:
            ser = _read_file(f, rec.path)
        with self._lock:
            self.unspill_count += 1
            self.unspill_bytes_total += rec.weight
            self.unspill_seconds += time.perf_counter() - t0
        return ser, rec

    def load(self, key):
        """The value of a spilled key, read back (the store is unchanged: see `restore`).
        KeyError if `key` is not spilled."""
        return self.load_record(key)[0]

    def load_record(self, key):
        """(value, record): `load`, with the record `restore` compares against."""
        ser, rec = self.read_record(key)
        return ser.deserialize(), rec

    # -- back into memory, forgetting (event loop thread) -------------------------------------
    def restore(self, key, rec, value):
        """Put a value read by `load_record` back into `data` as the most recently used,
        unless the key was dropped or replaced meanwhile. True if it was restored."""
        if self.index.get(key) is not rec:
            return False
        if key not in self.fast:
            self.fast[key] = value
        self._forget(key)
        return True

    def unspill(self, key):
        """Read a spilled value back into `data` (as the most recently used); return it."""
        value, rec = self.load_record(key)
        self.restore(key, rec, value)
        return value

    def discard(self, key):
        """Forget a spilled key (its task was released): remove its file."""
        if key in self.index:
            self._forget(key)

    def _forget(self, key):
        with self._lock:
            rec = self.index.pop(key)
        if rec.tier == DEVICE:
            self.device_bytes -= rec.weight
            self.n_device -= 1
        elif rec.tier == HOST:
            del self.host[key]
            self.host_bytes -= rec.weight
        else:
            self.spilled_bytes -= rec.weight
            self.disk_bytes -= rec.disk
            _unlink(rec.path)

    def clear(self):
        """Forget every spilled value (the worker starts over)."""
        with self._lock:
            self.index.clear()
        self._unpicklable.clear()
        self.host.clear()
        self.spilled_bytes = self.disk_bytes = self.device_bytes = self.host_bytes = 0
        self.n_device = 0
        d = self.directory
        if d is not None:
            for name in _listdir(d):
                _unlink(os.path.join(d, name))

    def close(self):
        """Forget everything and remove this store's folder."""
        self.clear()
        d, self.directory = self.directory, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    # -- reporting -----------------------------------------------------------------------------
    def stats(self):
        return {"spilled_count": len(self), "spilled_bytes": self.spilled_bytes,
                "spilled_disk_bytes": self.disk_bytes, "spill_count": self.spill_count,
                "spill_bytes_total": self.spill_bytes_total,
                "spill_seconds": self.spill_seconds, "unspill_count": self.unspill_count,
                "unspill_bytes_total": self.unspill_bytes_total,
                "unspill_seconds": self.unspill_seconds, "spill_failed_count": self.failed_count}

    def device_stats(self):
        """The GPU tiers: objects in device memory, moved to host, moves and reads back."""
        return {"device_bytes": self.device_bytes, "device_count": self.n_device,
                "device_host_bytes": self.host_bytes, "device_host_count": len(self.host),
                "device_spill_count": self.device_spill_count,
                "device_spill_bytes_total": self.device_spill_bytes_total,
                "device_spill_seconds": self.device_spill_seconds,
                "device_host_reads": self.device_host_reads}

    def _warn_once(self, kind, msg, *args):
        if kind in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(kind)
            logger.warning(msg, *args)


# -- files ---------------------------------------------------------------------------------------
def _write_all(fd, data):
    mv = memoryview(data)
    while mv.nbytes:
        n = os.write(fd, mv[:_CHUNK])
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        mv = mv[n:]


def _read_file(f, path):
    head = f.read(_HEAD.size)
    if len(head) != _HEAD.size:
        raise OSError(errno.EIO, f"truncated spill file {path}")
    magic, kind, count = _HEAD.unpack(head)
    if magic != _MAGIC:
        raise OSError(errno.EIO, f"not a spill file: {path}")
    metas = f.read(_FRAME.size * count)
    if len(metas) != _FRAME.size * count:
        raise OSError(errno.EIO, f"truncated spill file {path}")
    frames = []
    flags = bytearray(count)
    for i in range(count):
        flag, n = _FRAME.unpack_from(metas, i * _FRAME.size)
        flags[i] = flag
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = f.readinto(mv[got:got + _CHUNK])
            if not k:
                raise OSError(errno.EIO, f"truncated spill file {path}")
            got += k
        frames.append(buf)
    if any(flags):
        frames = decompress_frames(frames, bytes(flags))
    return Serialized(kind, frames)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []
