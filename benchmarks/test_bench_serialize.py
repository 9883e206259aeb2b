"""Benchmarks for taskcore.core.serialize.

Run: PYTHONPATH=src .venv/bin/pytest -q benchmarks/test_bench_serialize.py --benchmark-only

Every per-message benchmark also times its plain-msgpack counterpart in the
same process and records ``ratio_to_msgpack`` (ours / baseline, best of
several rounds each) in ``extra_info``, so the figure survives machine noise
(see ARCHITECTURE.md section 9: unpinned runs on this VM swing +-30-50%; pin
with ``taskset -c 1`` for comparisons between variants).
"""
import timeit

import msgpack
import numpy as np
import pytest

from taskcore.core.messages import decode_compute_tasks
from taskcore.core.serialize import (
    compress_frames,
    decompress_frames,
    dumps,
    loads,
    serialize_obj,
)


def inc(x):
    return x + 1


RUN_SPEC = serialize_obj((inc, (1,), {}))
# A one-task compute-tasks message as the scheduler sends it (core/messages.pyx,
# docs/contracts.md): ["compute-tasks", id, key, run spec, priority, deps].
TASK_MSG = ["compute-tasks", 123, "inc-abc123", RUN_SPEC, [0, 1, 5], []]
# The same message as plain msgpack can carry it: the run spec as the raw
# pickle bytes.
BASELINE_MSG = ["compute-tasks", 123, "inc-abc123", bytes(RUN_SPEC.frames[0]), [0, 1, 5], []]
[_EVENT] = decode_compute_tasks(TASK_MSG)          # the codec's own encoding
assert (_EVENT.id, _EVENT.key, _EVENT.priority) == (123, "inc-abc123", [0, 1, 5])


def _with_id(msg, i):
    return [msg[0], i] + msg[2:]


def _interleaved_best(ours, baseline, number=5_000, rounds=15):
    """Best per-call time of each, measured in alternating rounds.

    Alternating keeps both exposed to the same background load, so their
    ratio is stable even when absolute figures swing.
    """
    best_ours = best_base = float("inf")
    for _ in range(rounds):
        best_ours = min(best_ours, timeit.timeit(ours, number=number) / number)
        best_base = min(best_base, timeit.timeit(baseline, number=number) / number)
    return best_ours, best_base


def _record(benchmark, ours_func, baseline_func, number=5_000):
    """Record ours vs the msgpack baseline (interleaved, best of rounds) in extra_info."""
    if not getattr(benchmark, "stats", None):  # --benchmark-disable: nothing measured
        return
    ours, base = _interleaved_best(ours_func, baseline_func, number=number)
    benchmark.extra_info["ours_best_us"] = round(ours * 1e6, 3)
    benchmark.extra_info["msgpack_best_us"] = round(base * 1e6, 3)
    benchmark.extra_info["ratio"] = round(ours / base, 2)
    benchmark.extra_info["baseline"] = "plain msgpack, same message shape"
    benchmark.extra_info["target"] = "reported"


def test_dumps_task_message(benchmark):
    frames = benchmark(dumps, TASK_MSG)
    assert len(frames) == 1  # the small run spec rides inline in frame 0
    _record(benchmark, lambda: dumps(TASK_MSG), lambda: msgpack.packb(BASELINE_MSG))


def test_loads_task_message(benchmark):
    frames = dumps(TASK_MSG)
    packed = msgpack.packb(BASELINE_MSG)
    msg = benchmark(loads, frames)
    assert msg[4] == [0, 1, 5]
    [ev] = decode_compute_tasks(msg)
    assert ev.priority == [0, 1, 5] and ev.run_spec.deserialize()[0] is inc
    _record(benchmark, lambda: loads(frames), lambda: msgpack.unpackb(packed))


def test_msgpack_packb_baseline(benchmark):
    benchmark(msgpack.packb, BASELINE_MSG)


def test_msgpack_unpackb_baseline(benchmark):
    benchmark(msgpack.unpackb, msgpack.packb(BASELINE_MSG))


def test_dumps_loads_batch_of_100_task_messages(benchmark):
    # A comm coalesces the messages of one loop tick into one write.
    batch = [_with_id(TASK_MSG, i) for i in range(100)]
    base = [_with_id(BASELINE_MSG, i) for i in range(100)]

    def ours():
        return loads(dumps(batch))

    out = benchmark(ours)
    assert len(out) == 100
    _record(benchmark, ours, lambda: msgpack.unpackb(msgpack.packb(base)), number=50)


def test_serialize_obj_run_spec(benchmark):
    s = benchmark(serialize_obj, (inc, (1,), {}))
    assert s.serializer == "pickle"


def test_deserialize_run_spec(benchmark):
    func, args, kwargs = benchmark(RUN_SPEC.deserialize)
    assert func(*args, **kwargs) == 2


def test_decompress_frames_uncompressed_message(benchmark):
    # The per-message cost on a compression-enabled comm when nothing was compressed.
    frames = dumps(TASK_MSG)
    flags = bytes(len(frames))
    benchmark(decompress_frames, frames, flags)


@pytest.fixture(scope="module")
def big_array():
    return np.random.default_rng(0).random(100 * 2**20 // 8)  # 100 MiB


def test_dumps_100mb_array(benchmark, big_array):
    frames = benchmark(dumps, {"op": "data", "x": big_array})
    assert np.shares_memory(np.frombuffer(frames[-1], np.uint8), big_array)
    benchmark.extra_info["effective_GB_per_s"] = (
        round(big_array.nbytes / benchmark.stats.stats.min / 1e9, 1) if benchmark.stats else None
    )


def test_loads_100mb_array(benchmark, big_array):
    frames = [f if i == 0 else bytearray(f) for i, f in enumerate(dumps({"x": big_array}))]
    out = benchmark(loads, frames)
    assert np.shares_memory(out["x"], np.frombuffer(frames[-1], np.uint8))
    benchmark.extra_info["effective_GB_per_s"] = (
        round(big_array.nbytes / benchmark.stats.stats.min / 1e9, 1) if benchmark.stats else None
    )


def test_compress_frames_10mb_compressible(benchmark):
    frame = np.zeros(10 * 2**20 // 8).tobytes()
    out, flags = benchmark(compress_frames, [frame])
    assert flags == b"\x01"
    benchmark.extra_info["effective_GB_per_s"] = (
        round(len(frame) / benchmark.stats.stats.min / 1e9, 1) if benchmark.stats else None
    )


def test_compress_frames_10mb_incompressible(benchmark):
    frame = np.random.default_rng(1).bytes(10 * 2**20)
    out, flags = benchmark(compress_frames, [frame])
    assert flags == b"\x00" and out[0] is frame  # decided from the sample alone
