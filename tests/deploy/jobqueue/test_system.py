"""The batch system layer without a batch system (deploy/jobqueue/system.py, slurm.py).

SLURM's parsers are fed realistic sbatch/squeue output; the poller, the submission gate
and `run()` work against harmless real commands (`printf`, `sh -c`, `true`) put in place
of squeue/sbatch/scancel by a subclass. No SLURM, nothing slow.
"""
import asyncio
import copy

import pytest

from taskcore.deploy.jobqueue.system import BatchCommandError, BatchSystem, JobInfo, JobState
from taskcore.deploy.jobqueue.slurm import SLURM
from taskcore.testing import run


class FakeSLURM(SLURM):
    """SLURM whose commands are printf: `squeue` prints `self.squeue_out`, `sbatch` prints
    `self.sbatch_out`, `scancel` succeeds and remembers its ids."""

    def __init__(self, **kwargs):
        kwargs.setdefault("poll_interval", 3600)  # the background poller never gets a turn
        super().__init__(**kwargs)
        self.squeue_out = ""
        self.sbatch_out = ""
        self.status_calls = []
        self.cancelled = []

    def status_argv(self, job_ids):
        self.status_calls.append(list(job_ids))
        return ["printf", "%s", self.squeue_out]

    def submit_argv(self, script_path):
        return ["printf", "%s", self.sbatch_out]

    def cancel_argv(self, job_ids):
        self.cancelled.append(list(job_ids))
        return ["true"]


def add_jobs(system, **states):
    """JobInfo objects straight into system.jobs: {job_id: JobState name}."""
    for job_id, state in states.items():
        info = system.jobs[job_id] = JobInfo(job_id)
        if state != "pending":
            info.update(JobState[state])


# ---------------------------------------------------------------------------------------------
# parse_job_id
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("123", "123"),
    ("123\n", "123"),
    ("123;cluster\n", "123"),          # --parsable on a multi-cluster site
    ("  789 ; c1 \n", "789"),
    ("sbatch: note\n456\n", "456"),    # the id is the last line
    ("Submitted batch job 5\n", "5"),  # a site wrapper that ignores --parsable
])
def test_parse_job_id(out, job_id):
    assert SLURM().parse_job_id(out) == job_id


@pytest.mark.parametrize("out", [
    "", "\n", "abc", "12a", "Submitted batch job x",
])
def test_parse_job_id_refuses_anything_else(out):
    with pytest.raises(ValueError, match=r"sbatch printed no job id"):
        SLURM().parse_job_id(out)


def test_submit_argv_is_parsable():
    s = SLURM(submit_options=["--qos=low"])
    assert s.submit_argv("/tmp/j.sh") == ["sbatch", "--parsable", "--qos=low", "/tmp/j.sh"]
    assert s.test_argv("/tmp/j.sh") == ["sbatch", "--test-only", "--qos=low", "/tmp/j.sh"]
    assert s.cancel_argv(["1", "2"]) == ["scancel", "1", "2"]


def test_status_argv_lists_all_of_the_users_jobs(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    assert SLURM().status_argv(["1", "2"]) == [
        "squeue", "--noheader", "--states=all", "--user=alice", "--format=%i|%T|%r"]


# ---------------------------------------------------------------------------------------------
# parse_status
# ---------------------------------------------------------------------------------------------

SQUEUE = """\
101|PENDING|Resources
102|PENDING|None
103|RUNNING|None
104|COMPLETING|None
105|COMPLETED|None
106|CANCELLED|None
107|FAILED|NonZeroExitCode
108|TIMEOUT|TimeLimit
109|NODE_FAIL|NodeDown
  110|CONFIGURING|None  \n\
111|SUSPENDED|
112|OUT_OF_MEMORY|OutOfMemory
113|PREEMPTED|None
114|REQUEUED|BeginTime
115_3|RUNNING|None

garbage without separators
116|RUNNING
"""


def test_parse_status():
    seen = SLURM().parse_status(SQUEUE)
    assert seen == {
        "101": (JobState.pending, "PENDING", "Resources"),
        "102": (JobState.pending, "PENDING", None),
        "103": (JobState.running, "RUNNING", None),
        "104": (JobState.running, "COMPLETING", None),
        "105": (JobState.done, "COMPLETED", None),
        "106": (JobState.failed, "CANCELLED", None),
        "107": (JobState.failed, "FAILED", "NonZeroExitCode"),
        "108": (JobState.failed, "TIMEOUT", "TimeLimit"),
        "109": (JobState.failed, "NODE_FAIL", "NodeDown"),
        "110": (JobState.pending, "CONFIGURING", None),
        "111": (JobState.running, "SUSPENDED", None),
        "112": (JobState.failed, "OUT_OF_MEMORY", "OutOfMemory"),
        "113": (JobState.failed, "PREEMPTED", None),
        "114": (JobState.pending, "REQUEUED", "BeginTime"),
        "115_3": (JobState.running, "RUNNING", None),
        "116": (JobState.running, "RUNNING", None),
    }


def test_parse_status_empty():
    assert SLURM().parse_status("") == {}
    assert SLURM().parse_status("\n\n") == {}


def test_job_state_ended():
    assert {s for s in JobState if s.ended} == {JobState.done, JobState.failed, JobState.gone}
    assert not JobState.held.ended
    assert not JobState.pending.ended
    assert not JobState.running.ended
    assert str(JobState.running) == "running"
    assert JobState("failed") is JobState.failed


def test_batch_system_is_abstract():
    with pytest.raises(TypeError):
        BatchSystem()


# ---------------------------------------------------------------------------------------------
# JobInfo, counts and the submission gate
# ---------------------------------------------------------------------------------------------

def test_job_info_update():
    async def main():
        info = JobInfo("1")
        assert (info.state, info.native, info.reason, info.running_since) == (
            JobState.pending, None, None, None)
        event = info.event
        assert info.update(JobState.pending, "PENDING", "Priority")
        assert event.is_set() and info.event is not event  # a fresh event per change
        since = info.since
        assert info.update(JobState.pending, "PENDING", "Resources")  # a new reason is news
        assert info.since == since  # ...but the state has not changed since then
        assert not info.update(JobState.pending, "PENDING", "Resources")  # nothing new
        assert info.update(JobState.running, "RUNNING")
        started = info.running_since
        assert started is not None
        assert info.update(JobState.running, "COMPLETING")
        assert info.running_since == started  # the first start counts
        assert info.update(JobState.done, "COMPLETED")

    run(main())


def test_counts():
    async def main():
        s = SLURM()
        add_jobs(s, a="pending", b="pending", c="running", d="done", e="failed", f="gone")
        s._held = 2
        assert s.counts() == {"held": 2, "pending": 2, "running": 1, "done": 1, "failed": 1,
                              "gone": 1}

    run(main())


def test_can_submit_without_limits():
    async def main():
        s = SLURM()
        add_jobs(s, **{str(i): "pending" for i in range(50)})
        assert s.can_submit()

    run(main())


def test_max_jobs_queued():
    async def main():
        s = SLURM(max_jobs_queued=2)
        add_jobs(s, a="pending", b="running", c="running", d="failed")
        assert s.can_submit()  # 1 pending < 2; running jobs do not count
        add_jobs(s, e="pending")
        assert not s.can_submit()  # 2 pending
        s.jobs["e"].update(JobState.running, "RUNNING")
        assert s.can_submit()

    run(main())


def test_max_jobs_running_counts_pending_and_running():
    async def main():
        s = SLURM(max_jobs_running=3)
        add_jobs(s, a="pending", b="running", c="done", d="gone")
        assert s.can_submit()  # 2 < 3; ended jobs do not count
        add_jobs(s, e="running")
        assert not s.can_submit()  # 1 pending + 2 running
        s.jobs["b"].update(JobState.done, "COMPLETED")
        assert s.can_submit()

    run(main())


def test_reserve_counts_submissions_in_flight():
    async def main():
        s = SLURM(max_jobs_queued=2)
        add_jobs(s, a="pending")
        assert s.reserve()  # 1 pending + 0 in flight < 2
        assert not s.reserve()  # 1 pending + 1 in flight
        assert not s.can_submit()
        s.release()
        assert s.can_submit()
        assert s.reserve()
        s.release()
        assert s._submitting == 0

    run(main())


def test_reserve_without_limits_always_succeeds():
    async def main():
        s = SLURM()
        assert all(s.reserve() for _ in range(10))
        for _ in range(10):
            s.release()
        assert s._submitting == 0

    run(main())


# ---------------------------------------------------------------------------------------------
# poll() against a printf "squeue"
# ---------------------------------------------------------------------------------------------

def test_poll_updates_every_job_in_one_command():
    async def main():
        s = FakeSLURM()
        add_jobs(s, **{"1": "pending", "2": "pending", "3": "running", "4": "pending",
                       "5": "done"})
        s.squeue_out = ("1|RUNNING|None\n2|PENDING|Priority\n3|CANCELLED|None\n"
                        "99|RUNNING|None\n")  # 99: someone else's job of this user
        await s.poll()
        assert s.polls == 1
        assert s.status_calls == [["1", "2", "3", "4"]]  # ended jobs are not asked about
        j = s.jobs
        assert (j["1"].state, j["1"].native) == (JobState.running, "RUNNING")
        assert j["1"].running_since is not None
        assert (j["2"].state, j["2"].native, j["2"].reason) == (
            JobState.pending, "PENDING", "Priority")
        assert (j["3"].state, j["3"].native) == (JobState.failed, "CANCELLED")
        # Missing from the output: gone (SLURM has no vanish grace).
        assert (j["4"].state, j["4"].native, j["4"].reason) == (
            JobState.gone, None, "no longer in the queue")
        assert j["5"].state is JobState.done
        assert "99" not in j
        await s.close()

    run(main())


def test_poll_without_live_jobs_runs_nothing():
    async def main():
        s = FakeSLURM()
        await s.poll()
        add_jobs(s, a="done", b="gone")
        await s.poll()
        assert s.polls == 0 and s.status_calls == []

    run(main())


def test_poll_wakes_a_job_waiting_for_its_state():
    async def main():
        s = FakeSLURM()
        add_jobs(s, **{"7": "pending"})
        info = s.jobs["7"]

        async def follow():
            while not info.state.ended:
                await info.event.wait()
            return info.native

        follower = asyncio.ensure_future(follow())
        s.squeue_out = "7|RUNNING|None\n"
        await s.poll()
        await asyncio.sleep(0)
        assert not follower.done()
        s.squeue_out = "7|TIMEOUT|TimeLimit\n"
        await s.poll()
        assert await asyncio.wait_for(follower, 5) == "TIMEOUT"
        assert info.reason == "TimeLimit"

    run(main())


def test_vanish_grace_keeps_a_job_for_a_while():
    async def main():
        s = FakeSLURM()
        s.vanish_grace = 3600
        add_jobs(s, a="running")
        await s.poll()
        assert s.jobs["a"].state is JobState.running
        assert "a" in s._missing
        s.squeue_out = "a|RUNNING|None\n"
        await s.poll()
        assert "a" not in s._missing  # seen again: the clock starts over

    run(main())


def test_gate_wakes_wait_for_slot_when_a_pending_job_starts():
    async def main():
        s = FakeSLURM(max_jobs_queued=1)
        add_jobs(s, **{"1": "pending"})
        waiter = asyncio.ensure_future(s.wait_for_slot())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        assert s.counts()["held"] == 1
        s.squeue_out = "1|PENDING|Priority\n"
        await s.poll()  # nothing changed: still waiting
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        s.squeue_out = "1|RUNNING|None\n"
        await s.poll()
        await asyncio.wait_for(waiter, 5)
        assert s._submitting == 1  # the slot is reserved for the caller
        assert s.counts()["held"] == 0
        assert not s.can_submit()  # the reserved slot counts as pending
        s.release()
        assert s.can_submit()
        await s.close()

    run(main())


def test_forget_wakes_the_gate():
    async def main():
        s = FakeSLURM(max_jobs_running=1)
        add_jobs(s, a="running")
        waiter = asyncio.ensure_future(s.wait_for_slot())
        await asyncio.sleep(0)
        assert not waiter.done()
        s.forget("a")
        await asyncio.wait_for(waiter, 5)
        s.release()
        await s.close()

    run(main())


def test_background_poller_runs_one_command_per_interval():
    async def main():
        s = FakeSLURM(poll_interval=0.01)
        s.squeue_out = "1|RUNNING|None\n2|RUNNING|None\n"
        s.watch("1")
        s.watch("2")
        while s.jobs["1"].state is not JobState.running:
            await asyncio.sleep(0.01)
        s.squeue_out = "1|COMPLETED|None\n"
        while not (s.jobs["1"].state.ended and s.jobs["2"].state.ended):
            await asyncio.sleep(0.01)
        assert s.jobs["1"].state is JobState.done
        assert s.jobs["2"].state is JobState.gone
        assert all(len(ids) <= 2 for ids in s.status_calls)
        assert s.polls == len(s.status_calls)
        await s.close()
        assert s._poller is None

    run(main())


def test_poller_survives_a_failing_status_command():
    async def main():
        class Flaky(FakeSLURM):
            def status_argv(self, job_ids):
                self.status_calls.append(list(job_ids))
                if len(self.status_calls) == 1:
                    return ["sh", "-c", "echo 'slurm_load_jobs error: timeout' >&2; exit 1"]
                return super().status_argv(job_ids)

        s = Flaky(poll_interval=0.01)
        s.squeue_out = "1|RUNNING|None\n"
        info = s.watch("1")
        while info.state is not JobState.running:
            await asyncio.sleep(0.01)
        assert len(s.status_calls) >= 2
        await s.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# submit, cancel, watch, forget with printf commands
# ---------------------------------------------------------------------------------------------

def test_submit_reads_the_job_id_and_follows_the_job():
    async def main():
        s = FakeSLURM()
        s.sbatch_out = "4242;cluster\n"
        job_id = await s.submit("/nonexistent/job.sh")
        assert job_id == "4242"
        assert s.jobs["4242"].state is JobState.pending
        assert s.max_pending_seen == 1
        assert s._poller is not None and not s._poller.done()
        await s.close()
        assert s._poller is None

    run(main())


def test_submit_with_unparsable_output():
    async def main():
        s = FakeSLURM()
        s.sbatch_out = "queued, id to follow\n"
        with pytest.raises(BatchCommandError, match="printed no job id we can read"):
            await s.submit("/x.sh")
        assert s.jobs == {}

    run(main())


def test_cancel():
    async def main():
        s = FakeSLURM()
        await s.cancel(["1", None, "", "2"])
        await s.cancel([])
        await s.cancel([None])
        assert s.cancelled == [["1", "2"]]

    run(main())


def test_cancels_in_one_loop_turn_are_one_command():
    async def main():
        s = FakeSLURM()
        await asyncio.gather(*(s.cancel_batched(str(i)) for i in range(5)))
        await s.cancel_batched("9")  # a later turn: a command of its own
        assert s.cancelled == [["0", "1", "2", "3", "4"], ["9"]]

    run(main())


def test_watch_and_forget():
    async def main():
        s = FakeSLURM()
        info = s.watch("31")
        assert s.watch("31") is info
        assert info.state is JobState.pending
        s._missing["31"] = 0.0
        s.forget("31")
        s.forget("31")  # twice is fine
        assert s.jobs == {} and s._missing == {}
        await s.close()

    run(main())


def test_validate_runs_test_argv():
    async def main():
        class Rejecting(FakeSLURM):
            def test_argv(self, script_path):
                return ["sh", "-c", "echo 'sbatch: error: invalid partition specified: x' >&2;"
                                    " exit 1"]

        with pytest.raises(BatchCommandError, match="invalid partition specified: x"):
            await Rejecting().validate("/x.sh")

        class NoTest(FakeSLURM):
            def test_argv(self, script_path):
                return None

        await NoTest().validate("/x.sh")  # nothing to run

    run(main())


# ---------------------------------------------------------------------------------------------
# run()
# ---------------------------------------------------------------------------------------------

def test_run_returns_stdout():
    async def main():
        assert await SLURM().run(["printf", "%s", "a|b\n"], "testing") == "a|b\n"
        assert await SLURM().run(["printf", "%s", 42], "testing") == "42"  # argv as str

    run(main())


def test_run_failing_command_carries_stderr():
    async def main():
        with pytest.raises(BatchCommandError) as info:
            await SLURM().run(["sh", "-c", "echo ignored; echo 'sbatch: error: Batch job "
                                           "submission failed' >&2; exit 3"],
                              "submitting a job")
        assert str(info.value) == ("submitting a job: sh failed (exit status 3): sbatch: "
                                   "error: Batch job submission failed")

    run(main())


def test_run_failing_command_without_stderr_carries_stdout():
    async def main():
        with pytest.raises(BatchCommandError, match=r"\(exit status 1\): only on stdout$"):
            await SLURM().run(["sh", "-c", "echo only on stdout; exit 1"], "x")

    run(main())


def test_run_missing_command():
    async def main():
        with pytest.raises(BatchCommandError) as info:
            await SLURM().run(["taskcore-no-such-squeue", "--noheader"], "polling job states")
        assert str(info.value) == (
            "polling job states: cannot run 'taskcore-no-such-squeue' (No such file or "
            "directory); is SLURM installed and on PATH?")

    run(main())


def test_run_timeout():
    async def main():
        s = SLURM(command_timeout=0.2)
        with pytest.raises(BatchCommandError, match=r"polling: sleep 30 did not answer within "
                                                    r"0.2 s"):
            await s.run(["sleep", "30"], "polling")

    run(main())


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------

def test_record_round_trip_one_object_per_context():
    s = SLURM(poll_interval=5, command_timeout=30, max_jobs_queued=4, max_jobs_running=8,
              submit_options=["--qos=low"])
    record = s.record()
    assert record == {"poll_interval": 5, "command_timeout": 30, "max_jobs_queued": 4,
                      "max_jobs_running": 8, "submit_options": ["--qos=low"],
                      "command_prefix": []}
    context = {}
    restored = SLURM.from_record(record, context)
    assert type(restored) is SLURM and restored is not s
    assert restored.record() == record
    assert SLURM.from_record(record, context) is restored  # shared within one context
    assert SLURM.from_record(record, {}) is not restored  # a new context, a new object
    assert context["batch_systems"] == {SLURM: restored}


def test_record_defaults():
    record = SLURM().record()
    assert record == {"poll_interval": 2.0, "command_timeout": 60, "max_jobs_queued": None,
                      "max_jobs_running": None, "submit_options": [],
                      "command_prefix": []}
    assert SLURM.from_record(record, {}).record() == record


def test_deepcopy_shares_the_system():
    s = SLURM()
    assert copy.deepcopy(s) is s
    assert copy.deepcopy({"system": s})["system"] is s
