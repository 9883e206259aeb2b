"""Test configuration shared by every layer's tests."""
import types

import pytest
from hypothesis import HealthCheck, settings

from taskcore.testing import IN_CI, import_required, require

# CI gets more examples; local runs stay quick.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if IN_CI else "dev")


# ---------------------------------------------------------------------------------------------
# The real servers and client. Outside CI a module that cannot be imported skips the tests
# that need it (with the import error as the reason); under CI=true it fails them, with the
# traceback (taskcore.testing.import_required), so a scheduler that stopped importing can
# never pass CI as a row of skips.
# ---------------------------------------------------------------------------------------------

def _import_class(module, name):
    mod = import_required(module)
    cls = getattr(mod, name, None)
    require(cls is not None, f"{module} has no {name}")
    return cls


@pytest.fixture
def real_servers():
    """The real server classes, `real_servers.Scheduler` and `real_servers.Worker`."""
    return types.SimpleNamespace(Scheduler=_import_class("taskcore.scheduler", "Scheduler"),
                                 Worker=_import_class("taskcore.worker", "Worker"))


@pytest.fixture
def real_client():
    """The real `Client` class (taskcore.client), imported like `real_servers`."""
    return _import_class("taskcore.client", "Client")


def pytest_sessionstart(session):
    from taskcore.testing import stale_extensions

    stale = stale_extensions()
    if stale:
        import pytest

        pytest.exit(f"compiled modules are older than their sources {stale}: rebuild with "
                    "`scripts/build.sh` (scripts/test.sh does)", returncode=2)
