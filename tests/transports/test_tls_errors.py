"""TLS failures fail at once and say why, on both sides (issue 16, fault 6)."""
import logging
import time

import pytest

from taskcore.errors import CommClosedError, HandshakeError
from taskcore.security import Security
from taskcore.testing import run
from taskcore.transports import connect, listen


async def _echo(address, **kw):
    async def handler(comm):
        while True:
            try:
                msg = await comm.read()
            except CommClosedError:
                return
            await comm.write(msg)

    return await listen(address, handler, **kw)


@pytest.fixture(scope="module")
def creds():
    return Security.temporary(), Security.temporary()


def _quick_failure(coro_fn, timeout=10):
    """Runs `coro_fn()`, expecting HandshakeError well before `timeout`."""
    async def main():
        t = time.monotonic()
        with pytest.raises(HandshakeError) as info:
            await coro_fn(timeout)
        return str(info.value), time.monotonic() - t

    return run(main())


def test_wrong_ca_fails_at_once_with_the_verification_message(creds, caplog):
    ours, other = creds

    async def main():
        server = await _echo("tls://127.0.0.1:0", security=ours)
        try:
            with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
                t = time.monotonic()
                with pytest.raises(HandshakeError) as info:
                    await connect(server.contact_address, timeout=10, security=other)
                took = time.monotonic() - t
        finally:
            await server.stop()
        return str(info.value), took

    msg, took = run(main())
    assert took < 2, f"a certificate failure was retried for {took:.1f} s"
    assert "certificate verification failed" in msg
    assert "TLS handshake failed" in caplog.text          # and the server said so


def test_server_refusing_the_client_certificate_is_clear(creds, caplog):
    ours, other = creds
    # Trusts the server's CA, but presents a certificate from another CA.
    mixed = Security(ca_file=ours.ca_file, cert_file=other.cert_file, key_file=other.key_file)

    async def main():
        server = await _echo("tls://127.0.0.1:0", security=ours)
        try:
            with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
                t = time.monotonic()
                with pytest.raises(HandshakeError) as info:
                    await connect(server.contact_address, timeout=10, security=mixed)
                took = time.monotonic() - t
        finally:
            await server.stop()
        return str(info.value), took

    msg, took = run(main())
    assert took < 2
    assert "refusing connection from" in caplog.text and "certificate" in caplog.text.lower()
    assert "tls://" in msg


def test_plain_tcp_against_tls_says_so(creds, caplog):
    ours, _ = creds

    async def main():
        server = await _echo("tls://127.0.0.1:0", security=ours)
        try:
            with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
                with pytest.raises(HandshakeError) as info:
                    await connect(server.contact_address.replace("tls://", "tcp://"), timeout=10)
            # The listener is unharmed.
            good = await connect(server.contact_address, security=ours)
            await good.write("ok")
            assert await good.read() == "ok"
            await good.close()
        finally:
            await server.stop()
        return str(info.value)

    msg = run(main())
    assert "this address speaks tls://" in msg
    assert "plain tcp:// to a tls:// address" in caplog.text


def test_tls_against_plain_tcp_says_so(creds, caplog):
    ours, _ = creds

    async def main():
        server = await _echo("tcp://127.0.0.1:0")
        try:
            with caplog.at_level(logging.WARNING, logger="taskcore"):
                t = time.monotonic()
                with pytest.raises(HandshakeError) as info:
                    await connect(server.contact_address.replace("tcp://", "tls://"),
                                  timeout=10, security=ours)
                took = time.monotonic() - t
        finally:
            await server.stop()
        return str(info.value), took

    msg, took = run(main())
    assert took < 2
    assert "does not speak TLS" in msg
    assert "began a TLS handshake, but this side speaks plain tcp://" in caplog.text


def test_silent_tls_peer_is_dropped_after_the_handshake_timeout(creds, caplog):
    import asyncio

    from taskcore.transports.policy import ConnectionPolicy

    ours, _ = creds

    async def main():
        server = await _echo("tls://127.0.0.1:0", security=ours,
                             policy=ConnectionPolicy(handshake_timeout=0.3))
        host, port = server.contact_address[6:].rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            reader, writer = await asyncio.open_connection(host, int(port))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await server.stop()

    run(main())
    assert "handshake timeout" in caplog.text
