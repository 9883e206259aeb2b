"""Clusters for the coordination tests.

`sync_cluster`: one in-process LocalCluster per module (2 workers x 2 threads, inproc)
with two sync clients; tests use names of their own, so they do not see each other's
state. `async_pair(fn)`: a fresh in-loop scheduler and workers (taskcore.testing.cluster,
state machines validating) with two asynchronous clients, for `fn(c1, c2, s, ws)`;
a fixture, as the test directories are not packages.
"""
import types

import pytest

from taskcore.testing import cluster, run


@pytest.fixture(scope="module")
def sync_cluster():
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc:
        with Client(lc) as c1, Client(lc.scheduler_address, set_as_default=False) as c2:
            yield types.SimpleNamespace(cluster=lc, c1=c1, c2=c2,
                                        address=lc.scheduler_address)


@pytest.fixture
def async_pair():
    """`async_pair(fn)`: run `await fn(c1, c2, scheduler, workers)` (see the module doc)."""
    return _async_pair


def _async_pair(fn, n_workers=2, timeout=30):
    from taskcore.client import Client

    async def main():
        async with cluster(n_workers=n_workers, nthreads=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c1, \
                    Client(s.address, asynchronous=True, set_as_default=False) as c2:
                await fn(c1, c2, s, ws)

    run(main(), timeout=timeout)
