"""`StandinKubernetes`: a local stand-in of a one-node Kubernetes cluster for tests.

No real kube-apiserver can run on the test machines, so taskcore's Kubernetes support is
tested against this stand-in: an HTTPS API server (apiserver.py, with bearer-token auth
and a self-signed CA), the object store (store.py), the control loops (controllers.py)
and a kubelet that runs pods as local processes (kubelet.py). The unmodified
kubernetes_asyncio client talks to it through the kubeconfig it writes.

Everything runs on an asyncio loop in a background thread, so tests and the code under
test keep their own loops. Usage::

    k = StandinKubernetes(tmp_path, pod_env={"PYTHONPATH": src})
    k.start()
    await kubernetes_asyncio.config.load_kube_config(config_file=k.kubeconfig)
    ...
    k.stop()          # every pod's processes are gone afterwards

Attributes once started: `kubeconfig` (path, str), `url`, `port`, `token` (the admin's
bearer token), `ca_file` (path, str), `serviceaccount_dir` (pathlib.Path),
`incluster_env` (dict), `leaked` (after stop: pod processes that had to be killed).

In-cluster access: `k.serviceaccount_dir` holds `token`, `ca.crt` and `namespace` (the
service-account mount of a pod in "default"), `k.incluster_env` the variables a pod gets
(KUBERNETES_SERVICE_HOST/PORT and TASKCORE_KUBE_SERVICEACCOUNT_DIR, which points
taskcore's in-cluster loader at that directory: the stand-in cannot mount
/var/run/secrets/kubernetes.io/serviceaccount).
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import pathlib
import secrets
import signal
import ssl
import sys
import threading
import time
import uuid

import yaml
from aiohttp import web

from taskcore.testing import wait_until

from .apiserver import ApiServer
from .controllers import (DeploymentController, GarbageCollector, KubeProxy, Kubelet,
                          NamespaceController, ServiceController)
from .registry import NAMESPACES, Registry
from .store import Store

log = logging.getLogger("taskcore.tests.standin")

# Every process a pod starts carries this variable (value: the harness's id), so that a
# leak check can find even a process that left its container's process group.
MARKER_ENV = "TASKCORE_STANDIN_KUBE"
_BASE_ENV_KEYS = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")


def _make_tls(directory: pathlib.Path) -> tuple[str, pathlib.Path, pathlib.Path, pathlib.Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (and the usual in-cluster
    names). Returns (CA PEM, ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin-kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    ca_file, cert_file, key_file = (directory / "ca.crt", directory / "server.crt",
                                    directory / "server.key")
    ca_file.write_text(ca_pem)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_pem, ca_file, cert_file, key_file


class StandinKubernetes:
    """A one-node Kubernetes stand-in (see the module docstring)."""

    def __init__(self, tmp_path, pod_env: dict | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 5.0, history: int = 1000, *, port: int = 0,
                 stop_grace: float = 2.0, gpus: int = 0):
        self.dir = pathlib.Path(tmp_path) / "standin-kubernetes"
        self.id = uuid.uuid4().hex[:12]
        env = {k: os.environ[k] for k in _BASE_ENV_KEYS if k in os.environ}
        env.update(pod_env or {})
        env[MARKER_ENV] = self.id
        self.pod_env = env
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.history = history
        self.stop_grace = stop_grace
        self.gpus = gpus    # nvidia.com/gpu on the stand-in node (its emulated device plugin)
        self._port = port
        self.token = secrets.token_urlsafe(32)
        self.serviceaccount_token = secrets.token_urlsafe(32)
        self._missing_images: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.url = self.kubeconfig = self.ca_file = None
        self.serviceaccount_dir = None
        self.incluster_env: dict[str, str] = {}
        self.port = None
        # (pid, command line) of pod processes still alive after stop(), which killed them.
        self.leaked: list[tuple[int, list[str]]] = []
        self.stop_problems: list[str] = []   # steps of stop() that hung (with task stacks)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "StandinKubernetes":
        if self._thread is not None:
            return self
        if self._stopped:
            raise RuntimeError("a stopped StandinKubernetes cannot start again")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), daemon=True,
                                        name="standin-kubernetes")
        self._thread.start()
        ready.wait()
        try:
            self._call(self._astart(), timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _run_loop(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _call(self, coro, timeout: float = 30):
        """Run a coroutine on the stand-in's loop from another thread; return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _sync(self, fn, *args, timeout: float = 30):
        async def call():
            return fn(*args)
        return self._call(call(), timeout)

    async def _astart(self) -> None:
        ca_pem, ca_file, cert_file, key_file = _make_tls(self.dir / "pki")
        self.ca_pem, self.ca_file = ca_pem, str(ca_file)
        self.store = Store(history=self.history)
        self.registry = Registry(self.store)
        sa_root = self.dir / "serviceaccount"
        self.serviceaccount_dir = sa_root / "default"

        from .kubelet import PodRunner

        self.kubelet = Kubelet(
            self.registry, runner_factory=PodRunner, base_env=self.pod_env,
            incluster_env={}, serviceaccount_root=sa_root, token=self.serviceaccount_token,
            ca_pem=ca_pem, log_dir=self.dir / "pods",
            image_pullable=lambda image: image not in self._missing_images,
            backoff_base=self.backoff_base, backoff_max=self.backoff_max, gpus=self.gpus)
        self.controllers = [NamespaceController(self.registry, ca_pem=ca_pem),
                            GarbageCollector(self.registry),
                            DeploymentController(self.registry),
                            ServiceController(self.registry),
                            KubeProxy(self.registry),
                            self.kubelet]
        self.api = ApiServer(self.registry, tokens={self.token, self.serviceaccount_token},
                             kubelet=self.kubelet)
        self._runner = web.AppRunner(self.api.app(), handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.incluster_env = {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{self.port}",
            "KUBERNETES_PORT_443_TCP": f"tcp://127.0.0.1:{self.port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": str(self.port),
            "KUBERNETES_PORT_443_TCP_ADDR": "127.0.0.1",
            "TASKCORE_KUBE_SERVICEACCOUNT_DIR": str(self.serviceaccount_dir)}
        self.kubelet.incluster_env = dict(self.incluster_env)
        for c in self.controllers:
            c.start()
        ns_rt = self.registry.rt(NAMESPACES)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.registry.create(ns_rt, None, {"metadata": {"name": ns}})
        self.kubelet._serviceaccount_dir("default")
        self.kubeconfig = self._write_kubeconfig(ca_pem)

    def _write_kubeconfig(self, ca_pem: str) -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "standin", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode()}}],
            "users": [{"name": "standin-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "standin", "context": {
                "cluster": "standin", "user": "standin-admin", "namespace": "default"}}],
            "current-context": "standin"}
        path = self.dir / "kubeconfig"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return str(path)

    def stop(self) -> None:
        """Delete every pod (their processes end), stop the servers and the loop. A pod
        process still alive afterwards is killed and listed in `leaked`."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is None:
            return
        try:
            if self._loop.is_running():
                self._call(self._astop(), timeout=self.stop_grace + 60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._kill_leftovers()

    async def _astop(self) -> None:
        # The API first (no new requests), then the controllers that would replace or
        # create pods, then the pods themselves, then the kubelet. Each step is bounded:
        # a step that hangs is logged with the stacks of what it waits for, and stopping
        # goes on (pod processes still alive after that are killed by _kill_leftovers and
        # reported in `leaked`, which fails the test).
        if getattr(self, "api", None) is not None:
            await self._bounded("closing streams", self.api.close_streams(), 10)
        if getattr(self, "_runner", None) is not None:
            await self._bounded("stopping the API server", self._runner.cleanup(), 10)
        kubelet = getattr(self, "kubelet", None)
        for c in getattr(self, "controllers", []):
            if c is not kubelet:
                await self._bounded(f"stopping {c.name}", c.stop(), 10)
        if kubelet is not None and kubelet._task is not None:
            kubelet.stopping = True
            await self._bounded("stopping pods", kubelet.stop_pods(
                self.stop_grace, timeout=self.stop_grace + 10), self.stop_grace + 20)
            await self._bounded("stopping the kubelet", kubelet.stop(), 10)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await self._bounded("cancelling the remaining tasks",
                            asyncio.gather(*tasks, return_exceptions=True), 10)

    async def _bounded(self, what: str, aw, timeout: float) -> None:
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            task.result()
            return
        import io

        stacks = io.StringIO()
        for t in asyncio.all_tasks():
            if t is not asyncio.current_task() and not t.done():
                t.print_stack(limit=8, file=stacks)
        problem = f"stand-in stop: {what} took over {timeout} s; tasks:\n{stacks.getvalue()}"
        log.error("%s", problem)
        self.stop_problems.append(problem)
        task.cancel()

    def leftover_processes(self) -> list:
        """Live processes started by this stand-in's pods (found by MARKER_ENV)."""
        import psutil

        out = []
        for p in psutil.process_iter():
            try:
                if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get(MARKER_ENV) == self.id:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def _kill_leftovers(self) -> None:
        for p in self.leftover_processes():
            try:
                self.leaked.append((p.pid, p.cmdline()))
                log.warning("stand-in: killing leftover pod process %s %s", p.pid, p.cmdline())
                p.send_signal(signal.SIGKILL)
            except Exception:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- inspection and fault injection -----------------------------------------------------

    def objects(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        """A snapshot of the stored objects; `kind` is a Kind ("Pod") or a plural ("pods")."""
        def snap():
            out = []
            for rt in self.store.types():
                if kind is not None and kind not in (rt.kind, rt.plural):
                    continue
                for obj in self.store.list(rt.key, namespace if rt.namespaced else None):
                    if namespace is not None and not rt.namespaced:
                        continue
                    out.append(obj)
            return out
        return self._sync(snap)

    def pods(self, namespace: str | None = None) -> list[dict]:
        return self.objects("Pod", namespace)

    def pod_pids(self, namespace: str | None = None) -> dict[str, list[int]]:
        """Pod name -> pids of its containers' live main processes."""
        return self._sync(self.kubelet.pod_pids, namespace)

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL,
                 container: str | None = None) -> None:
        """Crash a container of the pod (the first one by default); restartPolicy applies."""
        self._sync(lambda: self.kubelet.runner_by_name(namespace, name)
                   .kill_container(container, sig))

    def evict(self, namespace: str, name: str, reason: str = "Evicted",
              message: str = "The node was low on resource: memory. ") -> None:
        """The kubelet evicts the pod (node pressure): phase Failed, reason Evicted; the pod
        object stays (a Deployment replaces it)."""
        async def go():
            await self.kubelet.runner_by_name(namespace, name).evict(reason, message)
        self._call(go(), timeout=60)

    def set_image_missing(self, image: str, missing: bool = True) -> None:
        """The stand-in registry: pulling `image` fails (ErrImagePull, ImagePullBackOff)."""
        if missing:
            self._missing_images.add(image)
        else:
            self._missing_images.discard(image)

    def compact(self) -> None:
        """Drop the watch history: a watch from an older resourceVersion gets 410 Expired."""
        self._sync(self.store.compact)

    @property
    def resource_version(self) -> int:
        return self._sync(lambda: self.store.resource_version)

    def validation_stats(self) -> dict:
        """How much time built-in validation took (count, seconds, compiles)."""
        return self._sync(lambda: dict(self.registry.validator.stats))

    def wait_for(self, predicate, timeout: float = 10.0, message: str = "a condition",
                 interval: float = 0.05):
        """Poll `predicate()` (which typically reads `objects()`/`pods()`) until it returns a
        truthy value, and return that; AssertionError naming `message` after `timeout`."""
        return wait_until(predicate, timeout, message, interval)


def main() -> None:     # python -m tests.deploy.kubernetes.standin
    import tempfile

    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="standin-kube-") as tmp:
        k = StandinKubernetes(tmp, pod_env={"PYTHONPATH": os.pathsep.join(sys.path[1:])})
        k.start()
        print(f"Kubernetes stand-in at {k.url}")
        print(f"export KUBECONFIG={k.kubeconfig}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            k.stop()

