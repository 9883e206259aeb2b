"""Site defaults from the TOML config file (deploy/jobqueue/config.py).

Every test points TASKCORE_JOBQUEUE_CONFIG (or XDG_CONFIG_HOME / HOME) at its own
tmp_path, so the machine's real ~/.config/taskcore/jobqueue.toml is never read.
"""
import os
import re

import pytest

from taskcore.deploy.jobqueue.cluster import CLUSTER_OPTIONS
from taskcore.deploy.jobqueue.config import config_path, load_section
from taskcore.deploy.jobqueue.job import JOB_OPTIONS, JobScript
from taskcore.deploy.jobqueue.slurm import SLURM

ALLOWED = JOB_OPTIONS | CLUSTER_OPTIONS

SITE = '''\
[slurm]
queue = "normal"
account = "proj-42"
walltime = "01:00:00"
cores = 4
memory = "8GiB"
job_directives_skip = ["--mem"]
max_jobs_queued = 10
header_template = """
#SBATCH --job-name={job_name}
#SBATCH --partition={queue}
#SBATCH --time={walltime}
"""

[slurm.worker_groups.bigmem]
queue = "bigmem"
memory = "512GiB"

[pbs]
queue = "workq"
not_a_slurm_key = 1
'''


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    """No env var, and XDG_CONFIG_HOME an empty directory."""
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    return xdg


def write_config(tmp_path, monkeypatch, text, name="jobqueue.toml"):
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setenv("TASKCORE_JOBQUEUE_CONFIG", str(path))
    return path


def test_section_values(tmp_path, monkeypatch):
    path = write_config(tmp_path, monkeypatch, SITE)
    assert config_path() == str(path)
    assert load_section("slurm", ALLOWED) == {
        "queue": "normal", "account": "proj-42", "walltime": "01:00:00", "cores": 4,
        "memory": "8GiB", "job_directives_skip": ["--mem"], "max_jobs_queued": 10,
        "header_template": "#SBATCH --job-name={job_name}\n#SBATCH --partition={queue}\n"
                           "#SBATCH --time={walltime}\n",
        "worker_groups": {"bigmem": {"queue": "bigmem", "memory": "512GiB"}},
    }


def test_other_sections_are_not_checked(tmp_path, monkeypatch):
    # [pbs] has a key SLURM does not know: only the section asked for is checked.
    write_config(tmp_path, monkeypatch, SITE)
    assert load_section("slurm", ALLOWED)["queue"] == "normal"
    with pytest.raises(ValueError, match=r"\[pbs\] has unknown key\(s\) \['not_a_slurm_key'\]"):
        load_section("pbs", ALLOWED)


def test_site_section_makes_a_job_script(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch, SITE)
    site = load_section("slurm", ALLOWED)
    job = {k: v for k, v in site.items() if k in JOB_OPTIONS}
    text = JobScript(SLURM(), python="/py", **job).worker_script("tcp://10.1.2.3:8786", "w0")
    assert text == """\
#!/usr/bin/env bash

#SBATCH --job-name=taskcore-worker
#SBATCH --partition=normal
#SBATCH --time=01:00:00

exec /py -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 4 \
--memory-limit 8589934592 --name w0 --lifetime 3420.0 --lifetime-stagger 45.0 \
--log-level info
"""


def test_missing_section_is_empty(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch, '[pbs]\nqueue = "workq"\n')
    assert load_section("slurm", ALLOWED) == {}


def test_empty_file_and_empty_table(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch, "")
    assert load_section("slurm", ALLOWED) == {}
    write_config(tmp_path, monkeypatch, "[slurm]\n")
    assert load_section("slurm", ALLOWED) == {}


def test_returns_a_copy(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch, '[slurm]\nqueue = "normal"\n')
    first = load_section("slurm", ALLOWED)
    first["queue"] = "changed"
    assert load_section("slurm", ALLOWED) == {"queue": "normal"}


def test_unknown_key_names_the_file(tmp_path, monkeypatch):
    path = write_config(tmp_path, monkeypatch,
                        '[slurm]\nqueu = "normal"\naccount = "a"\nwalltme = "1h"\n')
    with pytest.raises(ValueError) as info:
        load_section("slurm", ALLOWED)
    assert str(info.value) == f"{path}: [slurm] has unknown key(s) ['queu', 'walltme']"


def test_section_must_be_a_table(tmp_path, monkeypatch):
    path = write_config(tmp_path, monkeypatch, 'slurm = "normal"\n')
    with pytest.raises(ValueError,
                       match=rf"^{re.escape(str(path))}: \[slurm\] must be a table$"):
        load_section("slurm", ALLOWED)


def test_invalid_toml_names_the_file(tmp_path, monkeypatch):
    path = write_config(tmp_path, monkeypatch, '[slurm]\nqueue = normal\n')
    with pytest.raises(ValueError) as info:
        load_section("slurm", ALLOWED)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")
    assert "line 2" in str(info.value)  # tomllib's position


def test_missing_file_named_by_the_env_var(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "jobqueue.toml"
    monkeypatch.setenv("TASKCORE_JOBQUEUE_CONFIG", str(missing))
    with pytest.raises(FileNotFoundError) as info:
        load_section("slurm", ALLOWED)
    assert str(info.value) == (f"TASKCORE_JOBQUEUE_CONFIG names {missing}, which does not "
                               f"exist")


def test_no_file_without_the_env_var(no_config):
    assert config_path() == os.path.join(str(no_config), "taskcore", "jobqueue.toml")
    assert load_section("slurm", ALLOWED) == {}


def test_empty_env_var_means_unset(no_config, monkeypatch):
    monkeypatch.setenv("TASKCORE_JOBQUEUE_CONFIG", "")
    assert config_path() == os.path.join(str(no_config), "taskcore", "jobqueue.toml")
    assert load_section("slurm", ALLOWED) == {}


def test_file_in_xdg_config_home(no_config):
    (no_config / "taskcore").mkdir()
    (no_config / "taskcore" / "jobqueue.toml").write_text('[slurm]\naccount = "xdg"\n')
    assert load_section("slurm", ALLOWED) == {"account": "xdg"}


def test_file_in_home_without_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == str(tmp_path / ".config" / "taskcore" / "jobqueue.toml")
    assert load_section("slurm", ALLOWED) == {}
    (tmp_path / ".config" / "taskcore").mkdir(parents=True)
    (tmp_path / ".config" / "taskcore" / "jobqueue.toml").write_text('[slurm]\nqueue = "h"\n')
    assert load_section("slurm", ALLOWED) == {"queue": "h"}


def test_env_var_wins_over_xdg(no_config, tmp_path, monkeypatch):
    (no_config / "taskcore").mkdir()
    (no_config / "taskcore" / "jobqueue.toml").write_text('[slurm]\nqueue = "xdg"\n')
    write_config(tmp_path, monkeypatch, '[slurm]\nqueue = "env"\n', name="site.toml")
    assert load_section("slurm", ALLOWED) == {"queue": "env"}
