"""The launcher: a stdlib-only supervisor that starts, watches and kills one server process.

Why it exists
-------------
A cluster manager starts schedulers and workers on machines it reaches over
SSH (or locally, for detached clusters). Three things must then hold, and
none of them may depend on the SSH server's good will (OpenSSH ignores
channel signals, and a dropped connection sends nothing to a process that
has no terminal):

1. The manager learns PIDs at once, before the server is even ready, so a
   start that hangs can still be killed by PID.
2. An *attached* process dies with its manager's connection: the launcher
   reads its stdin, and EOF (the channel closed, the manager died) terminates
   the server.
3. A *detached* process outlives the connection: the launcher double-forks
   into its own session, hands the ready line over, then moves its output to a
   size-capped log file, so the SSH channel (or local pipe) can close.

This file is executed as ``python -c <this source> COMMAND ...`` on the remote
host, so it imports nothing from taskcore: it works, and reports clearly,
even where taskcore is missing or slow to import. Locally it is also imported
as a module (`taskcore.deploy.launcher`) for its kill/alive helpers.

Commands
--------
``run [--detach] [--log-file PATH] [--log-max-bytes N] [--grace S] -- ARGV...``
    Start ARGV. The first stdout line is
    ``{"event": "launched", "pid", "pid_start", "child_pid", "child_start", "host", "log_file"}``
    (``pid`` is the supervising launcher; after a detach that is the forked
    supervisor, not the process the manager started). Then the child's stdout
    and stderr are relayed verbatim, so its JSON ready line reaches the
    manager unchanged. The exit status is the child's (128+N for signal N).
``kill [--grace S] [--rm PATH]... PID[:START]...``
    SIGTERM each PID (whose start time still matches: PIDs get reused), wait
    up to S seconds, then SIGKILL it and every descendant seen before. Prints
    ``{"gone": [...], "killed": [...], "alive": [...]}``; exit 0 when none is alive.
``alive PID[:START]...``  prints ``{"PID": true|false, ...}``.
``tail N PATH...``        prints ``{"PATH": [last N lines], ...}``.

Start times are field 22 of ``/proc/PID/stat`` (Linux); elsewhere they are
null and only the PID is checked.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_NOT_FOUND = 127
LINE_LIMIT = 64 * 1024


# ---------------------------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------------------------

def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (which may contain spaces), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    i = data.rfind(")")
    return data[i + 2:].split() if i >= 0 else None


def start_time(pid):
    """The process's start time in clock ticks since boot (Linux), else None."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22 overall: fields[0] is field 3 (state)
    except ValueError:
        return None


def is_alive(pid, start=None):
    """Running (not a zombie), and the same process when a start time is given."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return os.path.isdir("/proc/%d" % pid) or not os.path.isdir("/proc/self")
    if fields[0] in ("Z", "X"):
        return False
    if start is not None:
        try:
            return int(fields[19]) == int(start)
        except (ValueError, IndexError):
            return False
    return True


def descendants(pid):
    """PIDs of all descendants of `pid` (from /proc's parent links; [] without /proc)."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None or len(fields) < 2:
            continue
        try:
            children.setdefault(int(fields[1]), []).append(int(name))
        except ValueError:
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def kill(targets, grace=5.0, remove=()):
    """Terminate [(pid, start|None), ...] and their descendants; see `kill` in the module doc.

    SIGTERM goes to the targets only, so a launcher or a nanny can shut its own
    children down cleanly; whatever of the whole tree is left after `grace` is SIGKILLed.
    """
    gone, live = [], []
    for pid, start in targets:
        (live if is_alive(pid, start) else gone).append((pid, start))
    tree = {}
    for pid, start in live:
        tree[pid] = start
        for d in descendants(pid):
            tree.setdefault(d, start_time(d))
    for pid, _ in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in tree:
            _reap(pid)
        if not any(is_alive(p, s) for p, s in tree.items()):
            break
        time.sleep(0.02)
    killed = []
    for pid, start in tree.items():
        if is_alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 2.0
    alive = list(tree)
    while alive and time.monotonic() < deadline:
        for pid in alive:
            _reap(pid)
        alive = [p for p in alive if is_alive(p, tree[p])]
        if alive:
            time.sleep(0.02)
    for path in remove:
        path = os.path.expanduser(path)
        for p in (path, path + ".1"):
            try:
                os.unlink(p)
            except OSError:
                pass
        try:
            os.rmdir(os.path.dirname(path))  # the cluster's log directory, once empty
        except OSError:
            pass
    return {"gone": [p for p, _ in gone], "killed": killed, "alive": alive}


def tail(path, n):
    """The last `n` lines of a log file and of its rotated predecessor."""
    path = os.path.expanduser(path)
    lines = []
    for p in (path + ".1", path):
        try:
            with open(p, "rb") as f:
                if n > 0:
                    f.seek(0, 2)
                    f.seek(max(0, f.tell() - 200 * n))
                lines += f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            pass
    return lines[-n:] if n > 0 else []


# ---------------------------------------------------------------------------------------------
# run: supervise one child
# ---------------------------------------------------------------------------------------------

class _Output:
    """Where relayed lines go: the manager's channel (until a detach), and a capped log file."""

    def __init__(self, log_file=None, max_bytes=1 << 20):
        self.lock = threading.Lock()
        self.channel = True
        self.channel_broken = threading.Event()
        self.log_path = os.path.expanduser(log_file) if log_file else None
        self.max_bytes = max_bytes
        self.log_fd = None
        self.log_size = 0
        if self.log_path:
            d = os.path.dirname(self.log_path)
            if d:
                os.makedirs(d, exist_ok=True)
            self._open_log()

    def _open_log(self):
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.log_size = os.fstat(self.log_fd).st_size

    def write(self, fd, data, to_log=True):
        with self.lock:
            if self.channel:
                try:
                    os.write(fd, data)
                except OSError:
                    self.channel = False
                    self.channel_broken.set()
            if to_log and self.log_fd is not None:
                if self.log_size + len(data) > self.max_bytes:
                    # Rotate: one previous file is kept, so the log never exceeds 2 x max_bytes.
                    os.close(self.log_fd)
                    try:
                        os.replace(self.log_path, self.log_path + ".1")
                    except OSError:
                        pass
                    self._open_log()
                try:
                    os.write(self.log_fd, data)
                    self.log_size += len(data)
                except OSError:
                    pass

    def detach_channel(self):
        """Stop writing to fds 1 and 2, and point them at /dev/null (the channel may close)."""
        with self.lock:
            self.channel = False
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)


def _set_pdeathsig():  # in the child, between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _exit_status(code):
    return 128 - code if code is not None and code < 0 else (code or 0)


def _terminate(child, grace):
    """SIGTERM the child, then SIGKILL it and its descendants after `grace` seconds."""
    if child.poll() is not None:
        return
    tree = [(d, start_time(d)) for d in descendants(child.pid)]
    try:
        child.send_signal(signal.SIGTERM)
    except OSError:
        pass
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid, start in [(child.pid, None)] + tree:
        if pid == child.pid and child.poll() is not None:
            continue
        if is_alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        child.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _pump(stream, out, fd, on_line=None):
    while True:
        line = stream.readline(LINE_LIMIT)
        if not line:
            break
        if on_line is not None and on_line(line):
            continue
        out.write(fd, line)


def run(argv, detach=False, log_file=None, log_max_bytes=1 << 20, grace=5.0):
    handoff_w = None
    if detach:
        # First fork: the process our manager started waits only for the handoff, then exits,
        # so neither an SSH channel nor a local process transport holds on to the server.
        r, w = os.pipe()
        pid = os.fork()
        if pid > 0:
            os.close(w)
            data = b""
            while True:
                chunk = os.read(r, 16)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"ok"):
                os._exit(0)
            try:
                os._exit(int(data.decode() or "1"))
            except ValueError:
                os._exit(1)
        os.close(r)
        handoff_w = w
        os.setsid()  # no controlling terminal, no process group shared with sshd's session
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)

    try:
        out = _Output(log_file, log_max_bytes)
    except OSError as e:
        sys.stderr.write("launcher: cannot open log file %s: %s\n" % (log_file, e))
        sys.stderr.flush()
        _finish_handoff(handoff_w, 1)
        return 1
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, preexec_fn=_set_pdeathsig)
    except OSError as e:
        msg = {"event": "error", "kind": "not-found" if isinstance(e, FileNotFoundError)
               else "exec", "program": argv[0] if argv else None, "message": str(e)}
        out.write(1, (json.dumps(msg) + "\n").encode())
        out.write(2, ("launcher: cannot run %r: %s\n" % (argv[0] if argv else "", e)).encode())
        code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else 126
        _finish_handoff(handoff_w, code)
        return code

    info = {"event": "launched", "pid": os.getpid(), "pid_start": start_time(os.getpid()),
            "child_pid": child.pid, "child_start": start_time(child.pid),
            "host": socket.gethostname(), "log_file": out.log_path}
    out.write(1, (json.dumps(info) + "\n").encode())

    stop = threading.Event()
    handed_off = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT) + (() if detach else (signal.SIGHUP,)):
        signal.signal(sig, on_signal)

    def on_stdout(line):
        if handoff_w is None or handed_off.is_set() or not line.lstrip().startswith(b"{"):
            return False
        try:
            msg = json.loads(line)
        except ValueError:
            return False
        if isinstance(msg, dict) and msg.get("event") == "ready":
            out.write(1, line)
            out.detach_channel()
            handed_off.set()
            _finish_handoff(handoff_w, "ok")
            return True
        return False

    threads = [threading.Thread(target=_pump, args=(child.stdout, out, 1, on_stdout), daemon=True),
               threading.Thread(target=_pump, args=(child.stderr, out, 2), daemon=True)]
    if not detach:
        def watch_stdin():
            # EOF on stdin: our manager's channel is gone. Attached processes die with it.
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            stop.set()
        threads.append(threading.Thread(target=watch_stdin, daemon=True))
    for t in threads:
        t.start()

    while child.poll() is None:
        if stop.wait(0.05) or (not detach and out.channel_broken.is_set()):
            _terminate(child, grace)
            break
    code = child.wait()
    for t in threads[:2]:
        t.join(2)
    if handoff_w is not None and not handed_off.is_set():
        _finish_handoff(handoff_w, _exit_status(code) or 1)
    return _exit_status(code)


def _finish_handoff(w, status):
    if w is None:
        return
    try:
        os.write(w, str(status).encode())
        os.close(w)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _targets(specs):
    out = []
    for s in specs:
        pid, _, start = s.partition(":")
        out.append((int(pid), int(start) if start not in ("", "None", "null") else None))
    return out


def main(args=None):
    args = list(sys.argv[1:] if args is None else args)
    if not args:
        sys.stderr.write("usage: launcher run|kill|alive|tail ...\n")
        return 2
    cmd = args.pop(0)
    opts = {"detach": False, "log_file": None, "log_max_bytes": 1 << 20, "grace": 5.0, "rm": []}
    rest = []
    while args:
        a = args.pop(0)
        if a == "--":
            rest += args
            break
        if a == "--detach":
            opts["detach"] = True
        elif a == "--log-file":
            opts["log_file"] = args.pop(0)
        elif a == "--log-max-bytes":
            opts["log_max_bytes"] = int(args.pop(0))
        elif a == "--grace":
            opts["grace"] = float(args.pop(0))
        elif a == "--rm":
            opts["rm"].append(args.pop(0))
        else:
            rest.append(a)
    if cmd == "run":
        if not rest:
            sys.stderr.write("launcher run: no command\n")
            return 2
        return run(rest, detach=opts["detach"], log_file=opts["log_file"],
                   log_max_bytes=opts["log_max_bytes"], grace=opts["grace"])
    if cmd == "kill":
        result = kill(_targets(rest), grace=opts["grace"], remove=opts["rm"])
        sys.stdout.write(json.dumps(result) + "\n")
        return 0 if not result["alive"] else 1
    if cmd == "alive":
        sys.stdout.write(json.dumps({str(p): is_alive(p, s) for p, s in _targets(rest)}) + "\n")
        return 0
    if cmd == "tail":
        n = int(rest.pop(0))
        sys.stdout.write(json.dumps({p: tail(p, n) for p in rest}) + "\n")
        return 0
    sys.stderr.write("launcher: unknown command %r\n" % cmd)
    return 2


def source() -> str:
    """This file's text, to run elsewhere as `python -c SOURCE ...`."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    sys.exit(main())
