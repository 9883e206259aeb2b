import pytest

from taskcore.errors import AddressError
from taskcore.transports.addressing import (parse_address, parse_host_port, unparse_address,
                                            unparse_host_port)


def test_parse_address():
    assert parse_address("tcp://1.2.3.4:80") == ("tcp", "1.2.3.4:80")
    assert parse_address("1.2.3.4:80") == ("tcp", "1.2.3.4:80")
    assert parse_address("TLS://[::1]:0") == ("tls", "[::1]:0")
    with pytest.raises(AddressError):
        parse_address("1.2.3.4:80", strict=True)
    with pytest.raises(AddressError):
        parse_address(1234)
    with pytest.raises(AddressError):
        parse_address("t cp://x:1")


def test_host_port_ipv6():
    assert parse_host_port("[::1]:8786") == ("::1", 8786)
    assert parse_host_port("[fe80::1]", 5) == ("fe80::1", 5)
    assert parse_host_port("host:0") == ("host", 0)
    assert unparse_host_port("::1", 80) == "[::1]:80"
    assert unparse_host_port("1.2.3.4", 80) == "1.2.3.4:80"
    assert unparse_address("tcp", unparse_host_port("::1", 1)) == "tcp://[::1]:1"
    for bad in ("::1:80", "[::1:80", "h:99999", "h:-1", "h:x", "h"):
        with pytest.raises(AddressError):
            parse_host_port(bad)
