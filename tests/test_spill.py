"""The spill store (taskcore/spill.py): LRU order over a plain dict, values to files and
back, lz4, sizes, failures that keep values in memory, cleanup."""
import errno
import logging
import os
import threading

import numpy as np
import pytest

from taskcore import spill
from taskcore.core.serialize import Serialized
from taskcore.spill import SpillStore, scratch_root, sweep_stale

KB = 1024


@pytest.fixture
def store(tmp_path):
    s = SpillStore({}, str(tmp_path / "scratch"))
    yield s
    s.close()


def blob(tag, n=4 * KB):
    """Incompressible bytes (lz4 keeps them as they are)."""
    return tag.encode() + os.urandom(n)


def files(s):
    return sorted(os.listdir(s.directory)) if s.directory else []


def test_dict_order_is_the_lru_order_and_touch_moves_a_key_back(store):
    d = store.fast
    for k in "abcd":
        d[k] = blob(k)
    store.touch("a")                        # a is now the most recently used
    store.touch("missing")                  # not in memory: nothing happens
    assert list(d) == ["b", "c", "d", "a"]
    assert store.evict() == (1, len(d["a"]))     # one value: the least recently used
    assert "b" in store and "b" not in d
    n, w = store.evict(lambda: len(store) == 3)
    assert n == 2 and list(store.index) == ["b", "c", "d"] and list(d) == ["a"]
    assert store.spilled_bytes == w + len(d["a"]) == store.spill_bytes_total
    assert store.spill_count == 3


def test_unspill_reads_back_as_most_recently_used_and_removes_the_file(store):
    d = store.fast
    values = {k: blob(k) for k in "abc"}
    d.update(values)
    store.evict(lambda: False)              # everything
    assert not d and len(files(store)) == 3
    assert store.spilled_bytes == sum(map(len, values.values()))
    d["x"] = blob("x")
    assert store.unspill("b") == values["b"]
    assert list(d) == ["x", "b"] and "b" not in store
    assert len(files(store)) == 2
    assert store.spilled_bytes == len(values["a"]) + len(values["c"])
    assert store.unspill_count == 1 and store.unspill_bytes_total == len(values["b"])
    with pytest.raises(KeyError):
        store.unspill("b")                  # in memory now, not on disk
    with pytest.raises(KeyError):
        store.load("nope")


def test_load_leaves_the_store_alone_and_restore_checks_the_record(store):
    d = store.fast
    d["a"] = blob("a")
    d["b"] = blob("b")
    store.evict(lambda: False)
    value, rec = store.load_record("a")
    assert value.startswith(b"a") and "a" in store and "a" not in d
    store.discard("a")                      # released meanwhile: the read is not put back
    assert not store.restore("a", rec, value) and "a" not in d
    value, rec = store.load_record("b")
    assert store.restore("b", rec, value) and d["b"] == value and "b" not in store
    assert files(store) == []


def test_numpy_round_trip_keeps_dtype_shape_order_and_is_writable(store):
    d = store.fast
    arrays = {"f": np.random.default_rng(0).random((300, 200)),
              "i": np.arange(50_000, dtype=">i4"),
              "t": np.arange(40_000, dtype=np.int64).reshape(200, 200).T,     # not C-contiguous
              "s": np.array(["x" * 50] * 100)}
    d.update({k: v.copy() for k, v in arrays.items()})
    store.evict(lambda: False)
    assert len(store) == 4
    for k, a in arrays.items():
        got = store.unspill(k)
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)
        assert got.flags.writeable
        got[...] = got[...]                 # really writable


def test_lz4_when_it_pays(tmp_path):
    zeros = np.zeros(2**20)                 # 8 MiB, compresses to almost nothing
    noise = np.random.default_rng(1).random(2**17)          # 1 MiB, does not compress
    for compression in (True, False):
        s = SpillStore({"z": zeros.copy(), "n": noise.copy()}, str(tmp_path / str(compression)),
                       compression=compression)
        s.evict(lambda: False)
        z, n = s.index["z"], s.index["n"]
        assert z.weight == zeros.nbytes and n.weight == noise.nbytes
        if compression:
            assert z.disk < zeros.nbytes / 50            # lz4 used
        else:
            assert z.disk >= zeros.nbytes
        assert noise.nbytes <= n.disk < noise.nbytes + 4 * KB   # stored as is either way
        assert os.path.getsize(z.path) == z.disk and s.disk_bytes == z.disk + n.disk
        np.testing.assert_array_equal(s.unspill("z"), zeros)
        np.testing.assert_array_equal(s.unspill("n"), noise)
        s.close()


def test_get_data_form_is_the_serialized_frames(store):
    d = store.fast
    d["a"] = np.arange(10_000.0)
    d["l"] = list(range(2_000))             # msgpack-native: another serializer
    store.evict(lambda: False)
    for k, expected in (("a", np.arange(10_000.0)), ("l", list(range(2_000)))):
        ser = store.read_serialized(k)
        assert isinstance(ser, Serialized) and k in store     # not unspilled
        np.testing.assert_array_equal(ser.deserialize(), expected)


def test_small_values_stay_in_memory_at_the_recent_end(store):
    d = store.fast
    d["tiny"] = 12345
    d["short"] = b"x" * 100
    d["big"] = big = blob("big")
    assert store.evict() == (1, len(big))
    assert list(d) == ["tiny", "short"] and list(store.index) == ["big"]
    assert store.evict(lambda: False) == (0, 0)             # nothing spillable is left
    assert list(d) == ["tiny", "short"]


class Unpicklable:
    nbytes = 10 * KB                         # big enough to be worth spilling

    def __reduce__(self):
        raise TypeError("no pickling for you")


def test_an_unpicklable_value_stays_in_memory_with_one_warning(store, caplog):
    d = store.fast
    d["bad"] = bad = Unpicklable()
    d["good"] = blob("good")
    with caplog.at_level(logging.WARNING, logger="taskcore.worker"):
        assert store.evict(lambda: False)[0] == 1
        d["bad2"] = Unpicklable()
        store.evict(lambda: False)
    assert d["bad"] is bad and "good" in store and "bad" not in store
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot spill 'bad'" in warnings[0].getMessage()
    assert "no pickling for you" in warnings[0].getMessage()
    failed = store.failed_count
    store.evict(lambda: False)              # the same objects are not tried again
    assert store.failed_count == failed == 2
    assert files(store) == ["0"]            # no partial files left behind


def test_a_full_disk_keeps_values_in_memory_and_retries_later(store, monkeypatch, caplog):
    d = store.fast
    for k in "abc":
        d[k] = blob(k)
    real = spill._write_all
    calls = []

    def full(fd, data):
        calls.append(1)
        if len(calls) > 1:                  # the header goes in, the payload does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(spill, "_write_all", full)
    with caplog.at_level(logging.WARNING, logger="taskcore.worker"):
        assert store.evict(lambda: False) == (0, 0)
        assert store.evict(lambda: False) == (0, 0)         # backing off: no new attempt
    assert len(calls) == 2 and list(d) == ["a", "b", "c"] and len(store) == 0
    assert files(store) == []               # the partial file was removed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    monkeypatch.setattr(spill, "_write_all", real)
    store._disk_retry_at = 1.0               # the 5 s back-off is over
    assert store.evict(lambda: False)[0] == 3 and not d


def test_max_spill_bounds_the_bytes_on_disk(tmp_path):
    d = {k: blob(k, 10 * KB) for k in "abcd"}
    s = SpillStore(d, str(tmp_path), max_spill=25 * KB)
    assert s.evict(lambda: False)[0] == 2
    assert s.disk_bytes <= 25 * KB and list(d) == ["c", "d"]
    s.discard("a")
    assert s.evict(lambda: False)[0] == 1
    s.close()


def test_sizes_follow_discard_and_clear(store):
    d = store.fast
    for k in "abcd":
        d[k] = blob(k)
    store.evict(lambda: False)
    assert store.spilled_bytes == 4 * (4 * KB + 1) and store.disk_bytes > store.spilled_bytes
    store.discard("a")
    store.discard("a")                      # twice: no error
    assert store.spilled_bytes == 3 * (4 * KB + 1) and len(files(store)) == 3
    store.clear()
    assert store.spilled_bytes == store.disk_bytes == 0 and files(store) == []
    assert os.path.isdir(store.directory)   # clear keeps the folder, close removes it


def test_close_removes_the_folder_and_the_folder_is_made_lazily(tmp_path):
    root = str(tmp_path / "scratch")
    s = SpillStore({"a": blob("a")}, root)
    assert s.directory is None and not os.path.exists(root)
    s.evict()
    d = s.directory
    assert os.path.dirname(d) == root and os.path.basename(d).startswith(f"worker-{os.getpid()}-")
    s.close()
    assert not os.path.exists(d) and s.directory is None


def test_sweep_removes_folders_of_dead_workers_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in (f"worker-{dead}-abc", f"worker-{os.getpid()}-mine", f"worker-{os.getppid()}-x",
                 "unrelated", "worker-notapid-x"):
        (tmp_path / name).mkdir()
    assert sweep_stale(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"worker-{os.getpid()}-mine", f"worker-{os.getppid()}-x", "unrelated", "worker-notapid-x"])
    assert scratch_root("/data/x") == "/data/x/taskcore-scratch"


def test_reads_from_other_threads_race_with_discard_without_errors(store):
    d = store.fast
    for i in range(50):
        d[i] = blob(str(i), 8 * KB)
    store.evict(lambda: False)
    errors = []
    got = []

    def reader():
        for i in range(50):
            try:
                got.append(store.load(i)[:3])
            except KeyError:
                pass                        # discarded first: a clean miss
            except Exception as e:         # noqa: B902 - what the test looks for
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        store.discard(i)
    for t in threads:
        t.join()
    assert not errors and store.spilled_bytes == 0 and files(store) == []
