"""get_versions and check=True, including a real version mismatch between processes."""
import sys
import textwrap

import pytest

from taskcore import Client, LocalCluster, versions
from taskcore.testing import cluster, run


def test_get_versions_shape_here():
    v = versions.get_versions(packages=["json"])
    assert set(v) == {"host", "packages"}
    for k in ("python", "python-bits", "OS", "OS-release", "machine"):
        assert k in v["host"]
    p = v["packages"]
    import cloudpickle
    import msgpack

    import taskcore

    assert p["taskcore"] == taskcore.__version__
    assert p["cloudpickle"] == cloudpickle.__version__
    assert p["msgpack"] == msgpack.__version__ if hasattr(msgpack, "__version__") else True
    assert p["python"] == ".".join(map(str, sys.version_info))
    for name in ("uvloop", "lz4", "numpy", "psutil", "dask", "distributed"):
        assert name in p
    assert "json" in p                     # a requested package, imported to ask it
    assert versions.version_of("surely_not_a_package_xyz", import_it=True) is None
    with pytest.raises(ValueError, match="package names"):
        versions.get_versions(packages=[3])


def test_error_message_table():
    rows = [("cloudpickle", "3.1.3", "3.1.3", {"tcp://a:1": "3.1.3", "tcp://b:1": "0.9"}),
            ("msgpack", "1.0", "1.1", {"tcp://a:1": "1.1"})]
    text = versions.error_message(rows)
    assert text.startswith("Mismatched versions found")
    assert "| cloudpickle | 3.1.3  | 3.1.3     | tcp://a:1: 3.1.3, tcp://b:1: 0.9 |" in text
    assert "| msgpack     | 1.0    | 1.1       | 1.1" in text


def test_client_get_versions_matching_cluster_passes_check():
    async def main():
        async with cluster(n_workers=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                v = await c.get_versions(check=True, packages=["json"])
                assert set(v) == {"scheduler", "workers", "client"}
                assert set(v["workers"]) == {w.address for w in ws}
                for part in (v["scheduler"], v["client"], *v["workers"].values()):
                    assert set(part) == {"host", "packages"}
                    assert "json" in part["packages"]
                with pytest.raises(ValueError, match="package names"):
                    await c.get_versions(packages=[""])

    run(main())


SHIM = '''
# A stand-in for cloudpickle reporting another version: it runs the installed
# cloudpickle under its own name and changes nothing else.
import importlib.machinery, importlib.util, os, sys
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
_spec = importlib.machinery.PathFinder.find_spec("cloudpickle", _path)
_real = importlib.util.module_from_spec(_spec)
sys.modules["cloudpickle"] = _real
_spec.loader.exec_module(_real)
_real.__version__ = "0.0.1+shim"
'''


def test_check_raises_on_a_real_mismatch(tmp_path, monkeypatch):
    """The worker process runs with PYTHONPATH holding (a) a cloudpickle that reports
    another version and (b) another version of a package the client has too."""
    shim = tmp_path / "worker_path"
    (shim / "cloudpickle").mkdir(parents=True)
    (shim / "cloudpickle" / "__init__.py").write_text(textwrap.dedent(SHIM))
    (shim / "tc_version_probe").mkdir()
    (shim / "tc_version_probe" / "__init__.py").write_text('__version__ = "2.0"\n')
    mine = tmp_path / "client_path"
    (mine / "tc_version_probe").mkdir(parents=True)
    (mine / "tc_version_probe" / "__init__.py").write_text('__version__ = "1.0"\n')
    monkeypatch.syspath_prepend(str(mine))
    with LocalCluster(n_workers=1, threads_per_worker=1, env={"PYTHONPATH": str(shim)}) as cl, \
            Client(cl) as c:
        (addr,) = c.scheduler_info()["workers"]
        v = c.get_versions(packages=["tc_version_probe"])
        assert v["workers"][addr]["packages"]["cloudpickle"] == "0.0.1+shim"
        assert v["workers"][addr]["packages"]["tc_version_probe"] == "2.0"
        assert v["client"]["packages"]["tc_version_probe"] == "1.0"
        assert v["scheduler"]["packages"]["tc_version_probe"] is None
        # the shimmed worker really works
        assert c.submit(lambda x: x + 1, 1).result() == 2
        with pytest.raises(ValueError) as e:
            c.get_versions(check=True, packages=["tc_version_probe"])
        text = str(e.value)
        assert "Mismatched versions found" in text
        import cloudpickle

        assert "cloudpickle" in text and "0.0.1+shim" in text and cloudpickle.__version__ in text
        assert "tc_version_probe" in text and "| 1.0" in text and "2.0" in text
        # without the probe, only cloudpickle differs
        with pytest.raises(ValueError) as e:
            c.get_versions(check=True)
        assert "cloudpickle" in str(e.value) and "tc_version_probe" not in str(e.value)
