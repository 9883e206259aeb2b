"""The task stream: which task ran where and when, as dask.distributed reports it.

The scheduler records each computed task in a ring buffer (`SchedulerState.task_stream`,
capacity `task_stream_length`, 100,000 by default): key, worker, start, stop, and
"memory" or "erred". The times are the scheduler's: stop is when it learned of the
result, start is stop minus the duration the worker measured.

`client.get_task_stream(start=, stop=, count=)` returns those rows as dask's dicts;
`get_task_stream()` as a context manager collects the tasks recorded inside its block
(by the ring's running index, not by time, so clocks do not matter).
"""
from __future__ import annotations


def rows_to_dicts(rows) -> list:
    """dask's record shape for (key, worker, start, stop, status) rows."""
    from taskcore.core.worker_dispatch import key_prefix

    out = []
    for key, worker, start, stop, status in rows:
        prefix = key_prefix(key)
        out.append({"key": key, "worker": worker, "status": status,
                    "startstops": [{"action": "compute", "start": start, "stop": stop}],
                    "prefix": prefix if isinstance(prefix, str) else str(prefix)})
    return out


def plot_result(data, plot, filename):
    """What `get_task_stream` returns for `plot`: the records, or (records, Figure);
    plot="save" also writes the figure to `filename`."""
    if not plot:
        return data
    if plot not in (True, "save"):
        raise ValueError(f"plot must be False, True or 'save', got {plot!r}")
    from taskcore.plots import Figure, task_stream_svg

    svg, _ = task_stream_svg(data)
    fig = Figure(svg, "Task stream")
    if plot == "save":
        if not filename:
            raise ValueError("plot='save' needs a filename")
        fig.save(filename)
    return data, fig


def summarize(data) -> list:
    """Per prefix: (prefix, tasks, total seconds, mean seconds, erred), heaviest first."""
    acc: dict = {}
    for d in data:
        ss = d["startstops"][0]
        dur = max(ss["stop"] - ss["start"], 0.0)
        a = acc.setdefault(d["prefix"], [0, 0.0, 0])
        a[0] += 1
        a[1] += dur
        if d["status"] == "erred":
            a[2] += 1
    rows = [(p, n, tot, tot / n if n else 0.0, err) for p, (n, tot, err) in acc.items()]
    rows.sort(key=lambda r: -r[2])
    return rows


class get_task_stream:
    """Collect the tasks that ran inside a block (sync `with` or `async with`)::

        with get_task_stream() as ts:
            client.gather(client.map(inc, range(100)))
        ts.data          # [{"key", "worker", "status", "startstops", "prefix"}, ...]

    `plot=True` also makes `ts.figure` (the SVG the performance report draws);
    `plot="save"` writes it to `filename` as well.
    """

    def __init__(self, client=None, plot=False, filename="task-stream.html"):
        if plot not in (False, True, "save"):
            raise ValueError(f"plot must be False, True or 'save', got {plot!r}")
        self.client = client
        self.data: list = []
        self.figure = None
        self._plot = plot
        self._filename = filename
        self._since = None

    def _client(self):
        if self.client is None:
            from taskcore.futures import default_client

            self.client = default_client()
        return self.client

    def _finish(self, reply):
        rows = reply["rows"]
        if reply["first"] > self._since:
            import warnings

            warnings.warn(f"{reply['first'] - self._since} tasks of this block left the "
                          f"scheduler's task-stream buffer before they were collected "
                          f"(raise task_stream_length)", RuntimeWarning, stacklevel=3)
        data = rows_to_dicts(rows)
        result = plot_result(data, self._plot, self._filename)
        if self._plot:
            data, self.figure = result
        self.data.extend(data)

    def __enter__(self):
        c = self._client()
        if c.asynchronous:
            raise RuntimeError("use `async with get_task_stream(...)` with an asynchronous "
                               "client")
        self._since = c.sync(c._rpc, "task_stream", since=0, until=0)["total"]
        return self

    def __exit__(self, *exc):
        c = self._client()
        self._finish(c.sync(c._rpc, "task_stream", since=self._since))

    async def __aenter__(self):
        c = self._client()
        if c.asynchronous:
            reply = await c._rpc("task_stream", since=0, until=0)
        else:
            reply = await _on_client_loop(c, "task_stream", since=0, until=0)
        self._since = reply["total"]
        return self

    async def __aexit__(self, *exc):
        c = self._client()
        if c.asynchronous:
            reply = await c._rpc("task_stream", since=self._since)
        else:
            reply = await _on_client_loop(c, "task_stream", since=self._since)
        self._finish(reply)


async def _on_client_loop(client, method, **args):
    """An rpc of a synchronous client from some other event loop."""
    import asyncio

    fut = asyncio.run_coroutine_threadsafe(client._rpc(method, **args), client.loop)
    return await asyncio.wrap_future(fut)
