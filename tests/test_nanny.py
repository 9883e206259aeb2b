"""Nanny: supervision of a worker process.

Most tests run the nanny against two stand-ins we control completely:
- a fake worker program (FAKE_WORKER below), chosen by `worker_command=`,
  whose behaviour (crash, exit cleanly, eat memory, ignore SIGTERM) is set
  through environment variables passed with the nanny's `env=`;
- `FakeScheduler`, a bare listener that records what the nanny sends and can
  send it requests.
The last tests use the real Scheduler and worker (fixture `real_servers`, tests/conftest.py).
"""
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from taskcore.nanny import Nanny
from taskcore.process import ProcessStartError
from taskcore.testing import run
from taskcore.transports import connect, listen

FAKE_WORKER = r'''
import json, os, signal, sys, time
mode = os.environ.get("FAKE_MODE", "sleep")
state = os.environ["FAKE_STATE"]
try:
    run_no = int(open(state).read())
except (OSError, ValueError):
    run_no = 0
with open(state, "w") as f:
    f.write(str(run_no + 1))
if mode == "fail_start" or (mode == "fail_second_start" and run_no == 1):
    sys.stderr.write("fake worker: cannot start\n")
    sys.exit(4)
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"event": "ready", "role": "worker", "address": f"tcp://127.0.0.1:{20000 + run_no}",
                  "pid": os.getpid(), "name": "fake"}), flush=True)
sys.stderr.write(f"fake worker run {run_no} env={os.environ.get('FAKE_ENV')}\n")
sys.stderr.flush()
if mode == "crash_once" and run_no == 0:
    time.sleep(0.2)
    sys.exit(1)
if mode == "crash_always":
    time.sleep(0.05)
    sys.exit(1)
if mode == "exit0":
    time.sleep(0.2)
    sys.exit(0)
if mode == "alloc" and run_no == 0:
    time.sleep(0.2)
    blob = b"\x01" * (150 * 2**20)  # written, so it is resident
time.sleep(120)
'''


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    state = tmp_path / "runs"

    def make(mode="sleep", **env):
        return dict(worker_command=[sys.executable, str(script)],
                    env={"FAKE_MODE": mode, "FAKE_STATE": str(state), **env})

    make.runs = lambda: int(state.read_text()) if state.exists() else 0
    return make


class FakeScheduler:
    """A stand-in scheduler: records every message, can send requests to the nanny."""

    def __init__(self):
        self.messages = asyncio.Queue()
        self.comms = []
        self.listener = None

    async def start(self, port=0):
        self.listener = await listen(f"tcp://127.0.0.1:{port}", self._handle, role="scheduler")
        self.address = self.listener.contact_address
        return self

    async def _handle(self, comm):
        self.comms.append(comm)
        while True:
            self.messages.put_nowait(await comm.read())

    async def next(self, op, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.messages.get(), max(0.01, deadline - time.monotonic()))
            if msg.get("op") == op:
                return msg

    async def collect(self, ops, timeout=10):
        """The next message of each op in `ops`, whatever order they come in."""
        got = {}
        deadline = time.monotonic() + timeout
        while set(ops) - set(got):
            msg = await asyncio.wait_for(self.messages.get(), max(0.01, deadline - time.monotonic()))
            if msg.get("op") in ops and msg["op"] not in got:
                got[msg["op"]] = msg
        return got

    def send(self, msg):
        self.comms[-1].send(msg)

    async def close(self):
        await self.listener.stop()


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_starts_worker_registers_and_closes(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = Nanny(s.address, name="n1", memory_limit=None, **fake_worker(FAKE_ENV="hello"))
        await n.start()
        assert n.status == "running"
        assert n.address.startswith("tcp://127.0.0.1:")
        assert n.worker_address == "tcp://127.0.0.1:20000"
        pid = n.worker_pid
        assert psutil.Process(pid).ppid() == os.getpid()
        msg = await s.next("register-nanny")
        assert msg == {"op": "register-nanny", "nanny": n.address,
                       "worker": "tcp://127.0.0.1:20000", "name": "n1"}
        await wait_for(lambda: any("env=hello" in line for line in n.logs))
        await n.close()
        assert n.status == "closed"
        assert gone(pid)
        await asyncio.wait_for(n.finished(), 1)
        await n.close()  # idempotent
        await s.close()
    run(main())


def test_restarts_a_crashed_worker_and_reports_the_death(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit=None, **fake_worker("crash_once")) as n:
            first = await s.next("register-nanny")
            died = await s.next("worker-died")
            assert died["worker"] == first["worker"]
            assert "code 1" in died["reason"]
            again = await s.next("register-nanny")
            assert again["worker"] == "tcp://127.0.0.1:20001"
            assert n.worker_address == "tcp://127.0.0.1:20001"
            assert n.restarts == 1 and len(n.deaths) == 1
            assert n.status == "running"
    run(main())


def test_clean_worker_exit_closes_the_nanny(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, **fake_worker("exit0"))
        await asyncio.wait_for(n.finished(), 10)
        assert n.status == "closed"
        assert fake_worker.runs() == 1
        assert "code 0" in (await s.next("worker-died"))["reason"]
    run(main())


def test_no_restart_when_disabled(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, restart=False, **fake_worker("crash_once"))
        await asyncio.wait_for(n.finished(), 10)
        assert fake_worker.runs() == 1
    run(main())


def test_gives_up_after_rapid_failures(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, max_rapid_failures=3, backoff_base=0.01,
                        **fake_worker("crash_always"))
        await asyncio.wait_for(n.finished(), 20)
        assert n.status == "failed"
        assert fake_worker.runs() == 3
    run(main())


def test_first_start_failure_raises_with_the_workers_stderr(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = Nanny(s.address, memory_limit=None, **fake_worker("fail_start"))
        with pytest.raises(ProcessStartError, match="cannot start"):
            await n.start()
        assert n.status == "failed"
        assert n._listener is None
    run(main())


def test_memory_limit_kills_and_restarts(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit="100MiB", memory_poll_interval=0.02,
                         **fake_worker("alloc")) as n:
            first_pid = n.worker_pid
            died = await s.next("worker-died")
            assert "memory limit exceeded" in died["reason"]
            await s.next("register-nanny")  # the initial one
            await wait_for(lambda: n.restarts == 1 and n.worker_pid is not None)
            assert n.worker_pid != first_pid
            assert gone(first_pid)
            await asyncio.sleep(0.3)
            assert n.restarts == 1  # the second run stays under the limit
    run(main())


def test_memory_watch_skips_a_worker_still_starting(fake_worker):
    """While a restarted worker starts it has no pid yet; the memory watch must not
    measure psutil.Process(None), which is the nanny's own (here: this big test
    process), and must keep watching the new worker."""
    async def main():
        import psutil

        limit = psutil.Process().memory_info().rss // 2        # the nanny is over it, a worker is not
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit=limit, memory_poll_interval=0.002,
                         **fake_worker("crash_once")) as n:
            await s.next("worker-died")
            await wait_for(lambda: n.restarts == 1 and n.worker_pid is not None)
            await asyncio.sleep(0.3)
            assert n._kill_reason is None and len(n.deaths) == 1, n.deaths
            assert n.worker_pid is not None
            assert any(t.get_coro().__name__ == "_memory_monitor" for t in n._tasks)
    run(main())


def test_restart_request_from_the_scheduler(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit=None, **fake_worker()) as n:
            await s.next("register-nanny")
            old_pid = n.worker_pid
            s.send({"op": "some-unknown-op"})
            s.send({"op": "restart-worker"})
            got = await s.collect({"worker-restarted", "register-nanny"})
            assert got["worker-restarted"]["worker"] == "tcp://127.0.0.1:20001" == n.worker_address
            assert got["register-nanny"]["worker"] == "tcp://127.0.0.1:20001"
            assert gone(old_pid)
            assert n.worker_pid != old_pid
            # a planned restart is not a death
            assert n.deaths == []
    run(main())


def test_close_request_from_the_scheduler(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, **fake_worker())
        await s.next("register-nanny")
        pid = n.worker_pid
        s.send({"op": "close"})
        await asyncio.wait_for(n.finished(), 10)
        assert gone(pid)
    run(main())


def test_requests_on_the_nannys_own_address(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit=None, **fake_worker()) as n:
            comm = await connect(n.address, role="scheduler")
            comm.send({"op": "identity"})
            ident = await comm.read()
            assert ident["type"] == "Nanny" and ident["worker"] == n.worker_address
            comm.send({"op": "restart-worker"})
            assert (await comm.read())["worker"] == "tcp://127.0.0.1:20001"
            await comm.close()
    run(main())


def test_scheduler_never_there_and_death_timeout(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        address = s.address
        await s.close()  # nothing listens there any more
        t0 = time.monotonic()
        n = await Nanny(address, memory_limit=None, death_timeout=1, **fake_worker())
        assert n.status == "running"  # the scheduler not answering does not break start
        pid = n.worker_pid
        await asyncio.wait_for(n.finished(), 15)
        assert time.monotonic() - t0 < 10
        assert gone(pid)
    run(main())


def test_scheduler_that_goes_away_and_comes_back(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        port = int(s.address.rsplit(":", 1)[1])
        async with Nanny(s.address, memory_limit=None, **fake_worker()) as n:
            await s.next("register-nanny")
            await s.close()
            s2 = await FakeScheduler().start(port=port)
            msg = await s2.next("register-nanny", timeout=15)
            assert msg["worker"] == n.worker_address
            assert n.status == "running"
            await s2.close()
    run(main())


def test_scheduler_gone_past_death_timeout(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, death_timeout=0.5, **fake_worker())
        await s.next("register-nanny")
        await s.close()
        await asyncio.wait_for(n.finished(), 15)
        assert n.status == "closed"
    run(main())


def test_close_kills_a_worker_that_ignores_sigterm(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        n = await Nanny(s.address, memory_limit=None, close_grace=0.3,
                        **fake_worker("ignore_term"))
        pid = n.worker_pid
        t0 = time.monotonic()
        await n.close()
        assert time.monotonic() - t0 < 5
        assert gone(pid)
        assert n.process.returncode == -signal.SIGKILL
    run(main())


def test_inproc_is_rejected():
    with pytest.raises(ValueError, match="inproc"):
        Nanny("inproc://x/1/1", protocol="inproc")


def test_unserializable_worker_options_fail_early():
    with pytest.raises(TypeError, match="JSON"):
        Nanny("tcp://127.0.0.1:1", memory_limit=None, some_option=object())


def test_memory_limit_resolution():
    from taskcore.utils import system_memory

    assert Nanny("tcp://127.0.0.1:1", memory_limit="1GiB").memory_limit == min(2**30,
                                                                             system_memory())
    assert Nanny("tcp://127.0.0.1:1", memory_limit=None).memory_limit is None
    assert 0 < Nanny("tcp://127.0.0.1:1").memory_limit <= system_memory()


def test_worker_dies_with_the_nanny_process(fake_worker, tmp_path):
    """SIGTERM (no handler: no atexit either) or SIGKILL of the nanny's process ends the worker."""
    kw = fake_worker()
    script = tmp_path / "nanny_proc.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, uvloop
        from taskcore.nanny import Nanny
        from taskcore.transports import listen
        async def main():
            async def fake_scheduler(comm):
                while True:
                    await comm.read()
            lst = await listen("tcp://127.0.0.1:0", fake_scheduler, role="scheduler")
            n = await Nanny(lst.contact_address, memory_limit=None, **{kw!r})
            print(n.worker_pid, flush=True)
            await asyncio.sleep(60)
        uvloop.run(main())
    """))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            worker_pid = int(proc.stdout.readline())
            assert not gone(worker_pid)
            proc.send_signal(sig)
            proc.wait(10)
            deadline = time.monotonic() + 10
            while not gone(worker_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone(worker_pid), sig
        finally:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# With the real scheduler and worker
# ---------------------------------------------------------------------------------------------

def test_with_real_scheduler_and_worker(real_servers):
    Scheduler = real_servers.Scheduler

    # Children from before the test (a session's daemons, such as the SLURM tests') are not ours.
    before = {p.pid for p in psutil.Process().children()}

    async def main():
        async with Scheduler(port=0) as s:
            n = await Nanny(s.address, nthreads=1, memory_limit="auto", log_level="warning",
                            death_timeout=10)
            try:
                assert n.worker_address.startswith("tcp://127.0.0.1:")
                old_pid = n.worker_pid
                assert psutil.Process(old_pid).ppid() == os.getpid()
                os.kill(old_pid, signal.SIGKILL)
                await wait_for(lambda: n.restarts == 1 and n.worker_pid is not None, 60)
                assert n.worker_pid != old_pid
                new_address = await n.restart_worker()
                assert new_address == n.worker_address
            finally:
                await n.close()
            assert n.status == "closed"
            assert [p for p in psutil.Process().children() if p.pid not in before] == []
    run(main(), timeout=120)


def test_real_scheduler_knows_the_nanny_and_closes_it(fake_worker, real_servers):
    """The nanny protocol against the real Scheduler (the worker is still the fake one)."""
    Scheduler = real_servers.Scheduler

    async def main():
        s = await Scheduler(port=0)
        n = await Nanny(s.address, memory_limit=None, **fake_worker())
        try:
            await wait_for(lambda: n.worker_address in s.nannies)
            pid = n.worker_pid
        finally:
            await s.close()
        await asyncio.wait_for(n.finished(), 10)  # the scheduler's "close" reached us
        assert gone(pid)
    run(main())


def test_failed_restart_request_recovers_through_the_crash_path(fake_worker):
    async def main():
        s = await FakeScheduler().start()
        async with Nanny(s.address, memory_limit=None, **fake_worker("fail_second_start")) as n:
            await s.next("register-nanny")
            s.send({"op": "restart-worker"})
            reply = await s.next("worker-restarted")
            assert reply["worker"] is None and "cannot start" in reply["error"]
            # ... but the nanny does not stay without a worker
            assert (await s.next("register-nanny"))["worker"] == "tcp://127.0.0.1:20002"
            assert n.worker_address == "tcp://127.0.0.1:20002" and n.status == "running"
    run(main())
