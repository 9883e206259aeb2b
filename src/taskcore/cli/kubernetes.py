"""`core-kube-operator`: the TaskcoreCluster controller as a long-running process.

    core-kube-operator                      # every namespace
    core-kube-operator --namespace team-a   # one namespace
    core-kube-operator --install-crd        # install the CRD first if missing

Deployed in the cluster as a Deployment (deploy/kubernetes/operator.yaml, with
its service account and RBAC), it uses the pod's service account; run
elsewhere, the kubeconfig. It reconciles every TaskcoreCluster except those a
client reconciles itself (labelled taskcore.dev/controller=embedded), prints
one JSON ready line on stdout once it is connected, and exits 0 on SIGTERM or
SIGINT. Replicas elect a leader on a Lease (`--lease-name`, in the pod's
namespace): only the leader reconciles, a standby takes over within the lease
duration when the leader dies, at once when it stops cleanly (it hands the lease
back). Exit status 1: no Kubernetes configuration, or the API refused us.

A cluster whose spec.security names a Secret (KubeCluster's default: TLS with
temporary credentials) is reached with the credentials read from that Secret
(RBAC: `get` on secrets, as operator.yaml grants), written to a private
temporary directory that is removed when the operator stops.
"""
from __future__ import annotations

import argparse
import asyncio
import logging

from taskcore.cli.common import (Parser, add_logging_options, announce, duration_type,
                                 exit_with_error, run_cli, shutdown_event)

logger = logging.getLogger("taskcore.cli.kubernetes")
PROG = "core-kube-operator"


def parse_args(argv=None):
    p = Parser(prog=PROG, description="Reconcile TaskcoreCluster resources (the taskcore "
                                      "Kubernetes operator).")
    p.add_argument("--namespace", default=None,
                   help="watch only this namespace (default: all namespaces)")
    p.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig file when not running in a pod (default: $KUBECONFIG)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--install-crd", action="store_true",
                   help="install the TaskcoreCluster CRD if it is missing")
    p.add_argument("--resync", type=duration_type, default=5.0, metavar="DURATION",
                   help="reconcile every cluster at least this often (default 5s)")
    p.add_argument("--retire-timeout", type=duration_type, default=60.0, metavar="DURATION",
                   help="how long a worker's retirement may take before its pod is deleted "
                        "anyway (default 60s)")
    p.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=True,
                   help="reconcile only while holding the Lease (default on: replicas stand "
                        "by and take over when the leader goes)")
    p.add_argument("--lease-namespace", default=None,
                   help="namespace of the Lease (default: the pod's, or the kubeconfig's)")
    p.add_argument("--lease-name", default="taskcore-operator", help="name of the Lease")
    p.add_argument("--lease-duration", type=duration_type, default=15.0, metavar="DURATION",
                   help="how long a silent leader keeps the lease (default 15s)")
    p.add_argument("--renew-deadline", type=duration_type, default=10.0, metavar="DURATION",
                   help="how long the leader tries to renew before it gives up (default 10s)")
    p.add_argument("--retry-period", type=duration_type, default=2.0, metavar="DURATION",
                   help="how often candidates and the leader act on the lease (default 2s)")
    add_logging_options(p)
    args = p.parse_args(argv)
    if args.leader_election and not (args.lease_duration > args.renew_deadline
                                     > 1.2 * args.retry_period >= 1):
        p.error("need --lease-duration > --renew-deadline > 1.2 x --retry-period >= 1s")
    return args


async def run(args) -> int:
    from taskcore.deploy.kubernetes.api import ApiError, connect_api
    from taskcore.deploy.kubernetes.controller import Controller
    from taskcore.deploy.kubernetes.leadership import Leadership

    stop = shutdown_event("stopping the operator")
    try:
        api = await connect_api(args.kubeconfig, args.context)
    except (RuntimeError, ImportError) as e:
        exit_with_error(PROG, str(e))
    try:
        try:
            if args.install_crd and not await api.crd_installed():
                await api.install_crd()
                logger.info("installed the TaskcoreCluster CRD")
            await api.list_clusters(args.namespace)
        except ApiError as e:
            exit_with_error(PROG, f"cannot use TaskcoreCluster resources: {e}")
        controller = Controller(api, args.namespace, resync=args.resync,
                                retire_timeout=args.retire_timeout)
        if not args.leader_election:
            await controller.start()
            announce("kube-operator", api.configuration.host,
                     namespace=args.namespace or "*", identity=controller.identity, leader=True)
            await stop.wait()
            await controller.stop()
            return 0

        async def lead():                             # one term: a fresh controller
            term = Controller(api, args.namespace, identity=controller.identity,
                              resync=args.resync, retire_timeout=args.retire_timeout)
            await term.start()
            try:
                await asyncio.Event().wait()          # until the lease is lost
            finally:
                await term.stop()
        leadership = Leadership(api, args.lease_namespace or api.namespace, args.lease_name,
                                controller.identity, lead, args.lease_duration,
                                args.renew_deadline, args.retry_period).start()
        announce("kube-operator", api.configuration.host, namespace=args.namespace or "*",
                 identity=controller.identity, lease=f"{leadership.namespace}/{args.lease_name}")
        await stop.wait()
        await leadership.stop()
    finally:
        await api.close()
    return 0


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
