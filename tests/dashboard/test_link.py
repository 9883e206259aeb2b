"""dashboard_link: the template (taskcore/dashboard/link.py) and Client.dashboard_link."""
import urllib.request

import pytest

from taskcore.client import Client
from taskcore.dashboard.link import format_link, link_from_info, normalize_prefix
from taskcore.testing import cluster, run


def test_the_default_template_and_prefixes():
    assert format_link("10.0.0.5", 8787) == "http://10.0.0.5:8787/status"
    assert format_link("h", 1, "a/b/") == "http://h:1/a/b/status"
    assert format_link("::1", 8787) == "http://[::1]:8787/status"
    for raw, norm in [("", ""), (None, ""), ("/", ""), ("x", "/x"), ("/x/y/", "/x/y")]:
        assert normalize_prefix(raw) == norm


def test_the_template_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ann/")
    monkeypatch.setenv("TASKCORE_DASHBOARD_LINK",
                       "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status")
    assert format_link("10.0.0.5", 8787) == "/user/ann/proxy/8787/status"
    monkeypatch.setenv("TASKCORE_DASHBOARD_LINK", "{NO_SUCH_VARIABLE}/{port}")
    monkeypatch.delenv("NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(KeyError, match="NO_SUCH_VARIABLE"):
        format_link("h", 1)


def test_a_wildcard_or_loopback_bind_takes_the_host_the_client_reached():
    info = {"dashboard_host": "0.0.0.0", "dashboard_port": 8787, "dashboard_prefix": ""}
    assert link_from_info(info, reach_host="10.1.2.3") == "http://10.1.2.3:8787/status"
    info["dashboard_host"] = "10.9.9.9"                  # a real interface stays
    assert link_from_info(info, reach_host="10.1.2.3") == "http://10.9.9.9:8787/status"
    assert link_from_info({"dashboard_port": None}) is None


def test_client_dashboard_link_with_a_prefix(monkeypatch):
    monkeypatch.delenv("TASKCORE_DASHBOARD_LINK", raising=False)

    async def main():
        kw = {"dashboard_address": "127.0.0.1:0", "dashboard_prefix": "/tc"}
        async with cluster(n_workers=1, scheduler_kwargs=kw) as (s, _):
            async with Client(s.address, asynchronous=True) as c:
                link = c.dashboard_link
                assert link == f"http://127.0.0.1:{s.dashboard.port}/tc/status"
                assert f'href="{link}"' in c._repr_html_()

    run(main())


def test_the_link_of_a_sync_client_answers(monkeypatch):
    monkeypatch.delenv("TASKCORE_DASHBOARD_LINK", raising=False)
    from taskcore import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as lc, \
            Client(lc.scheduler_address) as c:
        with urllib.request.urlopen(c.dashboard_link, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()


def test_no_dashboard_no_link():
    async def main():
        async with cluster(n_workers=1) as (s, _):
            async with Client(s.address, asynchronous=True) as c:
                assert c.dashboard_link is None
                assert "dashboard" not in c._repr_html_()

    run(main())
