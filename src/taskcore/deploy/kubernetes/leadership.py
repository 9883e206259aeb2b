"""One operator at a time: leader election on a coordination.k8s.io Lease.

Several `core-kube-operator` replicas may run (for availability); only the one
holding the Lease reconciles. This wraps kubernetes_asyncio's LeaderElection
(LeaseLock): campaign, run the controller while leading, stop it the moment
the lease is lost, and campaign again. On a clean shutdown the lease is handed
back (its duration cut to one second), so a standby takes over at once instead
of after a whole lease duration.
"""
from __future__ import annotations

import asyncio
import datetime
import logging

logger = logging.getLogger("taskcore.deploy.kubernetes")

__all__ = ["Leadership"]


class Leadership:
    """`Leadership(api, namespace, name, identity, lead)`: `await lead()` runs only while
    this process holds the Lease `namespace/name`; it is cancelled when the lease is
    lost. `start()` campaigns in the background; `stop()` ends it and releases the lease."""

    def __init__(self, api, namespace: str, name: str, identity: str, lead,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0):
        if not lease_duration > renew_deadline > 1.2 * retry_period >= 1:
            raise ValueError(f"need lease_duration > renew_deadline > 1.2 x retry_period >= 1 s "
                             f"(kubernetes_asyncio's rule), got {lease_duration}, "
                             f"{renew_deadline}, {retry_period}")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._lead = lead
        self.lease_duration = int(round(lease_duration))   # whole seconds in the Lease
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = False
        self.terms = 0                    # how many times this process became the leader
        self._campaign: asyncio.Task | None = None
        self._term: asyncio.Task | None = None

    def start(self):
        self._campaign = asyncio.ensure_future(self._run())
        return self

    async def _run(self):
        from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
        from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

        lock = LeaseLock(self.name, self.namespace, self.identity, self.api.client)
        while True:
            config = electionconfig.Config(lock, self.lease_duration, self.renew_deadline,
                                           self.retry_period, onstarted_leading=self._start_term,
                                           onstopped_leading=self._end_term)
            try:
                await leaderelection.LeaderElection(config).run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("leader election failed: %r; campaigning again", e)
            await self._end_term()
            await asyncio.sleep(self.retry_period)

    async def _start_term(self):
        self.leading = True
        self.terms += 1
        logger.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
        self._term = asyncio.current_task()
        try:
            await self._lead()
        finally:
            self.leading = False

    async def _end_term(self, why: str = "lost the lease"):
        term, self._term = self._term, None
        if term is not None and not term.done():
            logger.warning("%s %s %s/%s; stopping its controller", self.identity, why,
                           self.namespace, self.name)
            term.cancel()
            await asyncio.gather(term, return_exceptions=True)

    async def stop(self):
        if self._campaign is not None:
            self._campaign.cancel()
            await asyncio.gather(self._campaign, return_exceptions=True)
        was_leading = self._term is not None
        await self._end_term("is shutting down, holding")
        if was_leading:
            await self._release()

    async def _release(self):
        from kubernetes_asyncio import client

        coord = client.CoordinationV1Api(self.api.client)
        try:
            lease = await coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.datetime.now(datetime.timezone.utc) - \
                datetime.timedelta(seconds=2)
            await coord.replace_namespaced_lease(self.name, self.namespace, lease)
            logger.info("%s released the lease %s/%s", self.identity, self.namespace,
                        self.name)
        except Exception as e:     # another replica takes over after the lease duration
            logger.warning("could not release the lease %s/%s: %r", self.namespace, self.name, e)
