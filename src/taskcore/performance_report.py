"""`performance_report`: one self-contained HTML file describing what a block of code did.

    with performance_report(filename="report.html"):
        client.gather(client.map(work, range(1000)))

On exit it writes the block's task stream (SVG, one lane per worker thread, colour per
key prefix, hover titles), a per-prefix summary, the workers' profile of the block as
flame graphs (task threads, and the workers' event loops where tiny tasks run inline),
the workers, the versions, the block's wall time and the code that ran it. Everything
is inline (CSS, SVG drawn in Python): no script, no external URL, no network.

The profile covers the sampler's one-second cycles that overlap the block, so it can
include up to a second of work from before the block. The task stream holds at most
the scheduler's ring (`task_stream_length`) of the block's tasks.
"""
from __future__ import annotations

import datetime
import inspect
import sys
import time

from taskcore.plots import esc, flame_graph_svg, format_seconds, task_stream_svg

_MODES = (None, "inline", "cdn")
_MAX_CODE_LINES = 400

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
.meta td:first-child { font-weight: bold; }
.note { color: #666; font-size: 12px; }
.scroll { overflow-x: auto; }
"""


def calling_code(depth: int) -> dict:
    """The source of the frame `depth` levels above the caller, as dask's report shows
    it: the whole function (or module/cell), at most `_MAX_CODE_LINES` lines around
    the current line."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return {"filename": "", "lineno": 0, "code": "<code not available>"}
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    try:
        lines, first = inspect.getsourcelines(frame)
        first = max(first, 1)
    except (OSError, TypeError):
        return {"filename": filename, "lineno": lineno, "code": "<code not available>"}
    if len(lines) > _MAX_CODE_LINES:
        at = max(0, lineno - first - _MAX_CODE_LINES // 2)
        lines = lines[at: at + _MAX_CODE_LINES]
        first += at
    return {"filename": filename, "lineno": lineno, "first": first, "code": "".join(lines)}


class performance_report:
    """Write an HTML performance report of the block (`with` or `async with`).

    `filename`: where to write it; `stacklevel`: which frame's code to show (1: the
    one with the `with` statement); `mode`: accepted for dask compatibility ("inline",
    "cdn"): the report is always self-contained.
    """

    def __init__(self, filename="dask-report.html", stacklevel=1, mode=None,
                 storage_options=None, client=None):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if storage_options:
            raise NotImplementedError("performance_report writes local files only "
                                      "(storage_options is not supported)")
        if not isinstance(stacklevel, int) or isinstance(stacklevel, bool):
            raise TypeError(f"stacklevel must be an int, got {stacklevel!r}")
        self.filename = str(filename)
        self.stacklevel = max(stacklevel, 1)
        self.mode = mode
        self.client = client
        self.start = self.since = None

    def _client(self):
        if self.client is None:
            from taskcore.futures import default_client

            self.client = default_client()
        return self.client

    # -- sync -----------------------------------------------------------------------------
    def __enter__(self):
        c = self._client()
        if c.asynchronous:
            raise RuntimeError("use `async with performance_report(...)` with an "
                               "asynchronous client")
        self.start = time.time()
        self.since = c.sync(c._rpc, "task_stream", since=0, until=0)["total"]
        return self

    def __exit__(self, *exc):
        code = calling_code(self.stacklevel)
        c = self._client()
        html = c.sync(self._report, code)
        self._write(html)

    # -- async -------------------------------------------------------------------------------
    async def __aenter__(self):
        c = self._client()
        self.start = time.time()
        reply = await _call(c, c._rpc, "task_stream", since=0, until=0)
        self.since = reply["total"]
        return self

    async def __aexit__(self, *exc):
        code = calling_code(self.stacklevel)
        c = self._client()
        html = await _call(c, self._report, code)
        self._write(html)

    def _write(self, html):
        with open(self.filename, "w", encoding="utf-8") as f:
            f.write(html)

    async def _report(self, code):
        """Collect everything (on the client's loop) and render the page."""
        from taskcore import profile
        from taskcore.task_stream import rows_to_dicts

        c = self._client()
        stop = time.time()
        stream = await c._rpc("task_stream", since=self.since)
        data = rows_to_dicts(stream["rows"])
        lost = max(0, stream["first"] - self.since)
        profiles = {}
        for server in (False, True):
            try:
                rows = await c._rpc("profile", start=self.start, stop=stop, server=server)
                profiles[server] = profile.unflatten(rows)
            except Exception as e:
                profiles[server] = f"{type(e).__name__}: {e}"
        info = await c._rpc("scheduler_info")
        try:
            versions = await c._get_versions()
        except Exception as e:
            versions = f"{type(e).__name__}: {e}"
        return render(data=data, lost=lost, start=self.start, stop=stop, code=code,
                      profiles=profiles, info=info, versions=versions)


async def _call(client, fn, *args, **kwargs):
    """Run coroutine function `fn` on the client's loop from the current loop."""
    if client.asynchronous:
        return await fn(*args, **kwargs)
    import asyncio

    fut = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), client.loop)
    return await asyncio.wrap_future(fut)


# -- rendering ------------------------------------------------------------------------------------

def render(data, lost, start, stop, code, profiles, info, versions) -> str:
    from taskcore.profile import DEFAULT_INTERVAL
    from taskcore.task_stream import summarize
    from taskcore.utils import format_bytes

    parts = ["<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">",
             "<title>taskcore performance report</title>", f"<style>{_CSS}</style>",
             "</head><body>", "<h1>taskcore performance report</h1>"]
    when = datetime.datetime.fromtimestamp(start).isoformat(sep=" ", timespec="seconds")
    erred = sum(1 for d in data if d["status"] == "erred")
    workers = info.get("workers", {}) if isinstance(info, dict) else {}
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    parts.append('<table class="meta">')
    for k, v in (("Started", when), ("Wall time", format_seconds(stop - start)),
                 ("Tasks", f"{len(data)}" + (f" ({erred} erred)" if erred else "")),
                 ("Workers", f"{len(workers)} ({threads} threads)"),
                 ("Scheduler", info.get("address", "") if isinstance(info, dict) else "")):
        parts.append(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>")
    parts.append("</table>")
    if lost:
        parts.append(f'<p class="note">{lost} earlier tasks of this block had left the '
                     f"scheduler's task-stream buffer and are not shown.</p>")

    parts.append("<h2>Task stream</h2>")
    svg, _ = task_stream_svg(data)
    parts.append(f'<div class="scroll">{svg}</div>')
    parts.append('<p class="note">One lane per worker thread (tasks that overlap on a worker '
                 'take separate lanes); times as the scheduler saw them (end: when it learned '
                 'of the result; start: end minus the duration the worker measured). Hover '
                 'for details.</p>')

    parts.append("<h2>Tasks by prefix</h2>")
    parts.append("<table><tr><th>Prefix</th><th>Tasks</th><th>Total time</th>"
                 "<th>Mean</th><th>Erred</th></tr>")
    for prefix, n, tot, mean, err in summarize(data):
        parts.append(f"<tr><td>{esc(prefix)}</td><td class=\"num\">{n}</td>"
                     f"<td class=\"num\">{esc(format_seconds(tot))}</td>"
                     f"<td class=\"num\">{esc(format_seconds(mean))}</td>"
                     f"<td class=\"num\">{err}</td></tr>")
    parts.append("</table>")

    for server, title, note in (
            (False, "Worker profile (task threads)",
             "Sampled stacks of the threads running tasks, merged over the workers."),
            (True, "Worker profile (event loops)",
             "The workers' event-loop threads: communication, scheduling, and tiny tasks "
             "that run inline on the loop.")):
        parts.append(f"<h2>{esc(title)}</h2>")
        tree = profiles.get(server)
        if isinstance(tree, dict):
            parts.append(f'<p class="note">{esc(note)} {tree["count"]} samples.</p>')
            parts.append(f'<div class="scroll">{flame_graph_svg(tree, DEFAULT_INTERVAL)}</div>')
        else:
            parts.append(f'<p class="note">No profile: {esc(tree)}</p>')

    parts.append("<h2>Workers</h2>")
    parts.append("<table><tr><th>Address</th><th>Name</th><th>Threads</th><th>Memory limit</th>"
                 "<th>Memory (RSS)</th><th>CPU</th></tr>")
    for addr, w in sorted(workers.items()):
        m = w.get("metrics") or {}
        limit = w.get("memory_limit") or 0
        rss = format_bytes(m["rss"]) if "rss" in m else ""
        cpu = f"{m['cpu']:.0f}%" if "cpu" in m else ""
        cells = [esc(addr), esc(w.get("name", "")), w.get("nthreads", ""),
                 esc(format_bytes(limit) if limit else "none"), esc(rss), esc(cpu)]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" if i < 2 else f'<td class="num">{c}</td>'
                                      for i, c in enumerate(cells)) + "</tr>")
    parts.append("</table>")

    parts.append("<h2>Versions</h2>")
    parts.append(_versions_table(versions))

    parts.append("<h2>Code</h2>")
    loc = f"{code.get('filename', '')}, line {code.get('lineno', '')}"
    parts.append(f'<p class="note">{esc(loc)}</p><pre>{esc(code.get("code", ""))}</pre>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _versions_table(versions) -> str:
    if not isinstance(versions, dict):
        return f'<p class="note">Not available: {esc(versions)}</p>'
    cols = [("Client", versions.get("client")), ("Scheduler", versions.get("scheduler"))]
    cols += [(addr, v) for addr, v in sorted((versions.get("workers") or {}).items())]
    names: list = []
    for _, v in cols:
        for k in ((v or {}).get("packages") or {}):
            if k not in names:
                names.append(k)
    out = ["<table><tr><th>Package</th>" + "".join(f"<th>{esc(n)}</th>" for n, _ in cols)
           + "</tr>"]
    for k in names:
        vals = [str(((v or {}).get("packages") or {}).get(k)) for _, v in cols]
        style = ' style="background:#fdd"' if len(set(vals)) > 1 else ""
        out.append(f"<tr{style}><td>{esc(k)}</td>" + "".join(f"<td>{esc(x)}</td>" for x in vals)
                   + "</tr>")
    host = (versions.get("client") or {}).get("host") or {}
    for k in ("python", "OS", "OS-release", "machine"):
        if k in host:
            out.append(f"<tr><td>{esc(k)} (client host)</td><td colspan=\"{len(cols)}\">"
                       f"{esc(host[k])}</td></tr>")
    out.append("</table>")
    return "".join(out)
