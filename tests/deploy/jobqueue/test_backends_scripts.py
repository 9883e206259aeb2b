"""Golden tests of the job scripts of every batch system but SLURM (test_job_script.py).

SGE, OAR, PBS Pro, Torque, Moab, LSF, HTCondor and Flux: for each, the WHOLE text of
`JobScript(System(), **options).worker_script(...)` is compared with a literal, (a) with
the minimal options, (b) with every common option and the system's own, and (c) for the
scheduler's job. Then each system's walltime format, its log file name, the cluster's
`job_script_template` (its own options accepted, another system's refused), and the
HTCondor `arguments` line decoded with a reference parser of HTCondor's "new" argument
syntax and run by a real shell.

Pure: no batch system, no event loop. The interpreter is pinned (`python=` or a patched
`sys.executable`) and the site config file is kept out, so the literals are stable.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from taskcore.deploy.jobqueue.flux import Flux, FluxCluster
from taskcore.deploy.jobqueue.htcondor import HTCondor, HTCondorCluster, condor_argument
from taskcore.deploy.jobqueue.job import JOB_OPTIONS, JobScript
from taskcore.deploy.jobqueue.lsf import LSF, LSFCluster
from taskcore.deploy.jobqueue.oar import OAR, OARCluster
from taskcore.deploy.jobqueue.pbs import PBS, Moab, MoabCluster, PBSCluster, Torque, TorqueCluster
from taskcore.deploy.jobqueue.sge import SGE, SGECluster
from taskcore.deploy.jobqueue.slurm import SLURM, SLURMCluster

ADDRESS = "tcp://10.1.2.3:8786"


@pytest.fixture(autouse=True)
def _no_site_config(tmp_path, monkeypatch):
    """The clusters read ~/.config/taskcore/jobqueue.toml: point them at an empty place."""
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


@pytest.fixture
def fixed_python(monkeypatch):
    """The default interpreter (`python=None`) is sys.executable: pin it for the literals."""
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    return "/usr/bin/python3"


def script(system, **options):
    return JobScript(system, **options).worker_script(ADDRESS, "w0")


def scheduler_script(system):
    job = JobScript(system, cores=1, memory="2GiB", job_name="taskcore-scheduler",
                    queue="long", walltime="02:00:00", walltime_margin=None, python="/py")
    return job.scheduler_script("/shared/tc.scheduler.json",
                                {"idle_timeout": 600, "name": "tc-sched"})


# Every common option; each system adds its own skip list, extra directives and options.
COMMON = dict(
    cores=8, memory="16GiB", processes=2, queue="debug", account="proj-42",
    walltime="01:00:00", job_name="tc-job",
    job_script_prologue=["module load python/3.11", "export OMP_NUM_THREADS=1"],
    job_cpu=16, job_mem="20G", interface="ib0", local_directory="/scratch/tc",
    log_directory="/home/u/logs", python="/opt/py/bin/python", shebang="#!/bin/bash -l",
    worker_extra_args=["--resources", "GPU=2"], death_timeout=60,
)

# 2 processes of 8 cores: 4 threads and half the memory each; walltime 1 h: lifetime
# 3600 - 180 (5 %) = 3420 s, stagger 180 / 4 = 45 s (test_job_script.py).
WORKER_ALL = (
    "exec /opt/py/bin/python -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny --nthreads 4 "
    "--nworkers 2 --memory-limit 8589934592 --name w0 --local-directory /scratch/tc "
    "--death-timeout 60 --lifetime 3420.0 --lifetime-stagger 45.0 --interface ib0 "
    "--log-level info --resources GPU=2")
WORKER_MIN = ("exec /usr/bin/python3 -m taskcore.cli.worker tcp://10.1.2.3:8786 --nanny "
              "--nthreads 2 --memory-limit 4294967296 --name w0 --log-level info")
SCHEDULER = ("exec /py -m taskcore.cli.scheduler --port 0 --host 0.0.0.0 --idle-timeout 600 "
             "--scheduler-file /shared/tc.scheduler.json --log-level info "
             "--scheduler-options '{\"name\": \"tc-sched\"}'")


def test_common_options_are_job_options():
    assert set(COMMON) | {"job_directives_skip", "job_extra_directives"} <= JOB_OPTIONS


# ---------------------------------------------------------------------------------------------
# SGE
# ---------------------------------------------------------------------------------------------

def test_sge_minimal(fixed_python):
    # No memory request without resource_spec: Grid Engine sites name memory complexes
    # differently (sge.py). No core request either (dask-jobqueue's SGECluster: add a
    # `-pe` line of the site's own in job_extra_directives).
    assert script(SGE(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#$ -N taskcore-worker
#$ -cwd
#$ -j y
#$ -V
#$ -S /bin/bash

{WORKER_MIN}
"""


def test_sge_every_option():
    # -j y skipped; job_cpu and job_mem have no SGE directive (resource_spec is the one).
    text = script(SGE(), **COMMON, job_directives_skip=["-j y"],
                  job_extra_directives=["-pe smp 16", "#$ -m n"],
                  resource_spec="h_vmem=4G,m_mem_free=4G")
    assert text == f"""\
#!/bin/bash -l

#$ -N tc-job
#$ -q debug
#$ -P proj-42
#$ -l h_vmem=4G,m_mem_free=4G
#$ -l h_rt=01:00:00
#$ -cwd
#$ -V
#$ -S /bin/bash
#$ -o /home/u/logs/$JOB_NAME-$JOB_ID.out
#$ -pe smp 16
#$ -m n

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


def test_sge_scheduler_script():
    assert scheduler_script(SGE()) == f"""\
#!/usr/bin/env bash

#$ -N taskcore-scheduler
#$ -q long
#$ -l h_rt=02:00:00
#$ -cwd
#$ -j y
#$ -V
#$ -S /bin/bash

{SCHEDULER}
"""


# ---------------------------------------------------------------------------------------------
# OAR
# ---------------------------------------------------------------------------------------------

def test_oar_minimal(fixed_python):
    assert script(OAR(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#OAR -n taskcore-worker
#OAR -l /nodes=1/core=2

{WORKER_MIN}
"""


def test_oar_every_option():
    # One -l line (resources and walltime), one -p line: the site's properties AND the
    # memory filter, 16 GiB / 16 cores (job_cpu) = 1024 MiB per core.
    text = script(OAR(), **COMMON, job_directives_skip=["--project"],
                  job_extra_directives=["-t besteffort", "#OAR --checkpoint 60"],
                  oar_resource_properties="cluster='dahu'",
                  memory_per_core_property_name="memcore")
    assert text == f"""\
#!/bin/bash -l

#OAR -n tc-job
#OAR -q debug
#OAR -l /nodes=1/core=16,walltime=01:00:00
#OAR -p (cluster='dahu') AND memcore>=1024
#OAR -O /home/u/logs/tc-job-%jobid%.out
#OAR -E /home/u/logs/tc-job-%jobid%.out
#OAR -t besteffort
#OAR --checkpoint 60

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


@pytest.mark.parametrize("options, line", [
    ({"oar_resource_properties": "host like 'gros-%'"}, "#OAR -p host like 'gros-%'"),
    ({"memory_per_core_property_name": "memcore"}, '#OAR -p memcore>=2048'),
    # 4 GiB over 3 cores: 1365.33 MiB per core, rounded up.
    ({"memory_per_core_property_name": "mem_core", "cores": 3}, '#OAR -p mem_core>=1366'),
])
def test_oar_properties_line(options, line):
    job = JobScript(OAR(), **{"cores": 2, "memory": "4GiB", **options})
    assert [h for h in job.header() if h.startswith("#OAR -p")] == [line]


def test_oar_job_script_outlives_its_submission():
    import asyncio

    from taskcore.deploy.jobqueue.job import Job
    from taskcore.deploy.jobqueue.system import JobInfo
    from taskcore.testing import run

    system, submitted = OAR(), []

    async def submit(path):
        submitted.append(path)
        system.jobs["1"] = JobInfo("1")
        return "1"

    system.submit = submit
    job = Job(ADDRESS, "w0", system=system, job=dict(cores=1, memory="1GiB", python="/py"))

    async def go():
        await job._submit()
        job._follower.cancel()
        await asyncio.gather(job._follower, return_exceptions=True)

    run(go())
    assert submitted and os.path.exists(submitted[0])


def test_oar_scheduler_script():
    assert scheduler_script(OAR()) == f"""\
#!/usr/bin/env bash

#OAR -n taskcore-scheduler
#OAR -q long
#OAR -l /nodes=1/core=1,walltime=02:00:00

{SCHEDULER}
"""


# ---------------------------------------------------------------------------------------------
# PBS Pro, Torque, Moab
# ---------------------------------------------------------------------------------------------

def test_pbs_minimal(fixed_python):
    assert script(PBS(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#PBS -N taskcore-worker
#PBS -l select=1:ncpus=2:mem=4096mb

{WORKER_MIN}
"""


def test_pbs_every_option():
    # resource_spec replaces the select line whole (job_cpu and job_mem with it); -A skipped.
    text = script(PBS(), **COMMON, job_directives_skip=["-A"],
                  job_extra_directives=["-l place=excl", "#PBS -m n"],
                  resource_spec="select=1:ncpus=16:mem=20gb:ngpus=2")
    assert text == f"""\
#!/bin/bash -l

#PBS -N tc-job
#PBS -q debug
#PBS -l select=1:ncpus=16:mem=20gb:ngpus=2
#PBS -l walltime=01:00:00
#PBS -o /home/u/logs/
#PBS -j oe
#PBS -l place=excl
#PBS -m n

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


def test_pbs_job_cpu_and_job_mem_without_resource_spec(fixed_python):
    assert JobScript(PBS(), **COMMON).header()[3] == "#PBS -l select=1:ncpus=16:mem=20G"


def test_pbs_scheduler_script():
    assert scheduler_script(PBS()) == f"""\
#!/usr/bin/env bash

#PBS -N taskcore-scheduler
#PBS -q long
#PBS -l select=1:ncpus=1:mem=2048mb
#PBS -l walltime=02:00:00

{SCHEDULER}
"""


@pytest.mark.parametrize("system", [Torque, Moab])
def test_torque_and_moab_minimal(fixed_python, system):
    assert script(system(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#PBS -N taskcore-worker
#PBS -l nodes=1:ppn=2
#PBS -l mem=4096mb

{WORKER_MIN}
"""


def test_torque_every_option():
    # resource_spec replaces the nodes line; mem= is its own line (skipped here).
    text = script(Torque(), **COMMON, job_directives_skip=["-l mem="],
                  job_extra_directives=["-l pmem=1gb", "#PBS -m n"],
                  resource_spec="nodes=1:ppn=16:gpus=2")
    assert text == f"""\
#!/bin/bash -l

#PBS -N tc-job
#PBS -q debug
#PBS -A proj-42
#PBS -l nodes=1:ppn=16:gpus=2
#PBS -l walltime=01:00:00
#PBS -o /home/u/logs/
#PBS -j oe
#PBS -l pmem=1gb
#PBS -m n

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


def test_moab_every_option():
    # msub reads #PBS directives too; an extra directive with its own #MSUB prefix stays.
    text = script(Moab(), **COMMON, job_directives_skip=["-q "],
                  job_extra_directives=["-l qos=long", "#MSUB -m n"],
                  resource_spec="nodes=2:ppn=8")
    assert text == f"""\
#!/bin/bash -l

#PBS -N tc-job
#PBS -A proj-42
#PBS -l nodes=2:ppn=8
#PBS -l mem=20G
#PBS -l walltime=01:00:00
#PBS -o /home/u/logs/
#PBS -j oe
#PBS -l qos=long
#MSUB -m n

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


@pytest.mark.parametrize("system", [Torque, Moab])
def test_torque_and_moab_scheduler_script(system):
    assert scheduler_script(system()) == f"""\
#!/usr/bin/env bash

#PBS -N taskcore-scheduler
#PBS -q long
#PBS -l nodes=1:ppn=1
#PBS -l mem=2048mb
#PBS -l walltime=02:00:00

{SCHEDULER}
"""


# ---------------------------------------------------------------------------------------------
# LSF
# ---------------------------------------------------------------------------------------------

def test_lsf_minimal(fixed_python):
    # -M in KB by default (dask-jobqueue's lsf_units default, LSF_UNIT_FOR_LIMITS=KB).
    assert script(LSF(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#BSUB -J taskcore-worker
#BSUB -n 2
#BSUB -R "span[hosts=1]"
#BSUB -M 4194304

{WORKER_MIN}
"""


def test_lsf_every_option():
    # -M is the job's memory (16 GiB) in MB; job_mem has no LSF directive. -W is HH:MM.
    text = script(LSF(), **COMMON, job_directives_skip=["span[hosts=1]"],
                  job_extra_directives=['-R "select[avx2]"', "#BSUB -B"],
                  lsf_units="MB", use_stdin=False)
    assert text == f"""\
#!/bin/bash -l

#BSUB -J tc-job
#BSUB -q debug
#BSUB -P proj-42
#BSUB -n 16
#BSUB -M 16384
#BSUB -W 01:00
#BSUB -o /home/u/logs/tc-job-%J.out
#BSUB -R "select[avx2]"
#BSUB -B

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


@pytest.mark.parametrize("units, limit", [
    ("KB", "4194305"),   # 4 GiB + 1 byte, rounded up
    ("kb", "4194305"),
    ("K", "4194305"),
    ("MB", "4097"),
    ("M", "4097"),
    ("G", "5"),
    ("GB", "5"),
    ("B", "4294967297"),
    (None, "4194305"),   # None: the default, KB
])
def test_lsf_units(units, limit):
    job = JobScript(LSF(), cores=1, memory=4 * 2**30 + 1, lsf_units=units)
    assert [h for h in job.header() if h.startswith("#BSUB -M")] == [f"#BSUB -M {limit}"]


def test_lsf_bad_units():
    job = JobScript(LSF(), cores=1, memory="1GiB", lsf_units="XB")
    with pytest.raises(ValueError, match=r"lsf_units must be one of .*'KB'.*, not 'XB'"):
        job.header()


def test_lsf_use_stdin_does_not_change_the_script_only_the_submit_command():
    with_stdin = script(LSF(), cores=2, memory="4GiB", python="/py", use_stdin=True)
    assert script(LSF(), cores=2, memory="4GiB", python="/py", use_stdin=False) == with_stdin
    assert LSF().script_on_stdin is True
    assert LSF().submit_argv("/tmp/s.sh") == ["bsub"]        # bsub < /tmp/s.sh
    assert LSF(use_stdin=False).submit_argv("/tmp/s.sh") == ["bsub", "/tmp/s.sh"]
    assert LSF(use_stdin=False, submit_options=["-G", "grp"]).submit_argv("/s") == \
        ["bsub", "-G", "grp", "/s"]


@pytest.mark.parametrize("use_stdin", [True, False])
def test_lsf_cluster_passes_use_stdin_to_the_system(use_stdin):
    cluster = LSFCluster(asynchronous=True, cores=1, memory="1GiB", use_stdin=use_stdin)
    assert cluster.system.script_on_stdin is use_stdin
    assert cluster.system.record()["use_stdin"] is use_stdin


def test_lsf_scheduler_script():
    assert scheduler_script(LSF()) == f"""\
#!/usr/bin/env bash

#BSUB -J taskcore-scheduler
#BSUB -q long
#BSUB -n 1
#BSUB -R "span[hosts=1]"
#BSUB -M 2097152
#BSUB -W 02:00

{SCHEDULER}
"""


# ---------------------------------------------------------------------------------------------
# HTCondor
# ---------------------------------------------------------------------------------------------

def test_htcondor_minimal(fixed_python):
    # A submit description, not a shell script: no shebang. request_memory in MiB,
    # request_disk in KiB (1 GiB by default).
    assert script(HTCondor(), cores=2, memory="4GiB") == f"""\
universe = vanilla
batch_name = taskcore-worker
request_cpus = 2
request_memory = 4096
request_disk = 1048576
getenv = True
executable = /bin/sh
arguments = "-c '{WORKER_MIN}'"
queue
"""


def test_htcondor_every_option():
    # shebang: no place in a submit file; queue: no HTCondor directive; job_mem: none
    # either (request_memory is the job's memory). The dict directives are `key = value`
    # lines, unprefixed; getenv skipped; the walltime is allowed_job_duration in seconds.
    text = script(HTCondor(), **COMMON, job_directives_skip=["getenv"],
                  job_extra_directives={"+MyAttr": '"tc"', "requirements": 'OpSys == "LINUX"'},
                  disk="4GiB", submit_command_extra=["-name", "schedd1"],
                  cancel_command_extra=["-forcex"])
    assert text == f"""\
universe = vanilla
batch_name = tc-job
accounting_group = proj-42
request_cpus = 16
request_memory = 16384
request_disk = 4194304
allowed_job_duration = 3600
output = /home/u/logs/tc-job-$(ClusterId).out
error = /home/u/logs/tc-job-$(ClusterId).out
log = /home/u/logs/tc-job-$(ClusterId).log
+MyAttr = "tc"
requirements = OpSys == "LINUX"
executable = /bin/sh
arguments = "-c 'eval ''module load python/3.11''; eval ''export OMP_NUM_THREADS=1''; {WORKER_ALL}'"
queue
"""


def test_htcondor_extra_directives_as_a_list_stay_as_written():
    job = JobScript(HTCondor(), cores=1, memory="1GiB",
                    job_extra_directives=["+AccountingGroup = \"x\"", "# a comment"])
    assert job.header()[-2:] == ['+AccountingGroup = "x"', "# a comment"]


def test_htcondor_scheduler_script():
    # The JSON of --scheduler-options: shell-quoted, then in HTCondor's syntax ' -> '' and
    # " -> "" (decoded and run by a shell in test_htcondor_scheduler_arguments_run_in_a_shell).
    assert scheduler_script(HTCondor()) == """\
universe = vanilla
batch_name = taskcore-scheduler
request_cpus = 1
request_memory = 2048
request_disk = 1048576
allowed_job_duration = 7200
getenv = True
executable = /bin/sh
arguments = "-c 'exec /py -m taskcore.cli.scheduler --port 0 --host 0.0.0.0 \
--idle-timeout 600 --scheduler-file /shared/tc.scheduler.json --log-level info \
--scheduler-options ''{""name"": ""tc-sched""}'''"
queue
"""


def test_htcondor_cluster_passes_the_command_extras_to_the_system():
    cluster = HTCondorCluster(asynchronous=True, cores=1, memory="1GiB", disk="2GiB",
                              submit_command_extra=["-name", "schedd1"],
                              cancel_command_extra=["-forcex"])
    system = cluster.system
    assert system.submit_argv("/tmp/j.sub") == ["condor_submit", "-name", "schedd1",
                                                "/tmp/j.sub"]
    assert system.cancel_argv(["12", "13"]) == ["condor_rm", "-forcex", "12", "13"]
    assert system.test_argv("/tmp/j.sub") == ["condor_submit", "-name", "schedd1",
                                              "-dry-run", "/dev/null", "/tmp/j.sub"]
    # condor_q is asked through the same schedd (-name is an option of both commands).
    assert system.status_argv(["12"]) == [
        "condor_q", "-name", "schedd1", "-json", "-attributes",
        "ClusterId,ProcId,JobStatus,HoldReason", "12"]
    assert system.record()["submit_command_extra"] == ["-name", "schedd1"]
    assert system.record()["cancel_command_extra"] == ["-forcex"]


# -- HTCondor's "new" argument syntax, decoded by a reference parser and run by a shell --------

def parse_condor_arguments(line: str) -> list:
    """The argv of an `arguments = "..."` line, by the rules of condor_submit(1), "New
    Syntax" (htcondor/htcondor docs/man-pages/condor_submit.rst):

    1. the whole string is surrounded by double quotes; a literal double quote is doubled;
    2. spaces or tabs delimit arguments;
    3. single quotes around (part of) an argument keep its spaces;
    4. inside single quotes, a doubled single quote is a literal single quote.
    (The backslash has no special meaning.)"""
    key, sep, value = line.partition(" = ")
    assert key == "arguments" and sep, line
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        raise ValueError(f"not surrounded by double quotes: {value!r}")
    s = value[1:-1]
    args, current, quoted, i = [], None, False, 0
    while i < len(s):
        c = s[i]
        if c == '"':
            if s[i + 1:i + 2] != '"':
                raise ValueError(f"lone double quote at {i}: {s!r}")
            current = (current or "") + '"'
            i += 2
        elif quoted:
            if c == "'" and s[i + 1:i + 2] == "'":
                current += "'"
                i += 2
            elif c == "'":
                quoted = False
                i += 1
            else:
                current += c
                i += 1
        elif c in " \t":
            if current is not None:
                args.append(current)
                current = None
            i += 1
        elif c == "'":
            quoted = True
            current = current or ""
            i += 1
        else:
            current = (current or "") + c
            i += 1
    if quoted:
        raise ValueError(f"unterminated single quote: {s!r}")
    if current is not None:
        args.append(current)
    return args


def expand_submit_macros(text: str, defined=None) -> str:
    """condor_submit's macro substitution, as far as these tests need it (condor_submit(1),
    "MACROS AND COMMENTS"): `$(name)` and `$(name:default)` anywhere in the submit file are
    replaced by the macro's value (an undefined one by its default, else by nothing), and
    `$(DOLLAR)` is a literal `$`. A `$(` not followed by a macro name, such as `$(date +%s)`,
    stays. (Checked against the htcondor wheel's `Submit.expand`: `$(X)` -> "", `$(X:def)`
    -> "def", `$(DOLLAR)(pwd)` -> "$(pwd)", `$(date +%s)` unchanged.)"""
    defined = {"DOLLAR": "$", **(defined or {})}

    def one(m):
        name, default = m.group(1), m.group(2)
        return defined.get(name, default if default is not None else "")
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_.]*)(?::([^)]*))?\)", one, text)


def arguments_line(text: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith("arguments = ")]
    return line


def job_argv(text: str) -> list:
    """The argv the job gets from a submit description: macros expanded by condor_submit,
    then the arguments parsed."""
    return parse_condor_arguments(expand_submit_macros(arguments_line(text)))


@pytest.mark.parametrize("line, argv", [
    # The examples of condor_submit(1), "New Syntax".
    ('arguments = "3 simple arguments"', ["3", "simple", "arguments"]),
    ("arguments = \"one 'two with spaces' 3\"", ["one", "two with spaces", "3"]),
    ("arguments = \"one \"\"two\"\" 'spacey ''quoted'' argument'\"",
     ["one", '"two"', "spacey 'quoted' argument"]),
    ("arguments = \"''\"", [""]),
])
def test_reference_parser_on_the_documented_examples(line, argv):
    assert parse_condor_arguments(line) == argv


@pytest.mark.parametrize("text", ["", "a", "it's", 'say "hi"', "''", '""', "$HOME", "a  b",
                                  "tab\there", "'\"'\"'", "back\\slash"])
def test_condor_argument_round_trips(text):
    assert parse_condor_arguments(f'arguments = "{condor_argument(text)}"') == [text]


@pytest.fixture
def argv_printer(tmp_path):
    """A stand-in for the interpreter: prints each argument it gets on a line of its own."""
    path = tmp_path / "bin" / "argv"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nprintf '<%s>\\n' \"$@\"\n")
    path.chmod(0o755)
    return str(path)


SHELLS = [s for s in ("bash", "sh") if shutil.which(s)]


def run_shell(shell, command, cwd, **env):
    return subprocess.run([shell, "-c", command], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                          timeout=30)


@pytest.mark.parametrize("shell", SHELLS)
def test_htcondor_arguments_run_the_intended_words(shell, argv_printer, tmp_path):
    # A prologue with ' and " and $VAR, arguments with spaces and quotes, and a
    # local_directory that expands on the node.
    prologue = [
        "export A=\"it's\"",
        "export B='say \"hi\"'",
        'export C="$HOME/x"',
        "printf '[%s]\\n' \"$A\" \"$B\" \"$C\" '$HOME' \"$D\"",
    ]
    text = script(HTCondor(), cores=2, memory="4GiB", python=argv_printer,
                  job_script_prologue=prologue, local_directory="$TMPDIR",
                  worker_extra_args=["--preload", "a b", "it's", 'q"uote', "$HOME"])
    argv = job_argv(text)
    assert argv[0] == "-c" and len(argv) == 2
    out = run_shell(shell, argv[1], tmp_path, HOME="/h", TMPDIR="/node/tmp", D="d d")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[it's]", '[say "hi"]', "[/h/x]", "[$HOME]", "[d d]",
        "<-m>", "<taskcore.cli.worker>", "<tcp://10.1.2.3:8786>", "<--nanny>", "<--nthreads>",
        "<2>", "<--memory-limit>", "<4294967296>", "<--name>", "<w0>", "<--local-directory>",
        "</node/tmp>", "<--log-level>", "<info>", "<--preload>", "<a b>", "<it's>",
        '<q"uote>', "</h>"]


@pytest.mark.parametrize("shell", SHELLS)
def test_htcondor_scheduler_arguments_run_in_a_shell(shell, argv_printer, tmp_path):
    job = JobScript(HTCondor(), cores=1, memory="1GiB", python=argv_printer)
    text = job.scheduler_script("/shared/s.json", {"name": "tc-sched"})
    argv = job_argv(text)
    out = run_shell(shell, argv[1], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["<--scheduler-options>",
                                            '<{"name": "tc-sched"}>']


@pytest.mark.parametrize("shell", SHELLS)
def test_htcondor_prologue_command_substitution_survives_condor_submit(shell, argv_printer,
                                                                       tmp_path):
    text = script(HTCondor(), cores=1, memory="1GiB", python=argv_printer,
                  job_script_prologue=['export WHERE="$(pwd)"', 'printf "[%s]\\n" "$WHERE"'])
    argv = job_argv(text)  # what condor_submit hands the job
    out = run_shell(shell, argv[1], tmp_path)
    assert out.stdout.splitlines()[0] == f"[{tmp_path}]"


@pytest.mark.parametrize("line", ["# set up the environment", "sleep 0 &"])
def test_htcondor_prologue_line_shapes_still_start_the_worker(line, argv_printer, tmp_path):
    text = script(HTCondor(), cores=1, memory="1GiB", python=argv_printer,
                  job_script_prologue=[line, "export A=1"])
    argv = job_argv(text)
    out = run_shell("bash", argv[1], tmp_path)
    assert "<taskcore.cli.worker>" in out.stdout.splitlines()


def test_htcondor_scripts_end_as_in_a_shell_script_for_the_other_systems(argv_printer,
                                                                       tmp_path):
    # The same prologue and command, as HTCondor's sh -c and as SLURM's script body, run
    # the same words.
    options = dict(cores=2, memory="4GiB", python=argv_printer, local_directory="$TMPDIR",
                   job_script_prologue=["export X='a b'", 'echo "[$X]"'],
                   worker_extra_args=["it's"])
    condor = job_argv(script(HTCondor(), **options))[1]
    slurm = script(SLURM(), **options)
    env = dict(HOME="/h", TMPDIR="/t")
    a = run_shell("bash", condor, tmp_path, **env)
    b = subprocess.run(["bash"], input=slurm, capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                       timeout=30)
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout


# ---------------------------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------------------------

def test_flux_minimal(fixed_python):
    assert script(Flux(), cores=2, memory="4GiB") == f"""\
#!/usr/bin/env bash

#flux: --job-name=taskcore-worker
#flux: -N 1
#flux: -n 1
#flux: -c 2

{WORKER_MIN}
"""


def test_flux_every_option():
    # -t in Flux Standard Duration; the output file name is a mustache template ({{id}});
    # no memory directive (flux batch has none): job_mem is not written.
    text = script(Flux(), **COMMON, job_directives_skip=["-N 1"],
                  job_extra_directives=["--exclusive", "#flux: --setattr=user.project=tc"])
    assert text == f"""\
#!/bin/bash -l

#flux: --job-name=tc-job
#flux: --queue=debug
#flux: --bank=proj-42
#flux: -n 1
#flux: -c 16
#flux: -t 3600s
#flux: --output=/home/u/logs/tc-job-{{{{id}}}}.out
#flux: --exclusive
#flux: --setattr=user.project=tc

module load python/3.11
export OMP_NUM_THREADS=1
{WORKER_ALL}
"""


def test_flux_scheduler_script():
    assert scheduler_script(Flux()) == f"""\
#!/usr/bin/env bash

#flux: --job-name=taskcore-scheduler
#flux: --queue=long
#flux: -N 1
#flux: -n 1
#flux: -c 1
#flux: -t 7200s

{SCHEDULER}
"""


# ---------------------------------------------------------------------------------------------
# Walltime formats
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system", [SLURM, SGE, OAR, PBS, Torque, Moab])
@pytest.mark.parametrize("seconds, text", [
    (3661, "01:01:01"),
    (59.2, "00:01:00"),      # rounded up to whole seconds
    (0.5, "00:00:01"),
    (86400, "24:00:00"),     # hours past a day
    (100 * 3600, "100:00:00"),
])
def test_hh_mm_ss_walltime(system, seconds, text):
    assert system().format_walltime(seconds) == text


@pytest.mark.parametrize("seconds, text", [
    (3600, "01:00"),
    (3601, "01:01"),         # minutes rounded up: a job never gets less than it asked
    (59, "00:01"),
    (60, "00:01"),
    (90, "00:02"),
    (2 * 86400, "48:00"),
])
def test_lsf_walltime_is_hh_mm(seconds, text):
    assert LSF().format_walltime(seconds) == text


@pytest.mark.parametrize("seconds, text", [(3600, "3600"), (90.2, "91"), (0.1, "1")])
def test_htcondor_walltime_is_seconds(seconds, text):
    assert HTCondor().format_walltime(seconds) == text


@pytest.mark.parametrize("seconds, text", [(3600, "3600s"), (90.2, "91s"), (0.1, "1s")])
def test_flux_walltime_is_fsd_seconds(seconds, text):
    assert Flux().format_walltime(seconds) == text


@pytest.mark.parametrize("system, walltime, line", [
    (SGE, "90m", "#$ -l h_rt=01:30:00"),
    (OAR, "1-00:00:00", "#OAR -l /nodes=1/core=1,walltime=24:00:00"),
    (PBS, 90, "#PBS -l walltime=00:01:30"),
    (LSF, "00:30:30", "#BSUB -W 00:31"),
    (HTCondor, "2h", "allowed_job_duration = 7200"),
    (Flux, "45", "#flux: -t 2700s"),
])
def test_walltime_directive(system, walltime, line):
    assert line in JobScript(system(), cores=1, memory="1GiB", walltime=walltime).header()


# ---------------------------------------------------------------------------------------------
# Log file names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system, job_id, name, template_line", [
    # The file the log template names, for the id the batch system gives:
    (SLURM, "4242", "tc-4242.out", "#SBATCH -o /logs/tc-%j.out"),
    (SGE, "4242", "tc-4242.out", "#$ -o /logs/$JOB_NAME-$JOB_ID.out"),
    (OAR, "4242", "tc-4242.out", "#OAR -O /logs/tc-%jobid%.out"),
    # `-o DIR/`: PBS names the file NAME.oSEQUENCE, without the server part of the id.
    (PBS, "4242.pbs01", "tc.o4242", "#PBS -o /logs/"),
    (Torque, "4242.torque.example.org", "tc.o4242", "#PBS -o /logs/"),
    (Moab, "4242", "tc.o4242", "#PBS -o /logs/"),
    (LSF, "4242", "tc-4242.out", "#BSUB -o /logs/tc-%J.out"),
    (HTCondor, "4242", "tc-4242.out", "output = /logs/tc-$(ClusterId).out"),
    (Flux, "ƒ2Bx3YkZMd", "tc-ƒ2Bx3YkZMd.out", "#flux: --output=/logs/tc-{{id}}.out"),
])
def test_log_file_name(system, job_id, name, template_line):
    job = JobScript(system(), cores=1, memory="1GiB", job_name="tc", log_directory="/logs")
    assert system().log_file_name(job, job_id) == name
    assert template_line in job.header()


def test_log_directory_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    job = JobScript(LSF(), cores=1, memory="1GiB", job_name="tc", log_directory="~/logs")
    assert "#BSUB -o /home/me/logs/tc-%J.out" in job.header()


# ---------------------------------------------------------------------------------------------
# Options of a system's own: the cluster's job_script_template takes them, others refuse
# ---------------------------------------------------------------------------------------------

CLUSTERS = [
    (SGECluster, SGE, {"resource_spec": "h_vmem=4G"}, "#$ -l h_vmem=4G", "lsf_units"),
    (OARCluster, OAR, {"memory_per_core_property_name": "memcore",
                       "oar_resource_properties": "gpu='YES'"},
     "#OAR -p (gpu='YES') AND memcore>=2048", "resource_spec"),
    (PBSCluster, PBS, {"resource_spec": "select=1:ncpus=2:mem=8gb"},
     "#PBS -l select=1:ncpus=2:mem=8gb", "disk"),
    (TorqueCluster, Torque, {"resource_spec": "nodes=1:ppn=2:gpus=1"},
     "#PBS -l nodes=1:ppn=2:gpus=1", "oar_resource_properties"),
    (MoabCluster, Moab, {"resource_spec": "nodes=1:ppn=2"}, "#PBS -l nodes=1:ppn=2",
     "use_stdin"),
    (LSFCluster, LSF, {"lsf_units": "MB", "use_stdin": False}, "#BSUB -M 4096",
     "resource_spec"),
    (HTCondorCluster, HTCondor, {"disk": "2GiB", "submit_command_extra": ["-name", "s1"]},
     "request_disk = 2097152", "lsf_units"),
    (FluxCluster, Flux, {}, "#flux: -c 2", "resource_spec"),
    (SLURMCluster, SLURM, {}, "#SBATCH --cpus-per-task=2", "memory_per_core_property_name"),
]


@pytest.mark.parametrize("cluster, system, own, line, foreign", CLUSTERS)
def test_job_script_template_takes_the_systems_own_options(cluster, system, own, line,
                                                           foreign):
    job = cluster.job_script_template(cores=2, memory="4GiB", python="/py", **own)
    assert isinstance(job, JobScript) and type(job.system) is system
    assert job.system_options == {**system.job_options, **own}
    assert line in job.header()
    assert cluster.option_names() == JOB_OPTIONS | set(system.job_options)


@pytest.mark.parametrize("cluster, system, own, line, foreign", CLUSTERS)
def test_job_script_template_refuses_another_systems_option(cluster, system, own, line,
                                                            foreign):
    with pytest.raises(TypeError, match=rf"^{cluster.__name__} got unknown option\(s\) "
                                        rf"\['{foreign}'\]; job options are \[") as info:
        cluster.job_script_template(cores=2, memory="4GiB", **{foreign: "x"})
    for name in system.job_options:  # the message lists the system's own options
        assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("system, foreign", [(SGE, "lsf_units"), (LSF, "resource_spec"),
                                             (Flux, "disk")])
def test_job_script_refuses_another_systems_option(system, foreign):
    own = sorted(system.job_options) or "none"
    with pytest.raises(TypeError) as info:
        JobScript(system(), cores=1, memory="1GiB", **{foreign: "x"})
    assert str(info.value) == (f"unknown job option(s) ['{foreign}'] for {system.name}; "
                               f"its own options are {own}")


def test_job_script_template_reads_the_site_config(tmp_path, monkeypatch):
    config = tmp_path / "jobqueue.toml"
    config.write_text('[lsf]\nlsf_units = "GB"\nqueue = "short"\n'
                      '[sge]\nresource_spec = "h_vmem=2G"\n')
    monkeypatch.setenv("TASKCORE_JOBQUEUE_CONFIG", str(config))
    lsf = LSFCluster.job_script_template(cores=1, memory="4GiB")
    assert "#BSUB -M 4" in lsf.header() and "#BSUB -q short" in lsf.header()
    # An explicit argument wins over the file.
    assert "#BSUB -M 4096" in LSFCluster.job_script_template(
        cores=1, memory="4GiB", lsf_units="MB").header()
    assert "#$ -l h_vmem=2G" in SGECluster.job_script_template(cores=1, memory="1GiB").header()


def test_lsf_walltime_is_hours_and_minutes_as_bsub_reads_it():
    from taskcore.deploy.jobqueue.lsf import LSF

    job = JobScript(LSF(), cores=1, memory="1GiB", walltime="01:30")
    assert job.walltime_seconds == 5400 and "#BSUB -W 01:30" in job.header()
    assert JobScript(LSF(), cores=1, memory="1GiB", walltime="45").walltime_seconds == 2700
    assert JobScript(LSF(), cores=1, memory="1GiB", walltime="2h").walltime_seconds == 7200


def test_oar_not_applicable_memory_property_adds_no_filter():
    from taskcore.deploy.jobqueue.oar import OAR

    job = JobScript(OAR(), cores=1, memory="1GiB", memory_per_core_property_name="not_applicable")
    assert not [h for h in job.header() if h.startswith("#OAR -p")]


def test_pbs_log_names_use_the_sequence_number():
    from taskcore.deploy.jobqueue.pbs import PBS, Moab

    job = JobScript(PBS(), cores=1, memory="1GiB", log_directory="/logs")
    assert PBS().log_file_name(job, "123.server") == "taskcore-worker.o123"
    assert Moab().log_file_name(job, "Moab.77") == "taskcore-worker.o77"
