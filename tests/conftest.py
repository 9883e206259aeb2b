"""Test configuration shared by every layer's tests."""
import os

from hypothesis import HealthCheck, settings

# CI gets more examples; local runs stay quick.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_sessionstart(session):
    from taskcore.testing import stale_extensions

    stale = stale_extensions()
    if stale:
        import pytest

        pytest.exit(f"compiled modules are older than their sources {stale}: rebuild with "
                    "`pip install --no-build-isolation -e .` (scripts/test.sh does)", returncode=2)
