"""The launcher (deploy/launcher.py), run locally the way SSH runs it remotely: `python FILE ...`."""
import json
import os
import signal
import subprocess
import sys
import time

from taskcore.deploy import launcher

CHILD = r"""
import json, os, signal, sys, time
if "ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stderr.write("child starting\n"); sys.stderr.flush()
print(json.dumps({"event": "ready", "role": "worker", "address": "tcp://x:1",
                  "pid": os.getpid()}), flush=True)
while True:
    sys.stderr.write("x" * 300 + "\n"); sys.stderr.flush()
    time.sleep(0.01)
"""


def start(*args, stdin=subprocess.PIPE):
    return subprocess.Popen([sys.executable, launcher.__file__, *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def child_argv(*extra):
    return [sys.executable, "-c", CHILD, *extra]


def read_json_lines(proc, n):
    out = []
    while len(out) < n:
        line = proc.stdout.readline()
        assert line, f"launcher ended early: {proc.stderr.read()[-2000:]}"
        out.append(json.loads(line))
    return out


def wait_dead(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while any(launcher.is_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if launcher.is_alive(p)]
        time.sleep(0.02)


def test_attached_child_dies_when_stdin_closes():
    proc = start("run", "--grace", "2", "--", *child_argv())
    launched, ready = read_json_lines(proc, 2)
    assert launched["event"] == "launched" and launched["pid"] == proc.pid
    assert launched["child_start"] == launcher.start_time(launched["child_pid"])
    assert ready["event"] == "ready" and ready["pid"] == launched["child_pid"]
    proc.stdin.close()  # what a dropped SSH connection looks like
    assert proc.wait(10) == 128 + signal.SIGTERM
    wait_dead([launched["child_pid"]])


def test_detach_hands_off_and_kill_ends_the_tree(tmp_path):
    log = tmp_path / "logs" / "w.log"
    proc = start("run", "--detach", "--log-file", str(log), "--log-max-bytes", "20000", "--",
                 *child_argv("ignore-term"))
    launched, ready = read_json_lines(proc, 2)
    # The process we started exits once the server is ready; the supervisor lives on.
    assert proc.wait(10) == 0
    assert proc.stdout.read() == b""
    sup, child = launched["pid"], launched["child_pid"]
    try:
        assert sup != proc.pid and launcher.is_alive(sup, launched["pid_start"])
        assert os.getsid(sup) == sup  # its own session: no terminal, no sshd process group
        # The log is capped: one rotation kept, never more than 2 x max bytes.
        deadline = time.monotonic() + 10
        while not (tmp_path / "logs" / "w.log.1").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rotated = tmp_path / "logs" / "w.log.1"
        assert log.stat().st_size <= 20000 and rotated.stat().st_size <= 20000
        assert len(launcher.tail(str(log), 5)) == 5
        # The child ignores SIGTERM: kill escalates to SIGKILL after the grace period.
        t = time.monotonic()
        result = launcher.kill([(sup, launched["pid_start"]), (child, launched["child_start"])],
                               grace=0.5, remove=[str(log)])
        assert time.monotonic() - t < 5
        assert result["alive"] == [] and child in result["killed"]
        wait_dead([sup, child])
        assert not (tmp_path / "logs").exists()  # log files and their emptied directory
    finally:  # never leave the detached pair behind, even when an assertion failed
        launcher.kill([(sup, launched["pid_start"]), (child, launched["child_start"])],
                      grace=0)


def test_a_reused_pid_is_not_killed():
    # Our own PID with a wrong start time: "gone", and certainly not signalled.
    result = launcher.kill([(os.getpid(), 1)], grace=0.1)
    assert result == {"gone": [os.getpid()], "killed": [], "alive": []}
    assert not launcher.is_alive(os.getpid(), 1)
    assert launcher.is_alive(os.getpid(), launcher.start_time(os.getpid()))


def test_missing_program_is_reported_as_such():
    proc = start("run", "--", "/nonexistent/python3", "-c", "pass")
    msg = json.loads(proc.stdout.readline())
    assert msg["event"] == "error" and msg["kind"] == "not-found"
    assert proc.wait(10) == 127


def test_command_line_helpers():
    out = subprocess.run([sys.executable, launcher.__file__, "alive", f"{os.getpid()}:"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {str(os.getpid()): True}
    proc = subprocess.run([sys.executable, launcher.__file__, "bogus"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr
    # The source runs as `python -c SOURCE` too (that is how SSH targets use it).
    out = subprocess.run([sys.executable, "-c", launcher.source(), "alive", "1:"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"1": True}
