"""Golden tests of the SLURM job script text (deploy/jobqueue/job.py `JobScript`).

Pure: no SLURM, no process, no event loop. Each test compares the WHOLE script to a
literal, so any change to a directive, the order of the flags or the quoting shows up as
a diff here. The interpreter is pinned (`python=` or a patched `sys.executable`) so the
literals do not depend on the machine.
"""
import sys

import pytest

from taskcore.deploy.jobqueue.job import JOB_OPTIONS, JobScript, parse_walltime
from taskcore.deploy.jobqueue.slurm import SLURM

ADDRESS = "tcp://10.1.2.3:8786"


@pytest.fixture
def fixed_python(monkeypatch):
    """The default interpreter (`python=None`) is sys.executable: pin it for the literals."""
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    return "/usr/bin/python3"


def script(**options):
    return JobScript(SLURM(), **options).worker_script(ADDRESS, "w0")


# ---------------------------------------------------------------------------------------------
# (a) minimal
# ---------------------------------------------------------------------------------------------

def test_minimal_script(fixed_python):
    assert script(cores=2, memory="4GiB") == """\
#!/usr/bin/env bash

#SBATCH -J taskcore-worker
#SBATCH -n 1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4096M

exec /usr/bin/python3 -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 2 \
--memory-limit 4294967296 --name w0 --log-level info
"""


def test_minimal_script_fields():
    job = JobScript(SLURM(), cores=2, memory="4GiB")
    # dask-jobqueue writes `--mem=4G`; SLURM reads 4096M as the same amount.
    assert job.job_mem == "4096M"
    assert job.job_cpu == 2
    assert job.memory == 4 * 2**30
    assert job.lifetime is None and job.lifetime_stagger is None
    assert job.python == sys.executable


def test_memory_rounds_up_to_mib():
    assert JobScript(SLURM(), cores=1, memory="1GB").job_mem == "954M"  # 953.67 MiB
    assert JobScript(SLURM(), cores=1, memory=1).job_mem == "1M"
    assert JobScript(SLURM(), cores=1, memory=2**20).job_mem == "1M"
    assert JobScript(SLURM(), cores=1, memory=2**20 + 1).job_mem == "2M"


# ---------------------------------------------------------------------------------------------
# (b) every parameter
# ---------------------------------------------------------------------------------------------

ALL_OPTIONS = dict(
    cores=8, memory="16GiB", processes=2, queue="debug", account="proj-42",
    walltime="01:00:00", job_name="tc-job",
    job_extra_directives=["--exclusive", "#SBATCH --constraint=haswell"],
    job_directives_skip=["--mem", "-A"],
    job_script_prologue=["module load python/3.11", "export OMP_NUM_THREADS=1"],
    job_cpu=16, job_mem="20G", interface="ib0", local_directory="/scratch/tc",
    log_directory="/home/u/logs", python="/opt/py/bin/python", shebang="#!/bin/bash -l",
    worker_extra_args=["--resources", "GPU=2"], death_timeout=60,
)


def test_all_parameters_script():
    # -A and --mem are skipped; the extra directives get the prefix unless they have one;
    # 2 processes of 8 cores: 4 threads and half the memory each; walltime 1 h: lifetime
    # 3600 - 180 (5 %) = 3420 s, stagger 180 / 4 = 45 s.
    assert script(**ALL_OPTIONS) == """\
#!/bin/bash -l

#SBATCH -J tc-job
#SBATCH -p debug
#SBATCH -n 1
#SBATCH --cpus-per-task=16
#SBATCH -t 01:00:00
#SBATCH -o /home/u/logs/tc-job-%j.out
#SBATCH --exclusive
#SBATCH --constraint=haswell

module load python/3.11
export OMP_NUM_THREADS=1
exec /opt/py/bin/python -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 4 \
--nworkers 2 --memory-limit 8589934592 --name w0 --local-directory /scratch/tc \
--death-timeout 60 --lifetime 3420.0 --lifetime-stagger 45.0 --interface ib0 \
--log-level info --resources GPU=2
"""


def test_all_parameters_are_job_options():
    assert set(ALL_OPTIONS) <= JOB_OPTIONS


def test_job_cpu_and_job_mem_override_the_header():
    assert script(cores=4, memory="8GiB", job_cpu=6, job_mem="10G", account="acct",
                  queue="q", python="/py") == """\
#!/usr/bin/env bash

#SBATCH -J taskcore-worker
#SBATCH -p q
#SBATCH -A acct
#SBATCH -n 1
#SBATCH --cpus-per-task=6
#SBATCH --mem=10G

exec /py -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 4 \
--memory-limit 8589934592 --name w0 --log-level info
"""


def test_extra_directives_with_and_without_prefix():
    job = JobScript(SLURM(), cores=1, memory="1GiB",
                    job_extra_directives=["--qos=low", "#SBATCH --gres=gpu:1", "# a comment"])
    assert job.header()[-3:] == ["#SBATCH --qos=low", "#SBATCH --gres=gpu:1", "# a comment"]


def test_skip_edits_the_template_not_the_extra_directives():
    # As in dask-jobqueue: skip --mem from the template, add --mem-per-cpu of one's own.
    job = JobScript(SLURM(), cores=1, memory="1GiB", job_directives_skip=["--mem"],
                    job_extra_directives=["--mem-per-cpu=2G", "--exclusive"])
    assert job.header() == ["#SBATCH -J taskcore-worker", "#SBATCH -n 1",
                            "#SBATCH --cpus-per-task=1", "#SBATCH --mem-per-cpu=2G",
                            "#SBATCH --exclusive"]


def test_no_nanny_protocol_and_resources(fixed_python):
    assert script(cores=1, memory="1GiB", nanny=False, protocol="tls",
                  resources={"GPU": 1}) == """\
#!/usr/bin/env bash

#SBATCH -J taskcore-worker
#SBATCH -n 1
#SBATCH --cpus-per-task=1
#SBATCH --mem=1024M

exec /usr/bin/python3 -m taskcore.cli.worker tcp://10.1.2.3:8786 --no-nanny --nthreads 1 \
--memory-limit 1073741824 --name w0 --resources GPU=1 --protocol tls --log-level info
"""


def test_arguments_are_shell_quoted():
    text = script(cores=1, memory="1GiB", python="/opt/my env/python",
                  local_directory="$TMPDIR", worker_extra_args=["--preload", "a b"])
    # Quoted against word splitting, but `$TMPDIR` still expands on the node (dask-jobqueue
    # users write `local_directory="$TMPDIR"` for node-local scratch space).
    assert text.splitlines()[-1] == (
        "exec '/opt/my env/python' -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny "
        "--nthreads 1 --memory-limit 1073741824 --name w0 --local-directory \"$TMPDIR\" "
        "--log-level info --preload 'a b'")


def test_expanding_arguments_run_through_a_real_shell(tmp_path):
    import subprocess

    from taskcore.deploy.jobqueue.job import _shell_word

    words = ["$HOME/x", 'a"b$HOME', "back`tick`$HOME", "plain", "sp ace", "it's"]
    out = subprocess.run(["bash", "-c", "printf '%s\\n' " + " ".join(map(_shell_word, words))],
                         capture_output=True, text=True, env={"HOME": "/h"}).stdout
    assert out.splitlines() == ["/h/x", 'a"b/h', "back`tick`/h", "plain", "sp ace", "it's"]


def test_cores_not_divisible_by_processes():
    job = JobScript(SLURM(), cores=7, memory="7GiB", processes=2, python="/py")
    cmd = job.worker_command(ADDRESS, "w0")
    assert cmd[cmd.index("--nthreads") + 1] == "3"
    assert cmd[cmd.index("--nworkers") + 1] == "2"
    assert cmd[cmd.index("--memory-limit") + 1] == str(7 * 2**30 // 2)


# ---------------------------------------------------------------------------------------------
# (c) a site's header template
# ---------------------------------------------------------------------------------------------

SITE_TEMPLATE = """\
#SBATCH --job-name={job_name}
#SBATCH --partition={queue}
#SBATCH --account={account}

#SBATCH --time={walltime}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={processes}
#SBATCH --cpus-per-task={cores}
#SBATCH --comment=mem:{memory}
"""


def test_site_header_template():
    assert script(cores=4, memory="2GiB", processes=2, queue="short", python="/py",
                  header_template=SITE_TEMPLATE) == """\
#!/usr/bin/env bash

#SBATCH --job-name=taskcore-worker
#SBATCH --partition=short
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=4
#SBATCH --comment=mem:2147483648

exec /py -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 2 --nworkers 2 \
--memory-limit 1073741824 --name w0 --log-level info
"""


def test_site_header_template_with_log_directory_and_extras():
    job = JobScript(SLURM(), cores=1, memory="1GiB", log_directory="/logs",
                    header_template="#SBATCH --job-name={job_name}\n#SBATCH --exclusive",
                    job_extra_directives=["--qos=low"])
    # The system's log line comes after the site's template, the extras last.
    assert job.header() == ["#SBATCH --job-name=taskcore-worker", "#SBATCH --exclusive",
                            "#SBATCH -o /logs/taskcore-worker-%j.out", "#SBATCH --qos=low"]


def test_empty_header_template_leaves_only_extras():
    job = JobScript(SLURM(), cores=1, memory="1GiB", header_template="",
                    job_extra_directives=["-N 1"])
    assert job.header() == ["#SBATCH -N 1"]


def test_line_with_all_fields_empty_is_dropped_and_mixed_line_kept():
    template = "#A {queue} {account}\n#B {queue} {job_name}\n#C no field"
    job = JobScript(SLURM(), cores=1, memory="1GiB", header_template=template)
    # #A: every field empty, dropped. #B: one field set, kept (the empty one renders as
    # nothing). #C: no field at all, kept.
    assert job.header() == ["#B  taskcore-worker", "#C no field"]


def test_unknown_template_field_names_it():
    job = JobScript(SLURM(), cores=1, memory="1GiB",
                    header_template="#SBATCH -J {job_name}\n#SBATCH --gres=mps:{mps}")
    # Raised when the script is rendered, not when the JobScript is built.
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['mps'\]") as info:
        job.worker_script(ADDRESS, "w0")
    assert "--gres=mps:{mps}" in str(info.value)
    assert "job_name" in str(info.value)  # the known fields are listed


# ---------------------------------------------------------------------------------------------
# (d) walltime -> --lifetime / --lifetime-stagger
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("walltime, lifetime, stagger", [
    ("01:00:00", 3600 - 180, 45.0),      # 5 % = 180 s
    ("10:00:00", 36000 - 1800, 450.0),   # 5 % = 1800 s (under the 25 % cap of 9000 s)
    ("00:10:00", 600 - 60, 15.0),        # 5 % = 30 s: raised to the 60 s floor
    ("00:02:00", 120 - 30, 7.5),         # 60 s floor > 25 % = 30 s: capped at 30 s
    ("1-00:00:00", 86400 - 4320, 1080.0),
    ("30", 1800 - 90, 22.5),             # "30" is 30 minutes, as for sbatch
])
def test_auto_margin(walltime, lifetime, stagger):
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime=walltime)
    assert job.lifetime == lifetime
    assert job.lifetime_stagger == stagger
    cmd = job.worker_command(ADDRESS, "w0")
    assert cmd[cmd.index("--lifetime") + 1] == str(float(lifetime))
    assert cmd[cmd.index("--lifetime-stagger") + 1] == str(stagger)


def test_explicit_margin_and_stagger():
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00",
                    walltime_margin="5m", lifetime_stagger="10s")
    assert (job.lifetime, job.lifetime_stagger) == (3300.0, 10.0)
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00",
                    walltime_margin=600)
    assert (job.lifetime, job.lifetime_stagger) == (3000.0, 150.0)  # stagger auto: margin/4


@pytest.mark.parametrize("stagger", [0, None])
def test_no_stagger_gives_no_flag(stagger):
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00",
                    walltime_margin="2m", lifetime_stagger=stagger)
    assert (job.lifetime, job.lifetime_stagger) == (3480.0, 0.0)
    cmd = job.worker_command(ADDRESS, "w0")
    assert "--lifetime" in cmd and "--lifetime-stagger" not in cmd


@pytest.mark.parametrize("margin", ["1h", "2h", 3600])
def test_margin_not_shorter_than_walltime(margin):
    with pytest.raises(ValueError, match=r"walltime_margin \(\d+\.0 s\) must be shorter than "
                                         r"the walltime \(3600\.0 s\)"):
        JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00", walltime_margin=margin)


def test_stagger_not_shorter_than_margin():
    with pytest.raises(ValueError, match=r"lifetime_stagger \(300.0 s\) must be shorter than "
                                         r"walltime_margin \(300.0 s\)"):
        JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00",
                  walltime_margin="5m", lifetime_stagger="5m")


def test_margin_none_means_no_lifetime():
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime="01:00:00", walltime_margin=None)
    assert job.lifetime is None and job.lifetime_stagger is None
    cmd = job.worker_command(ADDRESS, "w0")
    assert "--lifetime" not in cmd and "--lifetime-stagger" not in cmd
    assert "#SBATCH -t 01:00:00" in job.header()  # the walltime itself stays


def test_no_walltime_no_lifetime_even_with_margin():
    job = JobScript(SLURM(), cores=1, memory="1GiB", walltime_margin="5m")
    assert job.lifetime is None and job.lifetime_stagger is None


@pytest.mark.parametrize("walltime, directive", [
    ("1h", "#SBATCH -t 01:00:00"), (90, "#SBATCH -t 00:01:30"),
    ("90m", "#SBATCH -t 01:30:00")])
def test_walltime_directive_agrees_with_lifetime(walltime, directive):
    assert directive in JobScript(SLURM(), cores=1, memory="1GiB", walltime=walltime).header()


# ---------------------------------------------------------------------------------------------
# (e) the scheduler's job
# ---------------------------------------------------------------------------------------------

SCHEDULER_JOB = dict(cores=1, memory="2GiB", job_name="taskcore-scheduler", queue="long",
                     walltime="02:00:00", walltime_margin=None, python="/py")


def test_scheduler_script():
    job = JobScript(SLURM(), interface="ib0", **SCHEDULER_JOB)
    text = job.scheduler_script("/shared/tc.scheduler.json",
                                {"idle_timeout": 600, "name": "tc-sched"})
    assert text == """\
#!/usr/bin/env bash

#SBATCH -J taskcore-scheduler
#SBATCH -p long
#SBATCH -n 1
#SBATCH --cpus-per-task=1
#SBATCH --mem=2048M
#SBATCH -t 02:00:00

exec /py -m taskcore.cli.scheduler --port 0 --idle-timeout 600 \
--scheduler-file /shared/tc.scheduler.json --log-level info \
--scheduler-options '{"name": "tc-sched"}' --interface ib0
"""


def test_scheduler_script_without_interface_binds_everywhere():
    job = JobScript(SLURM(), **SCHEDULER_JOB)
    text = job.scheduler_script("/shared/s.json", {"port": 8786})
    assert text.splitlines()[-1] == (
        "exec /py -m taskcore.cli.scheduler --port 8786 --host 0.0.0.0 "
        "--scheduler-file /shared/s.json --log-level info")


def test_scheduler_script_host_and_interface_options():
    job = JobScript(SLURM(), interface="ib0", **SCHEDULER_JOB)
    # An explicit host wins over the job's interface.
    assert job.scheduler_script("/s.json", {"host": "10.0.0.5"}).splitlines()[-1] == (
        "exec /py -m taskcore.cli.scheduler --port 0 --host 10.0.0.5 "
        "--scheduler-file /s.json --log-level info")
    # An interface in the scheduler options wins over the job's.
    assert job.scheduler_script("/s.json", {"interface": "eth1"}).splitlines()[-1] == (
        "exec /py -m taskcore.cli.scheduler --port 0 --scheduler-file /s.json "
        "--log-level info --interface eth1")


def test_scheduler_script_does_not_change_the_options():
    options = {"interface": "eth1", "idle_timeout": 5}
    JobScript(SLURM(), **SCHEDULER_JOB).scheduler_script("/s.json", options)
    assert options == {"interface": "eth1", "idle_timeout": 5}


def test_scheduler_options_must_be_json():
    job = JobScript(SLURM(), **SCHEDULER_JOB)
    with pytest.raises(TypeError, match="JSON-serializable"):
        job.scheduler_script("/s.json", {"preload": object()})


# ---------------------------------------------------------------------------------------------
# (f) bad input, parse_walltime
# ---------------------------------------------------------------------------------------------

def test_processes_more_than_cores():
    with pytest.raises(ValueError, match=r"processes=3 > cores=2"):
        JobScript(SLURM(), cores=2, memory="4GiB", processes=3)


@pytest.mark.parametrize("options", [{"memory": "4GiB"}, {"cores": 2}, {}])
def test_cores_and_memory_are_required(options):
    with pytest.raises(ValueError, match=r"a job needs cores= and memory="):
        JobScript(SLURM(), **options)


@pytest.mark.parametrize("options", [{"cores": 0}, {"cores": 2, "processes": -1}])
def test_cores_and_processes_at_least_one(options):
    with pytest.raises(ValueError, match=r"must be >= 1"):
        JobScript(SLURM(), **{"memory": "1GiB", **options})


def test_processes_zero_or_none_is_one():
    assert JobScript(SLURM(), cores=2, memory="1GiB", processes=None).processes == 1
    assert JobScript(SLURM(), cores=2, memory="1GiB", processes=0).processes == 1


def test_bad_memory():
    with pytest.raises(ValueError, match=r"invalid byte size: '4 gigs'"):
        JobScript(SLURM(), cores=1, memory="4 gigs")


@pytest.mark.parametrize("name", ["job_extra_directives", "job_directives_skip",
                                  "job_script_prologue", "worker_extra_args"])
def test_list_options_given_as_one_string(name):
    with pytest.raises(TypeError, match=rf"{name} must be a list of strings, not one string: "
                                        r"'--exclusive'"):
        JobScript(SLURM(), cores=1, memory="1GiB", **{name: "--exclusive"})


def test_list_options_accept_none_and_tuples():
    job = JobScript(SLURM(), cores=1, memory="1GiB", job_extra_directives=None,
                    worker_extra_args=("--x", 3))
    assert job.job_extra_directives == []
    assert job.worker_extra_args == ["--x", "3"]


@pytest.mark.parametrize("value, seconds", [
    ("30", 1800.0),             # minutes
    ("01:30", 90.0),            # MM:SS
    ("00:01:00", 60.0),         # HH:MM:SS
    ("1-00:00:00", 86400.0),    # D-HH:MM:SS
    ("1-02:30", 95400.0),       # D-HH:MM
    ("2-3", 183600.0),          # D-HH
    (" 12:00:00 ", 43200.0),
    ("1h", 3600.0),
    ("90m", 5400.0),
    ("45s", 45.0),
    (90, 90.0),                 # a number is seconds
    (1.5, 1.5),
    (None, None),
])
def test_parse_walltime(value, seconds):
    assert parse_walltime(value) == seconds


@pytest.mark.parametrize("value", ["abc", "1:2:3:4", "1-", "-1", "01:30:xx", "", True])
def test_parse_walltime_bad(value):
    with pytest.raises(ValueError, match=r"invalid walltime"):
        parse_walltime(value)


def test_bad_walltime_fails_when_building_the_script():
    with pytest.raises(ValueError, match=r"'two hours'"):
        JobScript(SLURM(), cores=1, memory="1GiB", walltime="two hours")


def test_the_cluster_keeps_an_explicit_none_for_job_options():
    from taskcore.deploy.jobqueue.slurm import SLURMCluster

    # Built, never started (asynchronous and not awaited): no SLURM needed.
    cluster = SLURMCluster(asynchronous=True, cores=1, memory="1GiB", walltime="01:00:00",
                           walltime_margin=None)
    assert JobScript(SLURM(), **cluster.new_spec["options"]["job"]).lifetime is None
    cluster = SLURMCluster(asynchronous=True, cores=1, memory="1GiB", walltime="01:00:00")
    assert JobScript(SLURM(), **cluster.new_spec["options"]["job"]).lifetime == 3420
