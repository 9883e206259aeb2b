"""Fixtures for the Kubernetes tests: a started stand-in of Kubernetes (standin/), since no
real kube-apiserver can run on the test machines.

- `kube` (per test) and `kube_module` (per module): a started `StandinKubernetes` with
  KUBECONFIG pointing at it. Pods run with this interpreter's environment: PYTHONPATH
  reaches this checkout's `src`, and PATH starts with the virtualenv's `bin`, so `python`,
  `core-scheduler` and `core-worker` resolve as in an image that has taskcore installed.
- Afterwards the stand-in is stopped, and a pod process that outlived it fails the test.
"""
import os
import pathlib
import sys
import warnings

import pytest

import taskcore

from .standin import StandinKubernetes

SRC = str(pathlib.Path(taskcore.__file__).resolve().parent.parent)
VENV_BIN = str(pathlib.Path(sys.executable).parent)


def pod_env() -> dict:
    pythonpath = [SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
            "PATH": os.pathsep.join([VENV_BIN, os.environ.get("PATH", os.defpath)])}


def _stop(k: StandinKubernetes) -> None:
    k.stop()
    for problem in k.stop_problems:
        # The stand-in's own shutdown hung somewhere: say where, loudly. What matters to
        # the code under test, that no pod process survives, is checked just below.
        warnings.warn(problem, RuntimeWarning)
    if k.leaked:
        pytest.fail(f"pod processes outlived the Kubernetes stand-in (now killed): {k.leaked}")


@pytest.fixture
def kube(tmp_path, monkeypatch):
    k = StandinKubernetes(tmp_path, pod_env=pod_env())
    k.start()
    monkeypatch.setenv("KUBECONFIG", k.kubeconfig)
    yield k
    _stop(k)


@pytest.fixture(scope="module")
def kube_module(tmp_path_factory):
    k = StandinKubernetes(tmp_path_factory.mktemp("kube"), pod_env=pod_env())
    k.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", k.kubeconfig)
        yield k
    _stop(k)
