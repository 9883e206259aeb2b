"""KubeCluster end to end against the Kubernetes stand-in (tests/deploy/kubernetes/standin/):
the unmodified kubernetes_asyncio client, real scheduler and worker processes run by the
stand-in's kubelet, reached through its kube-proxy, a port-forward, or a NodePort.

Each test gets a fresh stand-in (the `kube` fixture), which fails the test if any pod
process survives it. Clusters run over tls:// with temporary credentials (the default)
unless a test says otherwise; `assert_tls_cluster` checks how the credentials got there."""
import base64
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from taskcore import Client
from taskcore.deploy.kubernetes import KubeCluster, KubeClusterError, make_worker_spec
from taskcore.deploy.kubernetes import resources as r
from taskcore.security import Security
from taskcore.testing import wait_until

from ..test_dashboard_links import assert_serves

pytestmark = pytest.mark.timeout(240)

# The pods cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def slowinc(x, delay=0.2):
    time.sleep(delay)
    return x + 1


def cluster_objects(kube, name):
    """Every stored object labelled with (or named for) this cluster, and the resource."""
    out = []
    for obj in kube.objects():
        meta = obj.get("metadata") or {}
        if (meta.get("labels") or {}).get(r.LABEL_CLUSTER) == name or (
                obj.get("kind") == r.KIND and meta.get("name") == name):
            out.append(f"{obj.get('kind')}/{meta.get('name')}")
    return out


def worker_pods(kube, name, group=None, running=True):
    pods = []
    for p in kube.pods("default"):
        labels = p["metadata"].get("labels") or {}
        if labels.get(r.LABEL_CLUSTER) != name or labels.get(r.LABEL_COMPONENT) != "worker":
            continue
        if group is not None and labels.get(r.LABEL_GROUP) != group:
            continue
        if p["metadata"].get("deletionTimestamp"):
            continue
        if running and (p.get("status") or {}).get("phase") != "Running":
            continue
        pods.append(p["metadata"]["name"])
    return sorted(pods)


def scheduler_workers(client):
    return {str(w["name"]) for w in client.scheduler_info()["workers"].values()}


def cluster_pods(kube, name):
    return [p for p in kube.pods("default")
            if (p["metadata"].get("labels") or {}).get(r.LABEL_CLUSTER) == name
            and not p["metadata"].get("deletionTimestamp")]


def assert_tls_cluster(kube, cluster, token=None):
    """The cluster runs over tls:// with the credentials of a Secret that its resource
    owns, mounted read-only (0400, TLS files only) into every pod, whose --tls-* options
    name the mount; a token only through secretKeyRef, in no command line (pod specs and
    the processes' argv) but in the processes' environment. Returns the Secret."""
    name = cluster.name
    assert cluster.scheduler_address.startswith("tls://")
    (res,) = [o for o in kube.objects(r.KIND, "default") if o["metadata"]["name"] == name]
    sec = res["spec"]["security"]
    assert sec == {"secretName": sec["secretName"], "tls": True, "token": token is not None}
    assert res["status"]["schedulerAddress"].startswith("tls://")
    (secret,) = [o for o in kube.objects("Secret", "default")
                 if o["metadata"]["name"] == sec["secretName"]]
    assert secret["metadata"]["labels"][r.LABEL_CLUSTER] == name
    assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in
            secret["metadata"]["ownerReferences"]] == [(r.KIND, name, res["metadata"]["uid"],
                                                        True)]
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"} | (
        {"token"} if token else set())
    # What clients here use is what the Secret holds.
    with open(cluster.security.ca_file, "rb") as f:
        assert base64.b64decode(secret["data"]["ca.crt"]) == f.read()
    pods = cluster_pods(kube, name)
    assert {p["metadata"]["labels"][r.LABEL_COMPONENT] for p in pods} == {"scheduler", "worker"}
    for pod in pods:
        spec = pod["spec"]
        (volume,) = [v for v in spec["volumes"] if v.get("secret")]
        assert volume["secret"]["secretName"] == sec["secretName"]
        assert volume["secret"]["defaultMode"] == 0o400
        (c,) = spec["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] and mount["mountPath"] == r.CREDENTIALS_MOUNT
        args = c["args"]
        assert args[args.index("--tls-key") + 1] == f"{r.CREDENTIALS_MOUNT}/tls.key"
        root = (kube.dir / "pods" / f"default_{pod['metadata']['name']}_{pod['metadata']['uid']}"
                / "volumes" / "kubernetes.io~secret" / volume["name"])
        assert stat.S_IMODE(os.stat(root / "tls.key").st_mode) == 0o400
        assert not (root / "token").exists()
        env = {e["name"]: e for e in c["env"]}
        if token:
            assert env["TASKCORE_TOKEN"]["valueFrom"] == {"secretKeyRef": {
                "name": sec["secretName"], "key": "token"}}
            assert token not in json.dumps(pod) and token not in json.dumps(res)
        else:
            assert "TASKCORE_TOKEN" not in env
    if token:
        procs = kube.leftover_processes()      # every live process of every pod
        roles = set()
        for p in procs:
            assert token not in " ".join(p.cmdline()), p.cmdline()
            if p.environ().get("TASKCORE_TOKEN") == token:
                roles |= {w for w in ("core-scheduler", "core-worker")
                          if any(w in a for a in p.cmdline())}
        assert roles == {"core-scheduler", "core-worker"}, [p.cmdline() for p in procs]
    return secret


def assert_all_gone(kube, name, timeout=60):
    wait_until(lambda: not cluster_objects(kube, name), timeout,
               f"every object of {name} to be deleted (left: {cluster_objects(kube, name)})")
    wait_until(lambda: not [p for p in kube.pods("default")
                            if (p["metadata"].get("labels") or {}).get(r.LABEL_CLUSTER) == name],
               timeout, "its pods to be gone")


def test_embedded_cluster_computes_scales_and_leaves_nothing(kube):
    with KubeCluster(name="emb", n_workers=2, controller="embedded", nthreads=1,
                     startup_timeout=120) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.3.")    # the Service's IP
        host = cluster.scheduler_address.split("://")[1].rsplit(":", 1)[0]
        assert cluster.dashboard_link == f"http://{host}:8787/status"   # its dashboard port
        assert_serves(cluster.dashboard_link)
        local = os.path.dirname(cluster.security.ca_file)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            assert_tls_cluster(kube, cluster)
            # Without credentials, a client is told plainly, at once.
            t0 = time.monotonic()
            with pytest.raises(Exception, match="this address speaks tls://"):
                Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout=20)
            assert time.monotonic() - t0 < 10
            assert scheduler_workers(client) == set(worker_pods(kube, "emb"))
            assert sum(client.gather(client.map(inc, range(100)))) == 5050
            cluster.scale(3)
            client.wait_for_workers(3, timeout=60)
            victim = worker_pods(kube, "emb")[0]
            cluster.scale_down([victim])                  # exactly this one goes
            wait_until(lambda: victim not in worker_pods(kube, "emb", running=False), 60,
                       f"{victim} to be deleted")
            assert victim not in scheduler_workers(client)
            assert cluster.refresh()["spec"]["workerGroups"][0]["replicas"] == 2
            cluster.scale(1)
            wait_until(lambda: len(scheduler_workers(client)) == 1, 60, "scale down to 1")
            wait_until(lambda: len(worker_pods(kube, "emb", running=False)) == 1, 60,
                       "one worker pod left")
            assert client.submit(inc, 41).result(timeout=30) == 42
        res = cluster.refresh()
        assert res["status"]["controller"].startswith("embedded/")
        assert "group default" in repr(cluster) and "<table>" in cluster._repr_html_()
        logs = cluster.get_logs()
        assert any(k.startswith("emb-scheduler") for k in logs)
    assert_all_gone(kube, "emb")          # the Secret too: the garbage collector's work
    assert not os.path.exists(local)      # the temporary credentials made here


def test_port_forward_when_the_service_is_not_reachable(kube, tmp_path):
    """Through a port-forward, with TLS end to end and a token: the token reaches the pods
    from the Secret, through their environment only."""
    token = "pf-token-" + os.urandom(8).hex()
    tmp = Security.temporary(directory=str(tmp_path))
    security = Security(tmp.ca_file, tmp.cert_file, tmp.key_file, require_encryption=True,
                        token=token)
    with KubeCluster(name="pf", n_workers=1, controller="embedded", nthreads=1,
                     port_forward_cluster_ip=True, startup_timeout=120,
                     security=security) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert cluster.security is security
        # The dashboard through a port-forward of its own.
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        assert link.split(":")[2] != cluster.scheduler_address.split(":")[2]
        assert_serves(link)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(inc, 1).result(timeout=30) == 2
            big = client.submit(lambda n: b"x" * n, 3_000_000).result(timeout=30)
            assert len(big) == 3_000_000
            assert_tls_cluster(kube, cluster, token=token)
            with pytest.raises(Exception, match="token"):        # the right files, no token
                Client(cluster.scheduler_address, timeout=20,
                       security=Security(tmp.ca_file, tmp.cert_file, tmp.key_file))
    assert os.path.exists(tmp.ca_file)    # a Security given is the caller's: left alone
    assert_all_gone(kube, "pf")


@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_nodeport_and_load_balancer_services(kube, service_type):
    """NodePort with security=False (plain tcp://, one warning, no Secret); LoadBalancer
    with the default TLS."""
    name = service_type.lower()
    plain = service_type == "NodePort"
    with KubeCluster(name=name, n_workers=1, controller="embedded", nthreads=1,
                     scheduler_service_type=service_type, startup_timeout=120,
                     security=False if plain else None) as cluster:
        scheme = cluster.scheduler_address.split("://")[0]
        warnings = [line for line in cluster.get_logs(scheduler=False, workers=False)["Cluster"]
                    if "plain tcp:// without a token" in line]
        if plain:
            assert scheme == "tcp" and cluster.security is None and len(warnings) == 1
            assert "security=False" in warnings[0]
            assert "security" not in cluster.refresh()["spec"]
            assert not [o for o in kube.objects("Secret", "default")
                        if o["metadata"].get("labels", {}).get(r.LABEL_CLUSTER) == name]
        else:
            assert scheme == "tls" and not warnings
        host, port = cluster.scheduler_address.split("://")[1].rsplit(":", 1)
        link = cluster.dashboard_link
        dhost, dport = link.split("://")[1].split("/")[0].rsplit(":", 1)
        if service_type == "NodePort":
            assert host == "127.0.0.1" and 30000 <= int(port) <= 32767
            assert dhost == host and 30000 <= int(dport) <= 32767 and dport != port
        else:
            assert host.startswith("127.4.") and port == "8786"   # the balancer's ingress
            assert dhost == host and dport == "8787"
        assert_serves(link)
        with Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=60) == 2
    assert_all_gone(kube, name)


def test_dashboard_without_a_service_port_or_without_a_dashboard(kube):
    """A custom spec whose Service has no dashboard port: a port-forward to the pod reaches
    it. A scheduler run with --no-dashboard: no link (and a token alone: tcp://, the token
    from an Opaque Secret, enforced)."""
    spec = r.make_cluster_spec("nodash", n_workers=0, scheduler_service_type="NodePort")
    spec["spec"]["scheduler"]["service"]["ports"] = [
        p for p in spec["spec"]["scheduler"]["service"]["ports"] if p["name"] != "dashboard"]
    with KubeCluster(custom_cluster_spec=spec, controller="embedded",
                     startup_timeout=120) as cluster:
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        assert cluster._dashboard_forward is not None
        assert_serves(cluster.dashboard_link)
        assert "dashboardAddress" in cluster.refresh()["status"]
        assert cluster.refresh()["status"]["dashboardAddress"] is None
    spec = r.make_cluster_spec("off", n_workers=0)
    args = spec["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    args[args.index("--dashboard-address"):args.index("--dashboard-address") + 2] = [
        "--no-dashboard"]
    token = "off-token-" + os.urandom(8).hex()
    with KubeCluster(custom_cluster_spec=spec, controller="embedded", startup_timeout=120,
                     security=Security(token=token)) as cluster:
        assert cluster.dashboard_link is None
        assert "Dashboard" not in cluster._repr_html_()
        res = cluster.refresh()
        assert res["status"]["dashboardAddress"].endswith(":8787")
        assert cluster.scheduler_address.startswith("tcp://")
        assert res["spec"]["security"]["tls"] is False and res["spec"]["security"]["token"]
        (secret,) = [o for o in kube.objects("Secret", "default")
                     if o["metadata"]["name"] == res["spec"]["security"]["secretName"]]
        assert secret["type"] == "Opaque" and set(secret["data"]) == {"token"}
        (pod,) = cluster_pods(kube, "off")
        assert "volumes" not in pod["spec"] and token not in json.dumps(pod)
        with Client(cluster) as client:                   # cluster.security: the token
            assert client.scheduler_info()["workers"] == {}
        with pytest.raises(Exception, match="token"):
            Client(cluster.scheduler_address, timeout=20)
    assert_all_gone(kube, "nodash")
    assert_all_gone(kube, "off")


def test_idle_timeout_deletes_an_unused_cluster(kube):
    cluster = KubeCluster(name="idle", n_workers=1, controller="embedded", idle_timeout=2,
                          startup_timeout=120)
    try:
        with Client(cluster) as client:               # a connected client keeps it alive
            assert client.submit(inc, 1).result(timeout=60) == 2
            time.sleep(4)
            assert f"{r.KIND}/idle" in cluster_objects(kube, "idle")
        t0 = time.monotonic()
        try:
            assert_all_gone(kube, "idle", timeout=60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{idle_diagnostics(cluster, 'idle')}") from None
        assert time.monotonic() - t0 > 1.0
    finally:
        cluster.close()                               # the resource is gone already: no error


@pytest.mark.parametrize("port_forward", [None, True], ids=["kube-proxy", "port-forward"])
def test_a_client_that_resets_its_connection_leaves_the_cluster_idle(kube, port_forward):
    """A client gone with a reset (it closed with unread data, or aborted) must be gone for
    the scheduler too, through kube-proxy and through a port-forward alike; else the
    cluster never counts as idle."""
    import socket
    import struct

    cluster = KubeCluster(name="rst", n_workers=0, controller="embedded", idle_timeout=2,
                          port_forward_cluster_ip=port_forward, startup_timeout=120)
    try:
        assert cluster.scheduler_address.startswith(
            "tls://127.0.0.1:" if port_forward else "tls://127.3.")
        client = Client(cluster)
        wait_until(lambda: (cluster._controller.last_view("default", "rst") or {}).get(
            "view", {}) and cluster._controller.last_view("default", "rst")["view"]["clients"],
            30, "the controller to see the client")
        sock = client.comm.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()                                # SO_LINGER 0: close() sends a reset
        try:
            assert_all_gone(kube, "rst", timeout=60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{idle_diagnostics(cluster, 'rst')}") from None
    finally:
        cluster.close()


def idle_diagnostics(cluster, name) -> str:
    """What explains a cluster that was not deleted for idleness: the embedded controller's
    last view of the scheduler (busy? clients? idle for how long? or why it got none), the
    resource's status and the scheduler pod's log."""
    out = []
    controller = cluster._controller
    view = controller.last_view("default", name) if controller is not None else None
    if view is not None:
        view = dict(view, age=f"{time.time() - view['at']:.1f} s ago")
    out.append(f"controller's last view: {view}")
    try:
        out.append(f"status: {cluster.refresh().get('status')}")
        logs = cluster.get_logs(cluster=True, scheduler=True, workers=False)
    except Exception as e:
        out.append(f"(cannot read the resource or the logs: {e!r})")
        logs = {}
    for source, lines in logs.items():
        if isinstance(lines, str):
            lines = lines.splitlines()
        out.append(f"--- {source} (last 40 lines):\n" + "\n".join(lines[-40:]))
    return "\n".join(out)


def _start_operator(kube, tmp_path, tag="operator", *extra):
    log = open(tmp_path / f"{tag}.log", "w")
    env = dict(os.environ, KUBECONFIG=str(kube.kubeconfig))
    proc = subprocess.Popen([sys.executable, "-m", "taskcore.cli.kubernetes", "--namespace",
                             "default", "--resync", "1s", "--install-crd", *extra],
                            stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    line = proc.stdout.readline()
    assert line, (tmp_path / f"{tag}.log").read_text()
    ready = json.loads(line)
    assert ready["role"] == "kube-operator"
    proc.identity = ready["identity"]
    return proc


def resource_status(kube, name):
    for obj in kube.objects(r.KIND, "default"):
        if obj["metadata"]["name"] == name:
            return obj.get("status") or {}
    return {}


def test_operator_replicas_elect_one_leader_and_a_standby_takes_over(kube, tmp_path):
    fast = ["--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "1s"]
    ops = [_start_operator(kube, tmp_path, "a", *fast), _start_operator(kube, tmp_path, "b",
                                                                        *fast)]
    try:
        _create_resource(kube, r.make_cluster_spec("ha", n_workers=1, nthreads=1))
        wait_until(lambda: len(worker_pods(kube, "ha")) == 1, 90, "the cluster's worker")
        leader = wait_until(lambda: resource_status(kube, "ha").get("controller"), 30,
                            "a controller to claim it")
        (first,) = [p for p in ops if p.identity == leader]
        (standby,) = [p for p in ops if p is not first]
        time.sleep(2)
        assert len(worker_pods(kube, "ha", running=False)) == 1     # one reconciler only
        assert resource_status(kube, "ha")["controller"] == first.identity
        first.kill()                                  # dies without handing the lease back
        first.wait()
        victim = worker_pods(kube, "ha")[0]
        kube.evict("default", victim)
        wait_until(lambda: resource_status(kube, "ha").get("controller") == standby.identity,
                   60, "the standby to take over")
        wait_until(lambda: len(worker_pods(kube, "ha")) == 1 and
                   victim not in worker_pods(kube, "ha", running=False), 60,
                   "the standby to replace the evicted worker")
        cluster = KubeCluster.from_name("ha", startup_timeout=60)
        with Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=60) == 2
        cluster.shutdown()
        assert_all_gone(kube, "ha")
    finally:
        for p in ops:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                assert p.wait(30) == 0


def _create_resource(kube, body):
    """What `kubectl apply -f cluster.yaml` does: POST the resource."""
    import asyncio

    from kubernetes_asyncio import client, config

    async def go():
        await config.load_kube_config(config_file=str(kube.kubeconfig))
        async with client.ApiClient() as api:
            await client.CustomObjectsApi(api).create_namespaced_custom_object(
                r.GROUP, r.VERSION, "default", r.PLURAL, body)
    asyncio.run(go())


def _create_secret(kube, body):
    """What `kubectl create secret` does: POST the Secret."""
    import asyncio

    from kubernetes_asyncio import client, config

    async def go():
        await config.load_kube_config(config_file=str(kube.kubeconfig))
        async with client.ApiClient() as api:
            await client.CoreV1Api(api).create_namespaced_secret("default", body)
    asyncio.run(go())


def test_operator_process_reconciles_a_resource_made_with_kubectl(kube, tmp_path):
    """With TLS and a token from a Secret made by hand and named in spec.security: the
    operator reads it to reach the scheduler (it retires a worker through it), and so
    does a client connecting by name."""
    op = _start_operator(kube, tmp_path, "operator", "--log-level", "info")
    try:
        tmp = Security.temporary(directory=str(tmp_path))
        files = {}
        for key, path in (("ca.crt", tmp.ca_file), ("tls.crt", tmp.cert_file),
                          ("tls.key", tmp.key_file)):
            with open(path, "rb") as f:
                files[key] = f.read()
        _create_secret(kube, r.credentials_secret("opc", files, token="opc-token") | {
            "metadata": {"name": "opc-by-hand"}})
        body = r.make_cluster_spec("opc", n_workers=2, nthreads=1)
        body["spec"]["security"] = {"secretName": "opc-by-hand", "token": True}
        _create_resource(kube, body)
        wait_until(lambda: len(worker_pods(kube, "opc")) == 2, 90, "the operator's workers")
        # A client connects by name; the operator keeps reconciling (no embedded controller).
        cluster = KubeCluster.from_name("opc", startup_timeout=60)
        try:
            assert cluster._controller is None
            assert cluster.refresh()["status"]["controller"].startswith("operator/")
            assert cluster.scheduler_address.startswith("tls://")
            assert cluster.security.token == "opc-token"
            with Client(cluster) as client:
                client.wait_for_workers(2, timeout=60)
                assert sum(client.gather(client.map(inc, range(20)))) == 210
                # A worker pod that is killed for good is replaced by the operator.
                victim = worker_pods(kube, "opc")[0]
                kube.evict("default", victim)
                wait_until(lambda: victim not in worker_pods(kube, "opc", running=False)
                           and len(worker_pods(kube, "opc")) == 2, 90, "a replacement pod")
                client.wait_for_workers(2, timeout=60)
                # Retired through the scheduler: the operator knew the workers (its view).
                cluster.scale(1)
                wait_until(lambda: len(scheduler_workers(client)) == 1, 60, "one worker left")
                log = (tmp_path / "operator.log").read_text()
                assert "opc: retiring [" in log and "deleting them anyway" not in log, log
        finally:
            cluster.shutdown()
        assert_all_gone(kube, "opc")
    finally:
        op.send_signal(signal.SIGTERM)
        assert op.wait(30) == 0


def test_operator_as_a_pod_in_cluster(kube, tmp_path):
    """The operator's own manifest (deploy/kubernetes/operator.yaml), run by the stand-in
    with the pod's service account (in-cluster configuration)."""
    import yaml

    from .test_manifests import ROOT

    docs = [d for d in yaml.safe_load_all((ROOT / "operator.yaml").read_text()) if d]
    import asyncio

    from kubernetes_asyncio import client, config

    async def apply():
        await config.load_kube_config(config_file=str(kube.kubeconfig))
        async with client.ApiClient() as api:
            from kubernetes_asyncio import utils
            for d in docs:
                await utils.create_from_dict(api, d)
    asyncio.run(apply())
    # No operator was told to install the CRD: KubeCluster installs it (the stand-in has no
    # RBAC), and the operator in its pod picks the resource up.
    wait_until(lambda: any(p["metadata"]["name"].startswith("taskcore-operator") and
                           (p.get("status") or {}).get("phase") == "Running"
                           for p in kube.pods("taskcore-system")), 60, "the operator pod")
    with KubeCluster(name="inpod", n_workers=1, nthreads=1, controller="operator",
                     operator_timeout=30, startup_timeout=120) as cluster:
        assert cluster.refresh()["status"]["controller"].startswith("operator/")
        with Client(cluster) as c:
            assert c.submit(inc, 1).result(timeout=60) == 2
    assert_all_gone(kube, "inpod")


def test_scheduler_pod_killed_mid_computation(kube):
    with KubeCluster(name="sk", n_workers=2, controller="embedded", nthreads=1,
                     startup_timeout=120) as cluster:
        with Client(cluster) as client:
            client.reconnect_timeout = 120
            client.wait_for_workers(2, timeout=60)
            futures = client.map(slowinc, range(40), delay=0.5)
            time.sleep(1.0)
            (sched,) = [p["metadata"]["name"] for p in kube.pods("default")
                        if p["metadata"]["labels"].get(r.LABEL_COMPONENT) == "scheduler"]
            # Evicted: the pod is gone for good, its Deployment makes a new one (a new IP);
            # the Service's address stays.
            kube.evict("default", sched)
            t0 = time.monotonic()
            with pytest.raises(Exception, match="lost connection to the scheduler"):
                client.gather(futures)
            assert time.monotonic() - t0 < 30          # an error, not a hang
            # Kubernetes restarts the scheduler; workers and client come back by the Service.
            wait_until(lambda: client.status == "running", 120, "the client to reconnect")
            client.wait_for_workers(2, timeout=120)
            futures = client.map(slowinc, range(40), delay=0.01)
            assert client.gather(futures) == list(range(1, 41))
            (new,) = [p["metadata"]["name"] for p in kube.pods("default")
                      if p["metadata"]["labels"].get(r.LABEL_COMPONENT) == "scheduler"
                      and not p["metadata"].get("deletionTimestamp")]
            assert new != sched
            # The scheduler's process crashes (the container restarts in the same pod).
            old_comm = client.comm
            kube.kill_pod("default", new)

            def restarts():
                (pod,) = [p for p in kube.pods("default") if p["metadata"]["name"] == new]
                return pod["status"]["containerStatuses"][0]["restartCount"]
            wait_until(lambda: restarts() >= 1, 30, "the scheduler container to restart")
            wait_until(lambda: client.comm is not old_comm and client.status == "running", 120,
                       "the client to reconnect")
            client.wait_for_workers(2, timeout=120)
            assert client.submit(inc, 1, key="after-crash").result(timeout=60) == 2
            # Worker pods killed: the computation still finishes right.
            futures = client.map(slowinc, range(60), delay=0.2, key=[f"w{i}" for i in range(60)])
            for victim in worker_pods(kube, "sk"):
                kube.kill_pod("default", victim)
            assert client.gather(futures) == list(range(1, 61))
    assert_all_gone(kube, "sk")


def test_adaptive_groups_scale_independently_without_losing_results(kube):
    with KubeCluster(name="ad", n_workers=1, controller="embedded", nthreads=1,
                     startup_timeout=120) as cluster:
        cluster.add_worker_group("extra", n_workers=0)
        cluster.adapt(minimum=1, maximum=2, interval=0.5, wait_count=2)
        cluster.adapt(minimum=0, maximum=2, worker_group="extra", interval=0.5, wait_count=2)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            # Results held while the cluster grows and shrinks under load.
            held = client.map(inc, range(50), key=[f"held-{i}" for i in range(50)])
            client.gather(held)
            work = client.map(slowinc, range(200), delay=0.3)
            wait_until(lambda: len(worker_pods(kube, "ad", "default")) == 2 and
                       len(worker_pods(kube, "ad", "extra")) == 2, 120,
                       "both groups at their maximum")
            assert client.gather(work) == list(range(1, 201))
            wait_until(lambda: len(worker_pods(kube, "ad", "default", running=False)) == 1 and
                       not worker_pods(kube, "ad", "extra", running=False), 120,
                       "both groups back at their minimum")
            assert client.gather(held) == list(range(1, 51))       # nothing lost
            # A manual scale of one group ends its adaptation only.
            cluster.scale(2, worker_group="extra")
            groups = {g["name"]: g for g in cluster.refresh()["spec"]["workerGroups"]}
            assert "adapt" not in groups["extra"] and groups["default"]["adapt"]["maximum"] == 2
            wait_until(lambda: len(worker_pods(kube, "ad", "extra")) == 2, 90, "extra at 2")
            time.sleep(3)                                 # idle: default stays at its minimum,
            assert len(worker_pods(kube, "ad", "extra", running=False)) == 2   # extra untouched
    assert_all_gone(kube, "ad")


@pytest.mark.parametrize("failure", ["crash", "image"])
def test_pods_that_cannot_run_fail_fast_with_the_reason(kube, failure):
    if failure == "image":
        kube.set_image_missing("example.org/missing:1")
        kwargs = {"image": "example.org/missing:1"}
        expect = "ImagePullBackOff|ErrImagePull"
    else:
        spec = r.make_cluster_spec("bad-crash", n_workers=1)
        c = spec["spec"]["scheduler"]["spec"]["containers"][0]
        c["command"] = [sys.executable, "-c",
                        "import sys; print('scheduler config is broken', flush=True); "
                        "sys.exit(3)"]
        c["args"] = []
        kwargs = {"custom_cluster_spec": spec}
        expect = "CrashLoopBackOff"
    name = f"bad-{failure}"
    t0 = time.monotonic()
    with pytest.raises(KubeClusterError, match=expect) as info:
        KubeCluster(name=name, controller="embedded", startup_timeout=120, **kwargs)
    assert time.monotonic() - t0 < 60
    if failure == "crash":
        assert "exit code 3" in str(info.value)
        assert "scheduler config is broken" in str(info.value)     # the pod's last log lines
    assert_all_gone(kube, name)     # a failed start cleans up


def test_detach_and_from_name_in_a_new_process(kube):
    """A detached TLS cluster: another process connects with the credentials it reads back
    from the cluster's Secret (into a private temporary directory, removed at the end)."""
    code = textwrap.dedent("""
        import os
        from taskcore.deploy.kubernetes import KubeCluster
        c = KubeCluster(name="det", n_workers=1, nthreads=1, controller="embedded",
                        shutdown_on_close=False, startup_timeout=120)
        print(c.scheduler_address)
        print(os.path.dirname(c.security.ca_file))
        c.close()
    """)
    env = dict(os.environ, KUBECONFIG=str(kube.kubeconfig))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    assert "KubeCluster" not in out.stdout
    address, made_there = out.stdout.split()
    assert address.startswith("tls://")
    assert not os.path.exists(made_there)             # removed when that process exited
    # Still there, without its maker; no longer labelled embedded (an operator may take it).
    assert f"{r.KIND}/det" in cluster_objects(kube, "det")
    assert worker_pods(kube, "det", running=False)
    with pytest.raises(KubeClusterError, match="security=False cannot connect"):
        KubeCluster.from_name("det", security=False)
    cluster = KubeCluster.from_name("det", operator_timeout=0.5)
    assert cluster._controller is not None            # no operator: reconciled from here
    assert cluster.scheduler_address == address
    local = os.path.dirname(cluster.security.ca_file)
    assert stat.S_IMODE(os.stat(local).st_mode) == 0o700
    assert {stat.S_IMODE(os.stat(os.path.join(local, f)).st_mode)
            for f in os.listdir(local)} == {0o600}
    with Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(inc, 1).result(timeout=30) == 2
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
    cluster.shutdown()
    assert not os.path.exists(local)
    assert_all_gone(kube, "det")


def test_bad_arguments_fail_before_anything_is_made(kube):
    with pytest.raises(ValueError, match="scheduler_service_type"):
        KubeCluster(name="x1", scheduler_service_type="Magic")
    with pytest.raises(ValueError, match="controller"):
        KubeCluster(name="x1", controller="nobody")
    with pytest.raises(TypeError, match="security must be None"):
        KubeCluster(name="x1", security="tls")
    with pytest.raises(KubeClusterError, match="no TaskcoreCluster named 'nope'"):
        KubeCluster.from_name("nope")
    with pytest.raises(ValueError, match="must be a TaskcoreCluster"):
        KubeCluster(custom_cluster_spec={"kind": "Pod"})
    with KubeCluster(name="x2", n_workers=0, controller="embedded",
                     startup_timeout=120) as cluster:
        with pytest.raises(ValueError, match="no worker group"):
            cluster.scale(1, worker_group="ghost")
        with pytest.raises(ValueError, match="already exists"):
            cluster.add_worker_group("default")
        with pytest.raises(KubeClusterError, match="already exists"):
            KubeCluster(name="x2", create_mode="create_only")
        cluster.add_worker_group("gpu", n_workers=0,
                                 custom_spec=make_worker_spec(name="gpu", n_workers=0))
        cluster.delete_worker_group("gpu")
        with pytest.raises(ValueError, match="no worker group"):
            cluster.delete_worker_group("gpu")
    assert_all_gone(kube, "x2")


def test_asynchronous_cluster(kube):
    import asyncio

    async def main():
        async with KubeCluster(name="as", n_workers=1, nthreads=1, controller="embedded",
                               startup_timeout=120, asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=60)
                assert await client.submit(inc, 1) == 2
                await cluster.scale(2)
                await client.wait_for_workers(2, timeout=60)
                logs = await cluster.get_logs()
                assert any(k.startswith("as-default-") for k in logs)
    asyncio.run(main())
    assert_all_gone(kube, "as")


def _edit_resource(kube, name, edit):
    """What `kubectl edit tcc NAME` does: read, change, PUT with the resourceVersion."""
    import asyncio

    from kubernetes_asyncio import client, config

    async def go():
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=cfg)
        async with client.ApiClient(cfg) as api:
            co = client.CustomObjectsApi(api)
            obj = await co.get_namespaced_custom_object(r.GROUP, r.VERSION, "default", r.PLURAL,
                                                        name)
            edit(obj)
            await co.replace_namespaced_custom_object(r.GROUP, r.VERSION, "default", r.PLURAL,
                                                      name, obj)
    asyncio.run(go())


def read_env(name):
    return os.environ.get(name)


def test_a_changed_worker_spec_rolls_the_workers(kube):
    with KubeCluster(name="roll", n_workers=2, controller="embedded", nthreads=1,
                     startup_timeout=120) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            held = client.map(inc, range(20), key=[f"h{i}" for i in range(20)])
            client.gather(held)
            before = set(worker_pods(kube, "roll"))

            def add_env(obj):
                c = obj["spec"]["workerGroups"][0]["spec"]["containers"][0]
                c.setdefault("env", []).append({"name": "ROLLED", "value": "yes"})
            _edit_resource(kube, "roll", add_env)
            wait_until(lambda: len(worker_pods(kube, "roll")) == 2 and
                       not set(worker_pods(kube, "roll", running=False)) & before, 120,
                       "every worker replaced")
            client.wait_for_workers(2, timeout=60)
            wait_until(lambda: len(scheduler_workers(client)) == 2, 60, "two workers")
            assert set(client.run(read_env, "ROLLED").values()) == {"yes"}
            assert client.gather(held) == list(range(1, 21))     # retired, not lost
    assert_all_gone(kube, "roll")


@pytest.mark.parametrize("args, code, words", [
    (["--lease-duration", "2s", "--renew-deadline", "3s"], 2, ["--lease-duration"]),
    (["--resync", "often"], 2, ["duration"]),
    (["--kubeconfig", "/no/such/kubeconfig"], 1, ["no Kubernetes configuration",
                                                  "/no/such/kubeconfig"]),
])
def test_operator_bad_options_and_no_configuration(args, code, words, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.kubernetes", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("core-kube-operator: error:")
    assert all(w in line for w in words), line
    assert out.stdout == ""
