"""Credentials: TLS files for tls:// comms, and a shared token for any comm.

`Security` holds a CA certificate plus this party's certificate and key (PEM
files). Mutual authentication is always required on tls://: each side
verifies that the other's certificate was signed by the CA. Hostnames are not
checked, because workers come and go on addresses nobody knows in advance; the
CA is the trust anchor.

It may also hold a shared `token` (alone, or with the files): every connection
then presents it in its handshake, and a listener with a token refuses peers
without it (compared in constant time, transports/base.py). A token travels in
the clear on tcp://; only tls:// keeps it secret on the network. Without one
given here or to the server, `TASKCORE_TOKEN` in the environment is used.
Child processes (workers under a nanny, a LocalCluster's processes) receive
it through their environment (`token_env`), never on a command line, which
other users of the machine could read.

`Security.temporary()` makes a throwaway self-signed CA and a certificate
signed by it (with the `cryptography` package), for tests and single-machine
clusters.
"""
from __future__ import annotations

import os
import ssl
import weakref


TOKEN_ENV = "TASKCORE_TOKEN"


def resolve_token(token=None, security=None):
    """The token a connection uses: given, else the Security's, else the environment's."""
    if token is None and security is not None:
        token = getattr(security, "token", None)
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and (not isinstance(token, str) or not token):
        raise TypeError(f"a token must be a non-empty string, got {type(token).__name__}")
    return token


def token_env(env=None, security=None, token=None):
    """`env` plus TASKCORE_TOKEN for a child process, when a token is known here."""
    token = resolve_token(token, security)
    if token is None:
        return env
    return {**(env or {}), TOKEN_ENV: token}


def cluster_credentials(security, name, warn):
    """The security choice every remote cluster manager makes (SSH, job queues,
    Kubernetes): None makes throwaway TLS credentials (`Security.temporary()`), a
    `Security` is used as given, False means plain tcp://.

    Returns (the Security or None, the token or None, the directory made here or
    None), and calls `warn(text)` when the cluster would run plain tcp:// without a
    token."""
    made = None
    if security is None:
        # The CA's name adds " CA"; x509 limits a common name to 64 characters.
        security = Security.temporary(common_name=f"taskcore {name}"[:60])
        made = os.path.dirname(security.ca_file)
    elif security is False:
        security = None
    elif not isinstance(security, Security):
        raise TypeError(f"security must be None (temporary TLS credentials), a Security or "
                        f"False (plain tcp), got {security!r}")
    token = resolve_token(None, security)      # the Security's, else TASKCORE_TOKEN here
    if (security is None or not security.enabled) and token is None:
        warn(plain_tcp_warning(name, "security=False" if security is None
                               else "a Security without TLS files"))
    return security, token, made


def plain_tcp_warning(name, why):
    return (f"{name}: {why}: plain tcp:// without a token, so anyone who can reach the "
            f"scheduler's port can run code on the workers (TLS is the default: leave "
            f"security=None; or give Security(token=...))")


class Security:
    def __init__(self, ca_file=None, cert_file=None, key_file=None, require_encryption=False,
                 token=None):
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.require_encryption = require_encryption
        if token is not None and (not isinstance(token, str) or not token):
            raise TypeError(f"Security(token=) must be a non-empty string, got {token!r:.40}")
        self.token = token
        for label, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"Security {label} does not exist: {path}")

    def __repr__(self):
        return (f"Security(ca_file={self.ca_file!r}, cert_file={self.cert_file!r}, "
                f"key_file={self.key_file!r}, require_encryption={self.require_encryption}"
                f"{', token=<hidden>' if self.token else ''})")

    @property
    def enabled(self):
        return bool(self.ca_file and self.cert_file and self.key_file)

    def ssl_context(self, server_side: bool) -> ssl.SSLContext:
        if not self.enabled:
            raise ValueError("Security needs ca_file, cert_file and key_file for tls://")
        purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
        ctx = ssl.create_default_context(purpose, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual authentication, both directions
        return ctx

    def to_options(self):
        """CLI-style options, so launchers can pass credentials to child processes."""
        return {"tls_ca_file": self.ca_file, "tls_cert": self.cert_file, "tls_key": self.key_file}

    @classmethod
    def temporary(cls, directory=None, common_name="taskcore"):
        """A fresh CA and one certificate it signed, written as PEM files in a temp dir."""
        import datetime      # here, not at import: transports import this module
        import shutil
        import tempfile

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        made = directory is None
        directory = directory or tempfile.mkdtemp(prefix="taskcore-tls-")
        now = datetime.datetime.now(datetime.timezone.utc)
        valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                     not_valid_after=now + datetime.timedelta(days=7))

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths = {}
        for name, data in (
            ("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
            ("cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
            ("key.pem", key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())),
        ):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            paths[name] = path
        sec = cls(ca_file=paths["ca.pem"], cert_file=paths["cert.pem"],
                  key_file=paths["key.pem"], require_encryption=True)
        if made:
            # The directory made here goes with the object (or at exit): throwaway
            # credentials must not pile up in /tmp.
            weakref.finalize(sec, shutil.rmtree, directory, ignore_errors=True)
        return sec
