"""`Cluster.dashboard_link`: a link that works from the client's machine, for each way a
scheduler can run (in this process, a subprocess, a detached process, another host over
SSH, directly or through a tunnel). Each test fetches the link with urllib, as a browser
on the client's machine would. Job queues and Kubernetes have their own tests next to
their fixtures (jobqueue/test_dashboard_links.py, kubernetes/test_kube_cluster.py)."""
import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from taskcore import LocalCluster, SpecCluster
from taskcore.deploy.local import dashboard_on_host
from taskcore.process import scheduler_cli_args
from taskcore.scheduler import Scheduler
from taskcore.testing import import_required


@pytest.fixture(autouse=True)
def default_link_template(monkeypatch):
    # A template from the environment would change every link these tests check.
    monkeypatch.delenv("TASKCORE_DASHBOARD_LINK", raising=False)


def fetch(url: str, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of a GET, following redirects; an HTTP error status is returned."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def health_url(link: str) -> str:
    assert link.endswith("/status"), link
    return link[:-len("/status")] + "/api/v1/health"


def assert_serves(link: str):
    """The health check says ok and the link itself (the status page) answers 200."""
    assert fetch(health_url(link)) == (200, b"ok")
    status, body = fetch(link)
    assert status == 200, (link, status, body[:300])


def busy_port() -> socket.socket:
    """A socket listening on 127.0.0.1 (its port is taken while it lives)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# -- LocalCluster and SpecCluster -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"processes": False},
                                    {"shutdown_on_close": False, "n_workers": 0}],
                         ids=["scheduler-process", "in-process", "detached"])
def test_local_cluster_link_reaches_its_dashboard(kwargs):
    with busy_port() as taken:
        port = taken.getsockname()[1]
        # The requested port is taken: the scheduler serves another one and the link says so.
        cluster = LocalCluster(n_workers=kwargs.pop("n_workers", 1), threads_per_worker=1,
                               dashboard_address=f":{port}", **kwargs)
    try:
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        assert f":{port}/" not in link
        assert_serves(link)
        html = cluster._repr_html_()
        assert f"<a href='{link}' target='_blank'>{link}</a>" in html
        assert f"dashboard={link}" in repr(cluster)
        if not cluster.shutdown_on_close:
            # Reconnected, the cluster knows the link from the scheduler's registry record.
            cluster.close()
            cluster = LocalCluster.from_name(cluster.name)
            assert cluster.dashboard_link == link
    finally:
        cluster.shutdown()


def test_local_cluster_prefix_and_no_dashboard():
    with LocalCluster(n_workers=0, dashboard_address="127.0.0.1:0",
                      dashboard_prefix="tc/board/") as cluster:
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/tc/board/status")
        assert_serves(link)
    with LocalCluster(n_workers=0, dashboard_address=None) as cluster:
        assert cluster.dashboard_link is None
        assert "Dashboard" not in cluster._repr_html_() and "dashboard=" not in repr(cluster)


def test_link_template_from_the_environment(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ann/")
    monkeypatch.setenv("TASKCORE_DASHBOARD_LINK", "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status")
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        port = cluster._dashboard["dashboard_port"]
        assert cluster.dashboard_link == f"/user/ann/proxy/{port}/status"
        # A relative link is still a link in a notebook (served by the same Jupyter server).
        assert f"<a href='/user/ann/proxy/{port}/status'" in cluster._repr_html_()
        monkeypatch.setenv("TASKCORE_DASHBOARD_LINK", "{NO_SUCH_VARIABLE_FOR_TASKCORE}")
        with pytest.raises(KeyError, match="NO_SUCH_VARIABLE_FOR_TASKCORE"):
            cluster.dashboard_link
        assert "bad $TASKCORE_DASHBOARD_LINK" in repr(cluster)     # printing still works


def test_html_never_links_a_script(monkeypatch):
    monkeypatch.setenv("TASKCORE_DASHBOARD_LINK", "javascript:alert({port})")
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        html = cluster._repr_html_()
        assert "javascript:alert(" in html and "href='javascript" not in html


def test_spec_cluster_scheduler_specs_take_the_dashboard_options():
    from taskcore.deploy.process import SchedulerProcess

    for cls in (Scheduler, SchedulerProcess):
        spec = {"cls": cls, "options": {"dashboard_address": "127.0.0.1:0",
                                        "dashboard_prefix": "/x"}}
        with SpecCluster(scheduler=spec, workers={}) as cluster:
            assert cluster.dashboard_link.endswith("/x/status")
            assert_serves(cluster.dashboard_link)
        with SpecCluster(scheduler={"cls": cls, "options": {}}, workers={}) as cluster:
            # Scheduler() serves no dashboard unless asked; core-scheduler serves :8787.
            assert (cluster.dashboard_link is None) == (cls is Scheduler)


def test_bad_dashboard_options_fail_in_the_caller():
    with pytest.raises(ValueError, match="dashboard address"):
        LocalCluster(n_workers=0, dashboard_address="127.0.0.1:http")
    with pytest.raises(TypeError, match="dashboard_address"):
        scheduler_cli_args(dashboard_address=["x"])


def test_scheduler_command_lines():
    assert "--no-dashboard" in scheduler_cli_args(dashboard_address=None)
    args = scheduler_cli_args(dashboard_address=":9000", dashboard_prefix="/a")
    assert args[args.index("--dashboard-address") + 1] == ":9000"
    assert args[args.index("--dashboard-prefix") + 1] == "/a"
    assert not {"--dashboard-address", "--no-dashboard"} & set(scheduler_cli_args())
    assert dashboard_on_host(":8787", "10.1.2.3") == "10.1.2.3:8787"
    assert dashboard_on_host(8787, "::1") == "[::1]:8787"
    assert dashboard_on_host("0.0.0.0:1", "10.1.2.3") == "0.0.0.0:1"
    assert dashboard_on_host(None, "10.1.2.3") is None


def test_a_scheduler_that_cannot_say_leaves_no_link():
    """A handle without a ready line is asked once; one that cannot answer gives None."""
    class Quiet(SpecCluster):
        async def _scheduler_rpc(self, method, args=None, timeout=30):
            raise ConnectionError("no answer")

    with Quiet(scheduler={"cls": Scheduler, "options": {"dashboard_address": "127.0.0.1:0"}},
               workers={}) as cluster:
        assert cluster.dashboard_link is None
        assert any("cannot ask the scheduler about its dashboard" in line
                   for line in cluster.get_logs()["Cluster"])


# -- SSHCluster ---------------------------------------------------------------------------------

def ssh_cluster(netns_hosts, ssh_cluster_kwargs, **kwargs):
    from taskcore.deploy.ssh import SSHCluster

    h1, h2 = netns_hosts[0], netns_hosts[1]
    return SSHCluster([h1.address, h2.address], connect_options=netns_hosts.connect_options(),
                      worker_options={"nthreads": 1}, **ssh_cluster_kwargs, **kwargs)


def test_ssh_cluster_links_to_the_scheduler_host(netns_hosts, ssh_cluster_kwargs):
    """The scheduler on h1 (another network namespace): its dashboard answers at h1's
    address, so the link points there, with no tunnel."""
    import_required("asyncssh", "SSH tests need the [ssh] extra")
    h1 = netns_hosts[0]
    with ssh_cluster(netns_hosts, ssh_cluster_kwargs) as cluster:
        assert cluster._tunnel is None
        assert cluster.dashboard_link == f"http://{h1.address}:8787/status"
        assert_serves(cluster.dashboard_link)


def test_ssh_cluster_tunnels_a_dashboard_it_cannot_reach(netns_hosts, ssh_cluster_kwargs):
    """Bound to h1's loopback, the dashboard is out of our reach: the link is the local end
    of an SSH tunnel, which closes with the cluster."""
    import_required("asyncssh", "SSH tests need the [ssh] extra")
    from taskcore.deploy.ssh import SSHCluster

    opts = {"dashboard_address": "127.0.0.1:8787", "dashboard_prefix": "/tc"}
    cluster = ssh_cluster(netns_hosts, ssh_cluster_kwargs, scheduler_options=opts,
                          shutdown_on_close=False, name="ssh-dash")
    try:
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/tc/status")
        assert_serves(link)
        local_port = cluster._tunnel.get_port()
        cluster.close()                               # detached: the tunnel closes
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", local_port), timeout=5).close()
        # Reconnected from the registry, the cluster opens a tunnel of its own again.
        cluster = SSHCluster.from_name("ssh-dash",
                                       connect_options=netns_hosts.connect_options())
        assert cluster._tunnel is not None and cluster.dashboard_link.endswith("/tc/status")
        assert_serves(cluster.dashboard_link)
    finally:
        cluster.shutdown()


def test_ssh_cluster_tunnel_on_request_and_none_without_dashboard(netns_hosts,
                                                                  ssh_cluster_kwargs):
    import_required("asyncssh", "SSH tests need the [ssh] extra")
    with ssh_cluster(netns_hosts, ssh_cluster_kwargs, dashboard_tunnel=True) as cluster:
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        assert_serves(link)
    with ssh_cluster(netns_hosts, ssh_cluster_kwargs,
                     scheduler_options={"dashboard_address": None}) as cluster:
        assert cluster.dashboard_link is None and cluster._tunnel is None
    with pytest.raises(TypeError, match="dashboard_tunnel"):
        ssh_cluster(netns_hosts, ssh_cluster_kwargs, dashboard_tunnel="yes")


def test_asynchronous_cluster_link():
    async def main():
        async with LocalCluster(n_workers=0, dashboard_address="127.0.0.1:0",
                                asynchronous=True) as cluster:
            link = cluster.dashboard_link
            status, body = await asyncio.get_running_loop().run_in_executor(
                None, fetch, health_url(link))
            assert (status, body) == (200, b"ok")
    asyncio.run(main())
