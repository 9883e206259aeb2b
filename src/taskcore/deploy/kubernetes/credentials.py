"""A cluster's credentials: a `Security` here, a Secret in Kubernetes.

KubeCluster (cluster.py) makes the credentials of a new cluster (by default
`Security.temporary()`), stores them in a Secret that the TaskcoreCluster owns
(`resources.credentials_secret`) and names it in `spec.security`;
resources.py mounts it into the pods. Whoever else must reach the scheduler
reads the Secret back with `security_from_secret`: a KubeCluster connecting
later (`from_name`), and the operator's controller (`SecretCredentials`, which
asks each scheduler for its workers). The TLS files are written to a new
private temporary directory here (0700, each file 0600), which its owner
removes when done with it (else it goes with the Security object, or at exit);
a token stays in memory.
"""
from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import weakref

from taskcore.deploy.kubernetes import resources as r
from taskcore.security import Security

__all__ = ["CredentialsError", "tls_files", "security_from_secret", "SecretCredentials"]


class CredentialsError(RuntimeError):
    """A Secret named by spec.security is missing or does not hold what it should."""


def tls_files(security) -> dict:
    """{ca.crt, tls.crt, tls.key: PEM bytes} read from a Security's files."""
    out = {}
    for key, path in ((r.SECRET_CA, security.ca_file), (r.SECRET_CERT, security.cert_file),
                      (r.SECRET_KEY, security.key_file)):
        with open(path, "rb") as f:
            out[key] = f.read()
    return out


def security_from_secret(secret: dict, sec_spec: dict,
                         prefix: str = "taskcore-kube-") -> tuple[Security, str | None]:
    """(a Security, the private directory holding its files or None) from the Secret that
    `sec_spec` (a resource's `resources.cluster_security`) names."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    data = secret.get("data") or {}

    def value(key) -> bytes:
        if not data.get(key):
            raise CredentialsError(f"{where} has no key {key!r} (spec.security says it holds "
                                   f"{'TLS files' if key in r.TLS_KEYS else 'a token'})")
        try:
            return base64.b64decode(data[key], validate=True)
        except (binascii.Error, ValueError):
            raise CredentialsError(f"{where}: key {key!r} is not base64") from None

    token = None
    if sec_spec.get("token"):
        token = value(r.SECRET_TOKEN).decode(errors="replace").strip()
        if not token:
            raise CredentialsError(f"{where}: the token is empty")
    if not sec_spec.get("tls", True):
        return Security(token=token), None
    contents = {key: value(key) for key in r.TLS_KEYS}
    directory = tempfile.mkdtemp(prefix=prefix)     # 0700
    try:
        paths = {}
        for key, text in contents.items():
            path = os.path.join(directory, key)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            paths[key] = path
        security = Security(ca_file=paths[r.SECRET_CA], cert_file=paths[r.SECRET_CERT],
                            key_file=paths[r.SECRET_KEY], require_encryption=True, token=token)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    # Like Security.temporary(): the directory goes with the object (or at exit) if its
    # owner does not remove it first.
    weakref.finalize(security, shutil.rmtree, directory, ignore_errors=True)
    return security, directory


class SecretCredentials:
    """The controller's credentials for each cluster's scheduler, read from the Secret its
    spec.security names (the operator needs `get` on secrets for that). Cached per
    cluster while its uid and spec.security stay the same; `drop` one after a failure, so
    that the next pass reads the Secret again; `clear` at the end removes every file."""

    def __init__(self, api):
        self.api = api
        self._cache: dict = {}      # (ns, name) -> (identity, Security, directory)

    async def security_for(self, cluster: dict) -> Security | None:
        meta = cluster["metadata"]
        key = (meta.get("namespace"), meta["name"])
        sec = r.cluster_security(cluster)
        if sec is None:
            self.drop(*key)
            return None
        ident = (meta.get("uid"), sec["secretName"], sec["tls"], sec["token"])
        hit = self._cache.get(key)
        if hit is not None and hit[0] == ident:
            return hit[1]
        self.drop(*key)
        secret = await self.api.get_secret(key[0], sec["secretName"])
        if secret is None:
            raise CredentialsError(f"Secret {key[0]}/{sec['secretName']} (spec.security of "
                                   f"{key[1]}) does not exist")
        security, directory = security_from_secret(secret, sec, prefix="taskcore-operator-")
        self._cache[key] = (ident, security, directory)
        return security

    def drop(self, ns: str, name: str) -> None:
        hit = self._cache.pop((ns, name), None)
        if hit is not None and hit[2]:
            shutil.rmtree(hit[2], ignore_errors=True)

    def clear(self) -> None:
        for key in list(self._cache):
            self.drop(*key)
