"""Published datasets: named values that every client of the cluster can get.

`client.publish_dataset(*args, name=None, override=False, **kwargs)`,
`get_dataset(name, default=...)`, `list_datasets()`, `unpublish_dataset(name)` and the
`client.datasets` mapping. A dataset is any picklable value: Futures, lists of them,
collections persisted on the cluster, plain values. The Futures inside are kept alive by
the scheduler until the dataset is unpublished, so a dataset outlives the client that
published it; `get_dataset` returns a copy whose Futures belong to the calling client.
"""
from __future__ import annotations

from collections.abc import MutableMapping

from taskcore.coordination.extension import Extension, call, expect_name, pack, unpack

__all__ = ["DatasetExtension", "Datasets", "publish", "get", "list_names", "unpublish"]

_NO_DEFAULT = object()


class DatasetExtension(Extension):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.datasets: dict = {}

    def rpc_put(self, peer, datasets, override=False):
        """Publish {name: packed value} all or nothing."""
        for name in datasets:
            expect_name(name, "dataset name")
            if not override and name in self.datasets:
                raise KeyError(f"dataset {name!r} already exists (override=True replaces it)")
        for name, value in datasets.items():
            self.keys.hold(value["keys"])
            old = self.datasets.get(name)
            self.datasets[name] = value
            if old is not None:
                self.keys.release(old["keys"])

    def rpc_get(self, peer, name):
        value = self.datasets.get(expect_name(name, "dataset name"))
        if value is not None:
            self.keys.give(peer, value["keys"])
        return value

    def rpc_delete(self, peer, name):
        value = self.datasets.pop(expect_name(name, "dataset name"), None)
        if value is None:
            raise KeyError(f"dataset {name!r} not found")
        self.keys.release(value["keys"])

    def rpc_list(self, peer):
        return sorted(self.datasets)


async def publish(client, datasets, override=False):
    await call(client, "datasets.put", datasets={n: pack(v) for n, v in datasets.items()},
               override=bool(override))


async def get(client, name, default=_NO_DEFAULT):
    packed = await call(client, "datasets.get", name=name)
    if packed is None:
        if default is _NO_DEFAULT:
            raise KeyError(f"dataset {name!r} not found")
        return default
    return unpack(client, packed)


async def list_names(client):
    return list(await call(client, "datasets.list"))


async def unpublish(client, name):
    await call(client, "datasets.delete", name=name)


class Datasets(MutableMapping):
    """`client.datasets`: the published datasets as a mapping (sync clients only; an
    asynchronous client awaits the `*_dataset` methods)."""

    def __init__(self, client):
        self._client = client

    def _check(self, what):
        if self._client.asynchronous:
            raise TypeError(f"client.datasets {what} needs a synchronous client; await "
                            f"client.get_dataset / publish_dataset / unpublish_dataset / "
                            f"list_datasets instead")

    def __getitem__(self, name):
        self._check("[name]")
        return self._client.get_dataset(name)

    def __setitem__(self, name, value):
        self._check("[name] = value")
        self._client.publish_dataset(value, name=name)     # as dask: no override

    def __delitem__(self, name):
        self._check("del [name]")
        self._client.unpublish_dataset(name)

    def __iter__(self):
        self._check("iteration")
        return iter(self._client.list_datasets())

    def __len__(self):
        self._check("len()")
        return len(self._client.list_datasets())

    def __contains__(self, name):
        self._check("`in`")
        return name in self._client.list_datasets()

    def __repr__(self):
        return f"<Datasets of {self._client!r}>"
