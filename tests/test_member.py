"""The cluster-member contract (taskcore/member.py): who is a member, and the defaults."""
import pytest

from taskcore.member import ClusterMember, check_member
from taskcore.nanny import Nanny
from taskcore.process import ProcessInterface, Subprocess
from taskcore.scheduler import Scheduler
from taskcore.worker import Worker
from taskcore.testing import run


def test_servers_and_process_handles_are_members():
    for cls in (Scheduler, Worker, Nanny, ProcessInterface, Subprocess):
        assert issubclass(cls, ClusterMember), cls
    assert Scheduler.role == "scheduler" and Worker.role == "worker" and Nanny.role == "worker"


def test_a_handle_without_the_required_methods_is_refused_clearly():
    class NoFinished(ClusterMember):
        address = None
        status = "created"

        async def start(self):
            return self

        async def close(self):
            return None

    with pytest.raises(TypeError, match="lacks finished"):
        check_member(NoFinished(), "worker 'w'")

    class Duck:  # has everything, but does not declare itself a member
        async def start(self):
            return self

        async def close(self):
            return None

        async def finished(self):
            return None

    with pytest.raises(TypeError, match="does not derive from taskcore.member.ClusterMember"):
        check_member(Duck(), "the scheduler")


def test_optional_hooks_have_defaults():
    async def main():
        p = ProcessInterface(name="w1")
        assert p.worker_names == ["w1"]
        p.address = "tcp://127.0.0.1:1"
        assert p.worker_address == "tcp://127.0.0.1:1"
        assert p.dashboard_address is None
        p.info = {"dashboard_address": "127.0.0.1:8787"}
        assert p.dashboard_address == "127.0.0.1:8787"
        assert await p.fetch_logs() is None
        assert p.record() is None
        assert p.pending is False
        assert p.detach_handle() is None and p.kill() is None
        assert ProcessInterface(name=None).worker_names == []
    run(main())
