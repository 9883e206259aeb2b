"""The controller's idle accounting, without Kubernetes: `scheduler_view` (it runs inside
the scheduler) counts the idle time on the scheduler's clock, and a view the controller
could not get neither deletes the cluster nor restarts the count. The whole controller runs
against the stand-in in test_kube_cluster.py."""
import time

from taskcore.deploy.kubernetes.controller import Controller, scheduler_view


class State:
    def __init__(self):
        self.busy_workers = {}

    def worker_info(self):
        return {"tcp://10.0.0.5:1": {"name": "w1", "processing": 0, "nbytes": 10}}

    def processing(self):
        return self.busy_workers

    def adaptive_target(self, target_duration):
        return 1


class FakeScheduler:
    """What scheduler_view reads of a Scheduler."""

    def __init__(self):
        self.state = State()
        self.clients = {}
        self._last_activity = time.monotonic()   # the Scheduler's: a client came or went


def test_the_scheduler_counts_its_own_idle_time():
    s = FakeScheduler()
    s._last_activity -= 30
    view = scheduler_view(s)
    assert not view["busy"] and view["idle_for"] >= 30 and view["clients"] == 0
    assert view["workers"] == {"w1": {"address": "tcp://10.0.0.5:1", "processing": 0,
                                      "nbytes": 10}}
    s.clients["c1"] = object()                   # a client: busy, and the count restarts
    view = scheduler_view(s)
    assert view["busy"] and view["idle_for"] == 0 and view["clients"] == 1
    del s.clients["c1"]
    time.sleep(0.05)
    assert 0.04 < scheduler_view(s)["idle_for"] < 5
    s.state.busy_workers = {"tcp://10.0.0.5:1": 2}   # work without a client is busy too
    assert scheduler_view(s)["busy"]
    s.state.busy_workers = {}
    time.sleep(0.05)
    assert 0.04 < scheduler_view(s)["idle_for"] < 5


def test_a_client_that_came_and_went_between_two_views_counts():
    s = FakeScheduler()
    s._last_activity -= 60
    assert scheduler_view(s)["idle_for"] >= 60
    s._last_activity = time.monotonic()          # a client connected and left since
    assert scheduler_view(s)["idle_for"] < 5


def test_a_missing_view_does_not_restart_the_count():
    c = Controller(api=None, only="x")
    key = ("default", "x")
    assert c._idle_for(key, None) == 0.0
    assert c._idle_for(key, {"busy": False, "idle_for": 42.0}) == 42.0
    # A scheduler whose view has no idle count (an older image): timed between views.
    assert c._idle_for(key, {"busy": False}) < 1
    time.sleep(0.05)
    assert c._idle_for(key, {"busy": False}) >= 0.05
    assert c._idle_for(key, None) == 0.0           # unknown: not idle now, count kept
    assert c._idle_for(key, {"busy": False}) >= 0.05
    assert c._idle_for(key, {"busy": True}) == 0.0
    assert c._idle_for(key, {"busy": False}) < 0.05
