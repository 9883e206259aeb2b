"""Subprocess (the local ProcessInterface) with tiny real child programs."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from taskcore.deploy.process import (ProcessStartError, Subprocess, scheduler_cli_args,
                                     worker_cli_args)
from taskcore.testing import run


def program(body: str) -> list:
    """argv for a python child: `ready(**fields)` prints the JSON ready line."""
    prelude = textwrap.dedent("""
        import json, os, sys, time, signal
        def ready(**fields):
            msg = {"event": "ready", "role": "worker", "address": "tcp://127.0.0.1:1",
                   "pid": os.getpid()}
            msg.update(fields)
            print(json.dumps(msg), flush=True)
    """)
    return [sys.executable, "-c", prelude + textwrap.dedent(body)]


def test_reads_ready_line_and_keeps_logs():
    async def main():
        p = Subprocess(program("""
            print("not json on stdout", flush=True)
            print("{broken json", flush=True)
            sys.stderr.write("starting up\\n"); sys.stderr.flush()
            ready(address="tcp://127.0.0.1:4242", name="w1")
            time.sleep(60)
        """), role="worker")
        assert p.status == "created"
        await p.start()
        assert p.status == "running"
        assert p.address == "tcp://127.0.0.1:4242"
        assert p.name == "w1"
        assert p.info["pid"] == p.pid
        assert psutil.pid_exists(p.pid)
        await asyncio.sleep(0.05)
        assert "not json on stdout" in p.logs and "starting up" in p.logs
        await p.close()
        assert p.status == "closed"
        assert p.returncode == -signal.SIGTERM
        assert not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == "zombie"
        await asyncio.wait_for(p.finished(), 1)
    run(main())


def test_exit_before_ready_is_a_start_error_with_stderr():
    async def main():
        p = Subprocess(program("""
            sys.stderr.write("cannot bind port 1234\\n")
            sys.exit(3)
        """))
        with pytest.raises(ProcessStartError) as e:
            await p.start()
        assert "exit code 3" in str(e.value)
        assert "cannot bind port 1234" in str(e.value)
        assert p.status == "failed"
    run(main())


def test_startup_timeout_kills_the_child():
    async def main():
        p = Subprocess(program("time.sleep(60)"), startup_timeout=0.5)
        with pytest.raises(ProcessStartError, match="did not report ready"):
            await p.start()
        assert p.returncode is not None
    run(main())


def test_wrong_role_is_rejected():
    async def main():
        p = Subprocess(program("ready(role='scheduler'); time.sleep(60)"), role="worker")
        with pytest.raises(ProcessStartError, match="role"):
            await p.start()
        await p.close()
    run(main())


def test_sigkill_after_grace_when_sigterm_is_ignored():
    async def main():
        p = Subprocess(program("""
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ready()
            time.sleep(60)
        """), close_grace=0.3)
        await p.start()
        t0 = time.monotonic()
        await p.close()
        assert p.returncode == -signal.SIGKILL
        assert time.monotonic() - t0 < 5
    run(main())


def test_env_is_merged_into_the_environment():
    async def main():
        p = Subprocess(program("""
            ready(address=os.environ["MY_VAR"] + "|" + ("PATH" in os.environ and "path" or ""))
            time.sleep(60)
        """), env={"MY_VAR": "tcp://x:1"})
        await p.start()
        assert p.address == "tcp://x:1|path"
        await p.close()
    run(main())


def test_clean_exit_and_unexpected_death_status():
    async def main():
        p = Subprocess(program("ready(); sys.exit(0)"))
        await p.start()
        await asyncio.wait_for(p.finished(), 5)
        assert p.status == "closed" and p.returncode == 0
        q = Subprocess(program("ready(); time.sleep(60)"))
        await q.start()
        os.kill(q.pid, signal.SIGKILL)
        await asyncio.wait_for(q.finished(), 5)
        assert q.status == "failed" and q.returncode == -signal.SIGKILL
    run(main())


def test_long_lines_are_cut_not_buffered_forever():
    async def main():
        p = Subprocess(program("""
            sys.stderr.write("x" * 300000 + "\\n"); sys.stderr.flush()
            ready(); time.sleep(60)
        """))
        await p.start()
        await asyncio.sleep(0.1)
        assert all(len(line) < 70000 for line in p.logs)
        await p.close()
    run(main())


def test_missing_program():
    async def main():
        p = Subprocess(["/nonexistent/program"])
        with pytest.raises(ProcessStartError, match="could not launch"):
            await p.start()
    run(main())


def test_child_dies_with_a_sigkilled_parent(tmp_path):
    """PR_SET_PDEATHSIG: even a parent killed with SIGKILL takes its child along."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys, uvloop
        from taskcore.deploy.process import Subprocess
        async def main():
            p = Subprocess({program("ready(); time.sleep(60)")!r})
            await p.start()
            print(p.pid, flush=True)
            await asyncio.sleep(60)
        uvloop.run(main())
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(child) and time.monotonic() < deadline:
            try:
                if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        alive = psutil.pid_exists(child) and psutil.Process(child).status() != "zombie"
        assert not alive
    finally:
        parent.kill()


def test_atexit_hook_terminates_children(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys, uvloop
        from taskcore.deploy.process import Subprocess
        async def main():
            p = Subprocess({program("ready(); time.sleep(60)")!r}, kill_with_parent=False)
            await p.start()
            print(p.pid, flush=True)
            return p  # exits without closing it
        keep = uvloop.run(main())
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=30)
    child = int(out.stdout.split()[0])
    try:
        time.sleep(0.1)
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    finally:
        if psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)


def test_worker_cli_args():
    from taskcore.security import Security

    sec = Security.temporary()
    args = worker_cli_args("tcp://127.0.0.1:8786", nthreads=2, memory_limit=2**30, name="w",
                           resources={"GPU": 2, "MEM": 1.5e9}, death_timeout=5, lifetime="1h",
                           lifetime_stagger="5m", protocol="tls", host="127.0.0.1",
                           security=sec, nanny_address="tls://127.0.0.1:9", log_level="debug",
                           custom_option=[1, 2])
    assert args[:5] == [sys.executable, "-m", "taskcore.cli.worker", "tcp://127.0.0.1:8786",
                        "--no-nanny"]
    flags = dict(zip(args[5::2], args[6::2]))
    assert flags["--nthreads"] == "2"
    assert flags["--memory-limit"] == str(2**30)
    assert flags["--resources"] == "GPU=2,MEM=1500000000"
    assert flags["--tls-ca-file"] == sec.ca_file
    assert flags["--nanny-address"] == "tls://127.0.0.1:9"
    assert json.loads(flags["--worker-options"]) == {"custom_option": [1, 2]}
    # the worker CLI accepts everything we generate
    from taskcore.cli.worker import parse_args

    parsed = parse_args(args[3:])
    assert parsed.nthreads == 2 and parsed.resources == {"GPU": 2.0, "MEM": 1.5e9}
    assert parsed.extra == {"custom_option": [1, 2]} and parsed.protocol == "tls"
    assert worker_cli_args("tcp://h:1", memory_limit=None)[-2:] == ["--memory-limit", "0"]
    assert worker_cli_args("tcp://h:1", memory_limit="auto")[-1] == "auto"
    with pytest.raises(TypeError, match="JSON"):
        worker_cli_args("tcp://h:1", weird=object())


def test_scheduler_cli_args():
    from taskcore.cli.scheduler import parse_args

    args = scheduler_cli_args(host="127.0.0.1", port=0, idle_timeout=10, log_level="warning")
    parsed = parse_args(args[3:])
    assert parsed.port == 0 and parsed.idle_timeout == 10.0 and parsed.host == "127.0.0.1"


def test_child_runs_in_its_own_session():
    """A terminal's Ctrl-C (sent to the foreground process group) must not reach workers."""
    async def main():
        p = Subprocess(program("ready(address=f'tcp://x:{os.getsid(0)}'); time.sleep(60)"))
        await p.start()
        assert int(p.address.rsplit(":", 1)[1]) == p.pid != os.getsid(0)
        await p.close()
    run(main())
