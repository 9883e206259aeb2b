"""TLS failures fail at once and say why, on both sides (issue 16, fault 6)."""
import asyncio
import logging
import time

import pytest

from taskcore.errors import HandshakeError
from taskcore.security import Security
from taskcore.testing import echo_listener, run
from taskcore.transports import connect
from taskcore.transports.policy import ConnectionPolicy


@pytest.fixture(scope="module")
def creds():
    return Security.temporary(), Security.temporary()


def _refused(caplog, server_address, client_scheme, server_security=None, **client_options):
    """Connect to an echo listener, expecting HandshakeError. Returns the error's
    text, the seconds it took, and the listener's log; checks the listener still
    serves a good client afterwards."""
    async def main():
        opts = {"security": server_security} if server_security is not None else {}
        server = await echo_listener(server_address, **opts)
        scheme = server.contact_address.split("://")[0]
        try:
            with caplog.at_level(logging.WARNING, logger="taskcore"):
                t = time.monotonic()
                with pytest.raises(HandshakeError) as info:
                    await connect(server.contact_address.replace(f"{scheme}://",
                                                                 f"{client_scheme}://"),
                                  timeout=10, **client_options)
                took = time.monotonic() - t
            good = await connect(server.contact_address, **opts)
            await good.write("ok")
            assert await good.read() == "ok"
            await good.close()
        finally:
            await server.stop()
        return str(info.value), took

    msg, took = run(main())
    return msg, took, caplog.text


def test_wrong_ca_fails_at_once_with_the_verification_message(creds, caplog):
    ours, other = creds
    msg, took, log = _refused(caplog, "tls://127.0.0.1:0", "tls", ours, security=other)
    assert took < 2, f"a certificate failure was retried for {took:.1f} s"
    assert "certificate verification failed" in msg
    assert "TLS handshake failed" in log          # and the server said so


def test_server_refusing_the_client_certificate_is_clear(creds, caplog):
    ours, other = creds
    # Trusts the server's CA, but presents a certificate from another CA.
    mixed = Security(ca_file=ours.ca_file, cert_file=other.cert_file, key_file=other.key_file)
    msg, took, log = _refused(caplog, "tls://127.0.0.1:0", "tls", ours, security=mixed)
    assert took < 2
    assert "refusing connection from" in log and "certificate" in log.lower()
    assert "tls://" in msg


def test_plain_tcp_against_tls_says_so(creds, caplog):
    ours, _ = creds
    msg, took, log = _refused(caplog, "tls://127.0.0.1:0", "tcp", ours)
    assert took < 2
    assert "this address speaks tls://" in msg
    assert "plain tcp:// to a tls:// address" in log


def test_tls_against_plain_tcp_says_so(creds, caplog):
    ours, _ = creds
    msg, took, log = _refused(caplog, "tcp://127.0.0.1:0", "tls", security=ours)
    assert took < 2
    assert "does not speak TLS" in msg
    assert "began a TLS handshake, but this side speaks plain tcp://" in log


def test_silent_tls_peer_is_dropped_after_the_handshake_timeout(creds, caplog):
    ours, _ = creds

    async def main():
        server = await echo_listener("tls://127.0.0.1:0", security=ours,
                                     policy=ConnectionPolicy(handshake_timeout=0.3))
        host, port = server.contact_address[6:].rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            reader, writer = await asyncio.open_connection(host, int(port))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await server.stop()

    run(main())
    assert "handshake timeout" in caplog.text


def test_a_port_probe_is_not_logged(creds, caplog):
    """A readiness check connects and closes: nothing to report."""
    ours, _ = creds

    async def main():
        server = await echo_listener("tls://127.0.0.1:0", security=ours)
        host, port = server.contact_address[6:].rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            await asyncio.sleep(0.3)
        await server.stop()

    run(main())
    assert "refusing connection" not in caplog.text
