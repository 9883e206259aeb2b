"""Specs as data (deploy/specdata.py) and backends found by entry point (deploy/registry.py)."""
import pytest

from taskcore.deploy import registry, specdata
from taskcore.deploy.launched import LaunchedWorker, LocalTarget
from taskcore.deploy.local import LocalCluster
from taskcore.deploy.ssh import SSHCluster, SSHTarget
from taskcore.nanny import Nanny
from taskcore.security import Security


def test_round_trip_of_classes_plain_values_and_shared_objects():
    target = LocalTarget(python="/usr/bin/python3")
    spec = {"cls": LaunchedWorker, "options": {"target": target, "nthreads": 2,
                                               "resources": {"GPU": 1}, "env": {"A": "1"},
                                               "args": ("x", 1)},
            "group": ["-0", "-1"]}
    data = specdata.dump(spec)
    assert data["cls"] == {"$class": "taskcore.deploy.launched.LaunchedWorker"}
    assert data["options"]["target"] == {"$object": "taskcore.deploy.launched.LocalTarget",
                                         "record": {"kind": "local",
                                                    "python": "/usr/bin/python3"}}
    context = {}
    back = specdata.load(data, context)
    assert back["cls"] is LaunchedWorker
    assert isinstance(back["options"]["target"], LocalTarget)
    assert back["options"]["target"].python == "/usr/bin/python3"
    assert back["options"]["args"] == ["x", 1]
    # a shared object is rebuilt once per context
    again = specdata.load(data, context)
    assert again["options"]["target"] is back["options"]["target"]


def test_ssh_targets_take_the_rebuilding_pool_and_overrides():
    t = SSHTarget("h1", {"username": "u", "password": "secret"}, "/opt/py")
    data = specdata.dump({"target": t})
    assert "secret" not in repr(data)  # never stored
    pool = object()
    back = specdata.load(data, {"ssh_pool": pool,
                                "connect_options": {"h1": {"username": "u", "password": "p"}}})
    assert back["target"].pool is pool
    assert back["target"].connect_options["password"] == "p"
    assert back["target"].python == "/opt/py"


def test_what_cannot_be_stored_is_named():
    with pytest.raises(TypeError, match=r"spec.options.security: a Security cannot be stored"):
        specdata.dump({"options": {"security": Security.temporary()}})
    with pytest.raises(TypeError, match="not a string"):
        specdata.dump({1: "x"})

    def local():
        return None
    with pytest.raises(TypeError, match="not importable"):
        specdata.dump({"f": local})
    assert specdata.dump({"cls": Nanny}) == {"cls": {"$class": "taskcore.nanny.Nanny"}}


def test_backends_are_entry_points():
    found = registry.backends()
    assert {"local", "ssh"} <= set(found)
    assert found["local"].load() is LocalCluster and found["ssh"].load() is SSHCluster
    assert registry.backend_class({"name": "x", "backend": "ssh"}) is SSHCluster
    # an entry without a known backend falls back to its dotted class
    assert registry.backend_class({"name": "x", "backend": "nosuch",
                                   "cls": "taskcore.deploy.local.LocalCluster"}) is LocalCluster
    with pytest.raises(TypeError, match="cannot be imported here"):
        registry.backend_class({"name": "x", "cls": "nosuch_pkg.Cluster"})
