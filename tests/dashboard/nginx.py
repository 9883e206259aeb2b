"""A real nginx (Debian's) as a reverse proxy in front of the dashboard, for the proxy tests.

Started in the foreground (`daemon off;`) with a config, pid file, logs and temp paths of
its own in a temporary directory, on a free loopback port; stopped by its PID. Nothing in
/etc or /var is read or written.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = "/usr/sbin/nginx"

CONF = """\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 404; }}        # only the prefix reaches the dashboard
        location {prefix}/ {{
            proxy_pass http://127.0.0.1:{upstream}{prefix}/;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """`with Nginx(tmpdir, upstream_port, "/some/prefix") as proxy:` then `proxy.url`."""

    def __init__(self, directory: Path, upstream_port: int, prefix: str):
        self.dir = Path(directory)
        self.upstream_port = upstream_port
        self.prefix = prefix
        self.port = None
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}/"

    def start(self) -> "Nginx":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(CONF.format(d=self.dir, port=self.port, upstream=self.upstream_port,
                                    prefix=self.prefix))
        # -e: the error log before the config is read (else /var/log/nginx/error.log)
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / "error.log"),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                log = (self.dir / "error.log")
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err}"
                                   f"{log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nginx did not listen within 10 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)   # fast shutdown: open WebSockets do not hold it
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc.stderr.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
