"""`core-kube-operator`: the TaskcoreCluster controller as a long-running process.

    core-kube-operator                      # every namespace
    core-kube-operator --namespace team-a   # one namespace
    core-kube-operator --install-crd        # install the CRD first if missing

Deployed in the cluster as a Deployment (deploy/kubernetes/operator.yaml, with
its service account and RBAC), it uses the pod's service account; run
elsewhere, the kubeconfig. It reconciles every TaskcoreCluster except those a
client reconciles itself (labelled taskcore.dev/controller=embedded), prints
one JSON ready line on stdout once its watches started, and exits 0 on SIGTERM
or SIGINT. Exit status 1: no Kubernetes configuration, or the API refused us.
"""
from __future__ import annotations

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
    add_logging_options(p)
    return p.parse_args(argv)


async def run(args) -> int:
    from taskcore.deploy.kubernetes.api import ApiError, connect_api
    from taskcore.deploy.kubernetes.controller import Controller

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
        await controller.start()
        announce("kube-operator", api.configuration.host,
                 namespace=args.namespace or "*", identity=controller.identity)
        await stop.wait()
        await controller.stop()
    finally:
        await api.close()
    return 0


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
