"""How late the event loop runs: a sleep that should wake after `interval` seconds, and
how much later it actually woke. A loop busy with a long callback (a big graph arriving,
a handler that does too much) shows here before anywhere else."""
from __future__ import annotations

import asyncio
import collections


class LoopDelay:
    """`start()` on the loop to watch; `delay` is the latest lateness in seconds,
    `max_recent` the worst of the last `window` samples."""

    def __init__(self, interval: float = 0.5, window: int = 20):
        self.interval = interval
        self.delay = 0.0
        self.samples: collections.deque = collections.deque(maxlen=window)
        self._task = None

    @property
    def max_recent(self) -> float:
        return max(self.samples, default=0.0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            self.delay = max(loop.time() - t0 - self.interval, 0.0)
            self.samples.append(self.delay)
