"""The task workloads of the runtime benchmarks, shared by test_bench_runtime.py and
paired.py: a map of tiny tasks, a tree reduction, a chain, sequential round trips.

Worker processes cannot import this module: its functions travel by value.
"""
import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def map_tasks(client, n):
    fs = client.map(inc, range(n), pure=False)
    r = client.gather(fs)
    assert r[-1] == n
    return r


def tree_reduction(client, n):
    level = client.map(inc, range(n), pure=False)
    while len(level) > 1:
        nxt = [client.submit(add, level[i], level[i + 1], pure=False)
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].result()


def chain(client, n):
    x = client.submit(inc, 0, pure=False)
    for _ in range(n - 1):
        x = client.submit(inc, x, pure=False)
    assert x.result() == n


def roundtrips(client, n):
    for i in range(n):
        client.submit(inc, i, pure=False).result()
