"""The graph page's data: the task graph laid out in layers, or, above a size limit, the
graph of task prefixes.

Layout is done here (server side) so that the browser only draws: a node's column is its
depth (the longest dependency chain below it), its row its order within the column, by
the mean row of its dependencies (one barycentre pass, which removes most crossings in
the fan-in / fan-out shapes task graphs have). A column taller than `max_rows` wraps into
several, so a map over 1,000 inputs is a block, not a 1,000-node line.

Cost: the task graph walks at most `limit` tasks, and only when the scheduler holds at most
that many; above it, the prefix graph uses the per-prefix counters and a bounded sample of
tasks (the oldest and newest `SAMPLE` each) to find edges between prefixes.
"""
from __future__ import annotations

import itertools
import math

from taskcore.dashboard.api import STATES, key_prefix, key_str

SAMPLE = 1000


def layers(nodes: list, deps: dict) -> dict:
    """{node: depth}: 0 for nodes without dependencies, else 1 + the deepest dependency.
    Nodes on a cycle (possible between prefixes) get the depth reached before the cycle."""
    depth = {}
    indegree = {n: 0 for n in nodes}
    dependents = {n: [] for n in nodes}
    for n in nodes:
        for d in deps.get(n, ()):
            if d in indegree and d != n:
                indegree[n] += 1
                dependents[d].append(n)
    frontier = [n for n in nodes if indegree[n] == 0]
    for n in frontier:
        depth[n] = 0
    while frontier:
        nxt = []
        for n in frontier:
            for m in dependents[n]:
                depth[m] = max(depth.get(m, 0), depth[n] + 1)
                indegree[m] -= 1
                if indegree[m] == 0:
                    nxt.append(m)
        frontier = nxt
    for n in nodes:                     # left on a cycle
        depth.setdefault(n, 0)
    return depth


def layout(nodes: list, deps: dict, max_rows: int | None = None) -> dict:
    """{node: (x, y)} in grid units: x the (wrapped) column, y the row."""
    if not nodes:
        return {}
    depth = layers(nodes, deps)
    if max_rows is None:
        max_rows = max(8, int(math.ceil(math.sqrt(len(nodes)) * 1.5)))
    by_depth: dict = {}
    for n in nodes:
        by_depth.setdefault(depth[n], []).append(n)
    pos: dict = {}
    x = 0
    for d in sorted(by_depth):
        column = by_depth[d]
        if d > 0:
            def barycentre(n):
                ys = [pos[p][1] for p in deps.get(n, ()) if p in pos]
                return sum(ys) / len(ys) if ys else 0.0
            column.sort(key=barycentre)
        ncols = max(1, math.ceil(len(column) / max_rows))
        rows = math.ceil(len(column) / ncols)
        offset = (max_rows - rows) / 2 if len(column) < max_rows else 0
        for i, n in enumerate(column):
            pos[n] = (x + i // rows, offset + i % rows)
        x += ncols
    return pos


def task_graph(scheduler, limit: int) -> dict:
    """The tasks (when at most `limit`), else the prefix graph with `too_large` set."""
    tasks = scheduler.state.tasks
    n = len(tasks)
    if n > limit:
        return prefix_graph(scheduler, limit, n)
    keys = []
    deps = {}
    info = {}
    for key, ts in itertools.islice(tasks.items(), limit):
        keys.append(key)
        deps[key] = ts.dependency_keys
        info[key] = (ts.state_name, ts.processing_on_address)
    pos = layout(keys, deps)
    index = {k: i for i, k in enumerate(keys)}
    nodes = []
    edges = []
    for k in keys:
        x, y = pos[k]
        state, worker = info[k]
        nodes.append({"key": key_str(k), "prefix": key_prefix(k), "state": state,
                      "worker": worker, "x": x, "y": y})
        for d in deps[k]:
            j = index.get(d)
            if j is not None:
                edges.append([j, index[k]])
    return {"kind": "tasks", "too_large": False, "n_tasks": n, "limit": limit,
            "nodes": nodes, "edges": edges}


def _sampled_tasks(tasks: dict):
    if len(tasks) <= 2 * SAMPLE:
        return list(tasks.values())
    return (list(itertools.islice(tasks.values(), SAMPLE))
            + list(itertools.islice(reversed(tasks.values()), SAMPLE)))


def prefix_graph(scheduler, limit: int, n_tasks: int) -> dict:
    """One node per prefix with live tasks (its counts, its dominant state); edges from a
    sample of tasks, so an edge seen only in the middle of a huge graph may be missing."""
    counts = scheduler.state.prefix_counts()
    live = {name: c for name, c in counts.items() if any(c.get(s, 0) for s in STATES)}
    names = sorted(live, key=lambda p: -sum(live[p].get(s, 0) for s in STATES))[:limit]
    chosen = set(names)
    deps: dict = {p: set() for p in names}
    for ts in _sampled_tasks(scheduler.state.tasks):
        p = key_prefix(ts.key)
        if p not in chosen:
            continue
        for d in ts.dependency_keys:
            q = key_prefix(d)
            if q != p and q in chosen:
                deps[p].add(q)
    pos = layout(names, deps)
    index = {p: i for i, p in enumerate(names)}
    nodes = []
    edges = []
    for p in names:
        c = live[p]
        x, y = pos[p]
        states = {s: c.get(s, 0) for s in STATES}
        nodes.append({"key": key_str(p), "prefix": key_str(p),
                      "state": max(STATES, key=lambda s: states[s]), "states": states,
                      "count": sum(states.values()), "done": c.get("done", 0), "x": x, "y": y})
        edges.extend([index[q], index[p]] for q in sorted(deps[p]))
    return {"kind": "prefixes", "too_large": True, "n_tasks": n_tasks, "limit": limit,
            "nodes": nodes, "edges": edges}
