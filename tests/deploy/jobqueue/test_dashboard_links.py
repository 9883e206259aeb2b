"""A job queue cluster's `dashboard_link` reaches the dashboard from the client, with the
scheduler in this process (the default) and in its own batch job: against the real SLURM
and the stand-ins (tests/deploy/jobqueue/standins). SGE and OAR are left out on purpose:
their servers are shared with other test sessions and must not run twice at once."""
import pytest

from taskcore.deploy.cluster import _address_host

from ..test_dashboard_links import assert_serves, busy_port
from .conftest import STANDIN_FAMILIES

FAST = dict(poll_interval=0.5)


@pytest.fixture(autouse=True)
def default_link_template(monkeypatch):
    monkeypatch.delenv("TASKCORE_DASHBOARD_LINK", raising=False)


def assert_link_at_scheduler_host(cluster):
    link = cluster.dashboard_link
    host = _address_host(cluster.scheduler_address)
    assert host and not host.startswith("0.") and link.startswith(f"http://{host}:"), \
        (link, cluster.scheduler_address)
    assert_serves(link)
    assert link in cluster._repr_html_()
    return link


def test_slurm_scheduler_here_and_in_a_job(slurm_clean, tmp_path):
    from taskcore.deploy.jobqueue.slurm import SLURMCluster

    with busy_port() as taken:
        port = taken.getsockname()[1]
        # The in-process scheduler listens on every interface, and so does its dashboard;
        # the link names the address workers are given for the scheduler.
        with SLURMCluster(cores=1, memory="1GiB", scheduler_options={
                "dashboard_address": f":{port}", "dashboard_prefix": "/jq"}, **FAST) as cluster:
            link = assert_link_at_scheduler_host(cluster)
            assert link.endswith("/jq/status") and f":{port}/" not in link
    with SLURMCluster(cores=1, memory="1GiB", scheduler="job", shared_directory=str(tmp_path),
                      **FAST) as cluster:
        assert cluster.scheduler.job_id in [j for j, _ in slurm_clean.jobs()]
        assert_link_at_scheduler_host(cluster)
    with SLURMCluster(cores=1, memory="1GiB", scheduler="job", shared_directory=str(tmp_path),
                      scheduler_options={"dashboard_address": None}, **FAST) as cluster:
        assert cluster.dashboard_link is None


@pytest.mark.parametrize("standin_batch", STANDIN_FAMILIES, indirect=True)
def test_standin_scheduler_in_a_job(standin_batch, tmp_path):
    from taskcore.deploy.specdata import import_dotted

    from .test_backends_e2e import STANDINS

    cls = import_dotted(STANDINS[standin_batch.family][0].replace(":", "."))
    with cls(cores=1, memory="1GiB", scheduler="job", shared_directory=str(tmp_path),
             log_directory=str(tmp_path / "logs"), **FAST) as cluster:
        assert cluster.scheduler.job_id
        assert_link_at_scheduler_host(cluster)
    with cls(cores=1, memory="1GiB", log_directory=str(tmp_path / "logs"), **FAST) as cluster:
        assert_link_at_scheduler_host(cluster)
