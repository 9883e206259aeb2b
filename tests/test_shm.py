"""Shared memory between workers on one host (taskcore/shm.py).

The unit tests run the mechanism in a temporary directory standing in for /dev/shm; the
nanny and cluster tests use the real /dev/shm (skipped outside CI where there is none).
"""
import asyncio
import errno
import fcntl
import logging
import mmap
import os
import signal
import stat
import sys
import textwrap

import cloudpickle
import numpy as np
import pytest

from taskcore import shm
from taskcore.core.serialize import Serialized, serialize_obj
from taskcore.testing import require, run, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests

MiB = 2**20


@pytest.fixture
def pair(tmp_path):
    """A serving and a requesting SharedMemory in one directory, closed afterwards."""
    server = shm.SharedMemory(MiB, directory=str(tmp_path)).start()
    requester = shm.SharedMemory(MiB, directory=str(tmp_path)).start()
    yield server, requester
    server.close()
    requester.close()


def files(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith(shm.PREFIX))


def data_files(directory):
    return [n for n in files(directory) if not n.endswith("marker")]


def mapped_by(arr):
    """The object at the bottom of an array's buffer chain."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


class FakeComm:
    """The requester's side of a connection: records writes, returns canned replies."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.written = []
        self.closed = False

    async def write(self, msg):
        self.written.append(msg)

    async def read(self):
        return self.replies.pop(0)


# -- options ---------------------------------------------------------------------------------------
def test_threshold_option(monkeypatch):
    monkeypatch.delenv("TASKCORE_SHM", raising=False)
    assert shm.threshold_option(shm.DEFAULT_THRESHOLD) == MiB
    assert shm.threshold_option("2 MiB") == 2 * MiB
    assert shm.threshold_option(None) == shm.threshold_option(0) == shm.threshold_option(False) == 0
    with pytest.raises(ValueError, match="shm_threshold"):
        shm.threshold_option("lots")
    with pytest.raises(ValueError, match="shm_threshold"):
        shm.threshold_option(-1)
    monkeypatch.setenv("TASKCORE_SHM", "0")
    assert shm.threshold_option(MiB) == 0
    with pytest.raises(ValueError, match="threshold > 0"):
        shm.SharedMemory(0)


# -- the format --------------------------------------------------------------------------------------
def test_round_trip_numpy_is_zero_copy_aligned_and_writable(pair, tmp_path):
    server, requester = pair
    x = np.arange(3 * MiB // 8, dtype="f8")
    desc = server.write(serialize_obj(x))
    path = tmp_path / desc["name"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == desc["size"]
    assert all(o % shm.ALIGN == 0 for o, _ in desc["frames"])
    ser = requester.attach(desc)
    assert not path.exists()                        # unlinked on mapping
    y = ser.deserialize()
    assert np.array_equal(x, y)
    assert isinstance(mapped_by(y), mmap.mmap)      # no copy out of the mapping
    assert y.ctypes.data % shm.ALIGN == 0
    y[0] = -1.0                                     # copy-on-write: writable, as over tcp
    assert y[0] == -1.0


@pytest.mark.parametrize("value", [b"b" * (2 * MiB), bytearray(b"a" * (2 * MiB)), "s" * (2 * MiB),
                                   {"a": np.ones(MiB // 4), "b": [1, 2]}])
def test_round_trip_keeps_types(pair, value):
    server, requester = pair
    got = requester.attach(server.write(serialize_obj(value))).deserialize()
    assert type(got) is type(value)
    if isinstance(value, dict):
        assert np.array_equal(got["a"], value["a"]) and got["b"] == value["b"]
    else:
        assert got == value


def test_attach_rejects_bad_descriptors(pair, tmp_path):
    server, requester = pair
    desc = server.write(serialize_obj(np.ones(MiB // 4)))
    for bad in ({**desc, "name": "../etc/passwd"}, {**desc, "name": requester.token["marker"]},
                {**desc, "size": desc["size"] + 1},
                {**desc, "frames": [[0, desc["size"] + 1]]}):
        with pytest.raises(ValueError):
            requester.attach(bad)
    assert (tmp_path / desc["name"]).exists()       # a refused descriptor unlinks nothing
    with pytest.raises(FileNotFoundError):
        requester.attach({**desc, "name": desc["name"][:-1] + "99"})


# -- negotiation ---------------------------------------------------------------------------------------
def test_negotiation_needs_the_marker_with_its_nonce(pair, tmp_path):
    server, requester = pair
    token = requester.token
    assert server.accepts(token)
    assert not server.accepts({**token, "nonce": "0" * 32})
    assert not server.accepts({"marker": "../../etc/passwd", "nonce": token["nonce"]})
    assert not server.accepts("tcp://somewhere")
    assert not server.accepts(None)
    # A requester whose marker this server cannot see (another host, another /dev/shm):
    other = shm.SharedMemory(MiB, directory=str(tmp_path)).start()
    os.unlink(tmp_path / other.token["marker"])
    assert not server.accepts(other.token)
    data = {"k": serialize_obj(np.ones(MiB))}
    before = data["k"]

    async def main():
        return await server.export(object(), other.token, data)

    assert run(main()) == {}
    assert data["k"] is before and data_files(tmp_path) == []
    other.close()


def test_export_moves_only_large_values_and_releases_them(pair, tmp_path):
    server, requester = pair
    big, small = np.arange(MiB // 4, dtype="f8"), np.arange(10)
    data = {"big": serialize_obj(big), "small": serialize_obj(small), "dev": object()}
    owner = object()

    async def main():
        shared = await server.export(owner, requester.token, data)
        assert set(shared) == {"big"} and set(data) == {"small", "dev"}
        assert len(data_files(tmp_path)) == 1
        assert server.sent_count == 1 and server.sent_bytes >= big.nbytes
        assert server.release(owner) == 1           # never mapped: the server removes it
        assert data_files(tmp_path) == []
        assert server.release(owner) == 0
        shared = await server.export(owner, requester.token,
                                     {"big": serialize_obj(big)})
        assert np.array_equal(requester.attach(shared["big"]).deserialize(), big)
        assert server.release(owner) == 0           # the requester unlinked it already

    run(main())


def test_unmapped_files_go_after_the_hold_timeout(tmp_path):
    server = shm.SharedMemory(MiB, directory=str(tmp_path), hold_timeout=0.05).start()
    requester = shm.SharedMemory(MiB, directory=str(tmp_path)).start()

    async def main():
        await server.export(object(), requester.token, {"k": serialize_obj(np.ones(MiB))})
        assert len(data_files(tmp_path)) == 1
        await asyncio.sleep(0.3)
        assert data_files(tmp_path) == []

    run(main())
    server.close()
    requester.close()


def test_close_removes_own_files_and_marker_only(pair, tmp_path):
    server, requester = pair

    async def main():
        await server.export(object(), requester.token, {"k": serialize_obj(np.ones(MiB))})

    run(main())
    assert len(files(tmp_path)) == 3                # two markers and a value
    server.close()
    assert files(tmp_path) == [requester.token["marker"]]


def test_a_close_during_the_write_leaves_no_file(pair, tmp_path):
    server, requester = pair
    write_many = server._write_many

    def then_close(items):
        done = write_many(items)
        server.close()                              # the worker closed meanwhile
        return done

    server._write_many = then_close
    data = {"k": serialize_obj(np.ones(MiB))}
    assert run(server.export(object(), requester.token, data)) == {}
    assert "k" in data and data_files(tmp_path) == []


def dead_pid():
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_start_sweeps_what_ended_processes_left(tmp_path):
    # A live worker holds its marker locked; an ended one's marker is unlocked.
    other = shm.SharedMemory(MiB, directory=str(tmp_path), hold_timeout=1).start()
    live_value = other.prefix + "1"
    dead = f"{shm.PREFIX}{dead_pid()}-ab-"
    unmarked = f"{shm.PREFIX}{dead_pid()}-cd-1"         # an owner without a marker
    for name in [dead + "marker", dead + "1", dead + "2", live_value, unmarked,
                 "taskcore-not-ours"]:
        (tmp_path / name).write_bytes(b"x")
    for name in [dead + "1", live_value, unmarked]:
        os.utime(tmp_path / name, (1, 1))
    area = shm.SharedMemory(MiB, directory=str(tmp_path), hold_timeout=1).start()
    # The unlocked marker goes, and old values whose owner has no live marker; a recent
    # value may still be mapped by a requester, and a live worker's files stay.
    assert set(files(tmp_path)) == {other.token["marker"], live_value, dead + "2",
                                    area.token["marker"], "taskcore-not-ours"}
    other.close()           # its lock goes with it: the next sweep takes what is left
    (tmp_path / live_value).write_bytes(b"x")
    os.utime(tmp_path / live_value, (1, 1))
    assert area.sweep() == 1 and live_value not in files(tmp_path)
    area.close()
    assert set(files(tmp_path)) == {dead + "2", "taskcore-not-ours"}


def test_a_marker_is_locked_while_its_worker_lives(tmp_path):
    area = shm.SharedMemory(MiB, directory=str(tmp_path)).start()
    marker = tmp_path / area.token["marker"]
    fd = os.open(marker, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert [f for f in files(tmp_path) if not f.endswith("marker")] == []
    area.close()
    assert files(tmp_path) == []


def test_a_failed_write_sends_the_value_inline(pair, tmp_path, monkeypatch, caplog):
    server, requester = pair

    def full(fd, mv, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm, "_pwrite_all", full)
    data = {"a": serialize_obj(np.ones(MiB)), "b": serialize_obj(np.zeros(MiB))}

    async def main():
        return await server.export(object(), requester.token, data)

    with caplog.at_level(logging.WARNING, logger="taskcore.shm"):
        assert run(main()) == {}
    assert set(data) == {"a", "b"}                  # both still go, over the transport
    assert data_files(tmp_path) == []
    assert len([r for r in caplog.records if "could not write" in r.message]) == 1


def test_a_value_that_would_take_half_the_free_space_goes_inline(pair, tmp_path,
                                                                 monkeypatch):
    server, requester = pair
    small = serialize_obj(np.ones(MiB, dtype="u1"))
    large = serialize_obj(np.ones(4 * MiB, dtype="u1"))
    free = 5 * MiB                      # room for the 1 MiB value, not the 4 MiB one

    class Fs:
        f_bavail, f_frsize = free, 1

    monkeypatch.setattr(shm.os, "statvfs", lambda path: Fs)
    data = {"small": small, "large": large}

    async def main():
        return await server.export(object(), requester.token, data)

    shared = run(main())
    assert set(shared) == {"small"} and set(data) == {"large"}
    assert len(data_files(tmp_path)) == 1


# -- the requester's fallback ---------------------------------------------------------------------------
def test_fallback_when_the_file_vanished(pair, tmp_path, caplog):
    server, requester = pair
    x, y = np.arange(MiB // 4, dtype="f8"), np.arange(MiB // 4, dtype="i8")
    request = {"op": "get-data", "keys": ["x", "y", "z"], "who": "tcp://me:1",
               "shm": requester.offer("tcp://peer:1")}

    async def main():
        data = {"x": serialize_obj(x), "y": serialize_obj(y), "z": serialize_obj(1)}
        shared = await server.export(object(), request["shm"], data)
        os.unlink(tmp_path / shared["x"]["name"])   # e.g. removed by a cleaner
        comm = FakeComm({"status": "OK", "data": {"x": serialize_obj(x)}, "errors": {}})
        reply = {"status": "OK", "data": data, "errors": {}, "shm": shared}
        reply = await requester.receive("tcp://peer:1", comm, request, reply)
        return comm, reply

    with caplog.at_level(logging.WARNING, logger="taskcore.shm"):
        comm, reply = run(main())
    assert comm.written == [{"op": "get-data", "keys": ["x"], "who": "tcp://me:1"}]
    got = {k: v.deserialize() for k, v in reply["data"].items()}
    assert np.array_equal(got["x"], x) and np.array_equal(got["y"], y) and got["z"] == 1
    assert "shm" not in reply
    assert requester.received_count == 1 and requester.fallback_count == 1
    assert requester.offer("tcp://peer:1") is None  # not offered to that peer again
    assert requester.offer("tcp://other:1") is requester.token
    assert len([r for r in caplog.records if "fetching over the transport" in r.message]) == 1
    assert data_files(tmp_path) == []


def test_fallback_to_a_busy_peer_reports_busy(pair):
    server, requester = pair
    desc = {"name": f"{shm.PREFIX}1-ab-1", "kind": 1, "size": 10, "frames": [[0, 10]]}
    comm = FakeComm({"status": "busy"})
    reply = {"status": "OK", "data": {}, "shm": {"k": desc}}
    got = run(requester.receive("tcp://peer:1", comm, {"op": "get-data", "keys": ["k"]}, reply))
    assert got == {"status": "busy"}


def test_old_format_replies_pass_through(pair):
    _, requester = pair
    reply = {"status": "OK", "data": {"k": serialize_obj(1)}, "errors": {}}
    assert run(requester.receive("tcp://peer:1", FakeComm(), {}, dict(reply))) == reply


# -- the real /dev/shm: nanny and cluster ---------------------------------------------------------------
def need_dev_shm():
    require(os.path.isdir(shm.SHM_DIR) and os.access(shm.SHM_DIR, os.W_OK),
            f"{shm.SHM_DIR} is not a writable directory")


FAKE_WORKER = textwrap.dedent(r'''
    import json, os, sys, time
    import numpy as np
    from taskcore import shm
    from taskcore.core.serialize import serialize_obj
    area = shm.SharedMemory(1).start()
    area.write(serialize_obj(np.ones(1000)))
    print(json.dumps({"event": "ready", "role": "worker", "address": "tcp://127.0.0.1:20000",
                      "pid": os.getpid(), "name": "fake"}), flush=True)
    time.sleep(120)
''')


def test_nanny_removes_the_files_of_a_killed_worker(tmp_path):
    need_dev_shm()
    from taskcore.nanny import Nanny
    from taskcore.transports import listen

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)

    async def main():
        async def ignore(comm):
            while True:
                await comm.read()

        sched = await listen("tcp://127.0.0.1:0", ignore, role="scheduler")
        n = Nanny(sched.contact_address, memory_limit=None, restart=False,
                  worker_command=[sys.executable, str(script)])
        await n.start()
        pid = n.worker_pid
        try:
            assert len(shm.process_files(pid)) == 2         # its marker and one value
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(n.finished(), 10)
            assert shm.process_files(pid) == []
        finally:
            await n.close()
            await sched.stop()
            shm.remove_process_files(pid)

    run(main())


def make_array(nbytes, seed):
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype="u1").copy()


def checksum_and_backing(x):
    return int(x[::4096].sum()), type(mapped_by(x)).__name__


def shm_counts(dask_worker):
    area = dask_worker._shm
    if area is None:
        return None
    return {"sent": area.sent_count, "received": area.received_count,
            "fallback": area.fallback_count, "pid": os.getpid()}


def _transfer(client, nbytes):
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    x = client.submit(make_array, nbytes, 7, workers=[a], pure=False)
    got = client.submit(checksum_and_backing, x, workers=[b], pure=False).result()
    expected = make_array(nbytes, 7)
    assert got[0] == int(expected[::4096].sum())
    return a, b, got[1]


def test_cluster_moves_a_large_array_through_shared_memory():
    need_dev_shm()
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        a, b, backing = _transfer(c, 64 * MiB)
        assert backing == "mmap"
        counts = c.run(shm_counts)
        assert counts[a]["sent"] == 1 and counts[b]["received"] == 1
        assert counts[b]["fallback"] == 0
        pids = [v["pid"] for v in counts.values()]
        # Mapped and unlinked: only the two markers are left while the workers run.
        assert sorted(p.rsplit("-", 1)[1] for pid in pids for p in shm.process_files(pid)) \
            == ["marker", "marker"]
    wait_until(lambda: all(shm.process_files(pid) == [] for pid in pids),
               message="no shared-memory files after the cluster closed")


def test_cluster_without_shared_memory_uses_the_transport():
    need_dev_shm()
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, shm_threshold=0,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        _, _, backing = _transfer(c, 16 * MiB)
        assert backing != "mmap"
        assert set(c.run(shm_counts).values()) == {None}
