"""`core-clusters`: list, close and prune the clusters in the local registry.

    core-clusters                 # a table: name, kind, status, workers, scheduler, ...
    core-clusters list --json     # the same as JSON (one array)
    core-clusters close NAME      # reconnect and stop every process of a detached cluster
    core-clusters prune           # forget entries whose processes are verifiably gone

Status: "running" (the scheduler accepts connections), "dead" (nothing of it
is left; prune removes it) or "unreachable" (cannot tell from here). Exit
status 1 when NAME is unknown or closing fails.
"""
from __future__ import annotations

import json
import sys
import time

from taskcore.cli.common import Parser, duration_type

PROG = "core-clusters"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Clusters registered on this machine.")
    sub = p.add_subparsers(dest="command")
    ls = sub.add_parser("list", help="list clusters (the default)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--no-check", action="store_true",
                    help="do not probe schedulers (faster; no status column)")
    close = sub.add_parser("close", help="stop a detached cluster and all its processes")
    close.add_argument("name")
    close.add_argument("--timeout", type=duration_type, default=120.0, metavar="DURATION")
    sub.add_parser("prune", help="remove entries of clusters that are gone")
    p.add_argument("--json", action="store_true", help="print JSON (for the default list)")
    return p


def _age(created) -> str:
    if not created:
        return "-"
    s = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _table(rows) -> str:
    headers = ["NAME", "KIND", "STATUS", "WORKERS", "SCHEDULER", "DETACHED", "MANAGER", "AGE"]
    body = [[r["name"], (r.get("cls") or "").rsplit(".", 1)[-1], r.get("status", "-"),
             str(r.get("workers", 0)), r.get("scheduler_address") or "-",
             "yes" if r.get("detached") else "no",
             f"{r.get('host')}:{r['manager_pid']}" if r.get("manager_pid") else "-",
             _age(r.get("created"))] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [headers, *body]]
    return "\n".join(lines)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from taskcore.deploy import registry

    command = args.command or "list"
    if command == "list":
        rows = registry.list_clusters(check=not getattr(args, "no_check", False))
        if args.json:
            sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        elif rows:
            sys.stdout.write(_table(rows) + "\n")
        else:
            sys.stdout.write(f"no clusters registered in {registry.registry_dir()}\n")
        return 0
    if command == "prune":
        gone = registry.prune()
        sys.stdout.write("".join(f"removed {n}\n" for n in gone) or "nothing to prune\n")
        return 0
    if command == "close":
        from taskcore.deploy.cluster import Cluster

        try:
            cluster = Cluster.from_name(args.name, shutdown_on_close=True)
        except registry.ClusterNotFound as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 1
        except Exception as e:
            sys.stderr.write(f"{PROG}: error: cannot reconnect to {args.name!r}: {e}\n")
            return 1
        try:
            cluster.close(timeout=args.timeout)
        except Exception as e:
            sys.stderr.write(f"{PROG}: error: closing {args.name!r} failed: {e}\n")
            return 1
        sys.stdout.write(f"closed {args.name}\n")
        return 0
    return 2


def main(argv=None):
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
