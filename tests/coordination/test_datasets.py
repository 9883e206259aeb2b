"""Published datasets: visible to every client, kept alive until unpublished."""
import asyncio
import gc

import pytest

from taskcore import Client, get_client
from taskcore.testing import import_required


def inc(x):
    return x + 1


def read_dataset(name):
    return get_client().get_dataset(name).result()


def test_publish_list_get_unpublish(async_pair):
    async def t(c1, c2, s, ws):
        f = c1.submit(inc, 1)
        await c1.publish_dataset(f, name="one")
        await c1.publish_dataset(plain=[1, 2, 3], nested={"f": c1.submit(inc, 2)})
        assert await c2.list_datasets() == ["nested", "one", "plain"]
        g = await c2.get_dataset("one")
        assert g.client is c2 and await g == 2
        assert await c2.get_dataset("plain") == [1, 2, 3]
        assert await (await c2.get_dataset("nested"))["f"] == 3
        with pytest.raises(KeyError, match="'one' already exists"):
            await c2.publish_dataset(one=5)
        await c2.publish_dataset(one=5, override=True)
        assert await c1.get_dataset("one") == 5
        await c1.unpublish_dataset("one")
        with pytest.raises(KeyError, match="'one' not found"):
            await c2.get_dataset("one")
        assert await c2.get_dataset("one", default=None) is None
        with pytest.raises(KeyError, match="not found"):
            await c2.unpublish_dataset("one")
        with pytest.raises(TypeError, match="needs a synchronous client"):
            c1.datasets["plain"]

    async_pair(t)


def test_bad_calls(sync_cluster):
    c = sync_cluster.c1
    with pytest.raises(ValueError, match="needs name="):
        c.publish_dataset(1)
    with pytest.raises(ValueError, match="needs something"):
        c.publish_dataset()
    with pytest.raises(TypeError, match="dataset name must be a non-empty string"):
        c.publish_dataset(1, name=5)


def test_dataset_outlives_its_publisher_until_unpublished(async_pair):
    async def t(c1, c2, s, ws):
        c3 = await Client(s.address, asynchronous=True, set_as_default=False)
        f = c3.submit(inc, 41, pure=False)
        key = f.key
        await c3.publish_dataset(answer=f)
        del f
        await c3.close()
        gc.collect()
        await asyncio.sleep(0.1)
        assert key in s.state.tasks
        g = await c1.get_dataset("answer")
        assert await g == 42
        await c2.unpublish_dataset("answer")
        del g
        gc.collect()
        for _ in range(100):
            if key not in s.state.tasks:
                break
            await asyncio.sleep(0.02)
        assert key not in s.state.tasks

    async_pair(t)


def test_mapping_and_tasks(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    c1.datasets["m"] = c1.submit(inc, 7, pure=False)
    assert "m" in c2.datasets and len(c2.datasets) >= 1
    assert c2.datasets["m"].result(timeout=5) == 8
    assert c1.submit(read_dataset, "m", pure=False).result(timeout=10) == 8
    with pytest.raises(KeyError, match="already exists"):
        c2.datasets["m"] = 1                 # as dask: setting is publishing, no override
    del c2.datasets["m"]
    assert "m" not in c1.list_datasets()


def test_persisted_dask_collection(sync_cluster):
    da = import_required("dask.array", "the [dask] extra")
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    x = c1.persist(da.arange(20, chunks=5) + 1)
    c1.publish_dataset(x, name="array")
    del x
    gc.collect()
    y = c2.get_dataset("array")
    assert c2.compute(y.sum()).result(timeout=10) == sum(range(1, 21))
    c2.unpublish_dataset("array")
