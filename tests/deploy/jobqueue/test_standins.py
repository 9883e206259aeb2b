"""The batch-system stand-ins (tests/deploy/jobqueue/standins) checked through taskcore's
own backends: each job script is rendered by taskcore's JobScript for the system,
submitted with the backend's submit command, its id read by the backend's
parse_job_id, and its states read by the backend's status command and parse_status
(BatchSystem.run, with status_accepts), as the cluster's poller does.

Every test runs for each family (the `standin_batch` fixture: pbs, torque, moab, lsf,
htcondor, flux) unless it names its families.
"""
import asyncio
import json
import os
import sys
import time

import pytest

from taskcore.deploy.jobqueue import flux, htcondor, lsf, pbs
from taskcore.deploy.jobqueue.job import JobScript
from taskcore.deploy.jobqueue.system import BatchCommandError, JobState

from .standins import batch_standin as program

SYSTEMS = {"pbs": pbs.PBS, "torque": pbs.Torque, "moab": pbs.Moab, "lsf": lsf.LSF,
           "htcondor": htcondor.HTCondor, "flux": flux.Flux}
# How each system ends a job that exited 0: PBS/Torque/LSF/Flux keep it listed as
# finished; Moab (showq) and HTCondor (condor_q) drop it, so the poller calls it gone.
ENDED_OK = {"pbs": JobState.done, "torque": JobState.done, "moab": JobState.gone,
            "lsf": JobState.done, "htcondor": JobState.gone, "flux": JobState.done}


def make_system(standin, **kwargs):
    return SYSTEMS[standin.family](poll_interval=0.1, command_timeout=20, **kwargs)


def run(system, argv, stdin=None, accept=None):
    return asyncio.run(system.run(argv, "test", stdin=stdin, accept=accept))


def write_script(system, tmp_path, command, name="job", **job):
    job.setdefault("cores", 1)
    job.setdefault("memory", "100MB")
    script = JobScript(system, **job)
    path = tmp_path / f"{name}.sub"
    path.write_text(script.render([str(c) for c in command]))
    return script, str(path)


def submit(system, path):
    """The backend's submit command; the id its parse_job_id reads."""
    stdin = open(path, "rb").read() if system.script_on_stdin else None
    out = run(system, system.submit_argv(path), stdin=stdin)
    return system.parse_job_id(out), out


def status(system, ids):
    """{id: (JobState, native, reason)} through the backend's status command and parser."""
    out = run(system, system.status_argv(list(ids)), accept=system.status_accepts)
    return system.parse_status(out)


def watch(system, job_id, until, timeout=15.0):
    """The distinct states of one job until `until(state)`; [(JobState, native, reason)]."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        state = status(system, [job_id]).get(job_id, (JobState.gone, None, None))
        if not seen or seen[-1][:2] != state[:2]:
            seen.append(state)
        if until(state[0]):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not there after {timeout} s: {seen}")
        time.sleep(0.03)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return program.proc_token(pid) is not None


# -------------------------------------------------------------------------------------------
# A job's life
# -------------------------------------------------------------------------------------------

def test_job_runs_writes_its_output_and_ends(standin_batch, tmp_path, monkeypatch):
    """Submit a JobScript-rendered job: id parsed by the backend, pending then running then
    ended as each system shows it; the job's environment and working directory are the
    system's; its output lands where the backend's log_file_name says."""
    family = standin_batch.family
    monkeypatch.setenv("STANDIN_MARK", "from-the-submitter")
    system = make_system(standin_batch)
    logs = tmp_path / "logs"
    logs.mkdir()
    report = tmp_path / "report.json"
    release = tmp_path / "release"
    # One line: an HTCondor submit file cannot carry a newline inside `arguments`.
    code = ("import json, os, sys, time; "
            f"[time.sleep(0.02) for _ in iter(lambda: not os.path.exists({str(release)!r}), "
            "False)]; print('hello from the job'); "
            "keys = ['PBS_JOBID', 'PBS_O_WORKDIR', 'MOAB_JOBID', 'LSB_JOBID', 'FLUX_JOB_ID', "
            "'STANDIN_MARK', '_CONDOR_JOB_IWD']; "
            f"json.dump(dict(env={{k: os.environ.get(k) for k in keys}}, cwd=os.getcwd()), "
            f"open({str(report)!r}, 'w'))")
    script, path = write_script(system, tmp_path, [sys.executable, "-c", code],
                                log_directory=str(logs), walltime="00:05:00")
    t0 = time.monotonic()
    job_id, out = submit(system, path)
    first = status(system, [job_id])[job_id]
    # Queued first (the stand-in starts a job 0.3 s after it is scheduled), unless this
    # machine was too slow to look in time.
    assert first[0] is JobState.pending or time.monotonic() - t0 > program.START_DELAY, first
    assert [j for j, _ in standin_batch.jobs()] == [job_id]
    if family == "moab":
        assert out.startswith("\n")   # msub: a blank line, then the id

    # qstat / bjobs exit non-zero for an id they do not know, yet print the others (the
    # backend's status_accepts lets that through); condor_q and flux jobs exit 0.
    unknown = {"pbs": f"999.{program.PBS_SERVER}", "torque": f"999.{program.TORQUE_SERVER}",
               "moab": "999", "lsf": "999", "htcondor": "999",
               "flux": program.f58_encode(999)}[family]
    seen = status(system, [job_id, unknown])
    assert job_id in seen and unknown not in seen

    states = [first] + watch(system, job_id, lambda s: s is JobState.running)
    release.touch()
    states += watch(system, job_id, lambda s: s.ended)
    kinds = [s for s, _, _ in states]
    assert JobState.running in kinds, states
    assert kinds[-1] is ENDED_OK[family], states

    got = json.loads(report.read_text())
    env, cwd = got["env"], got["cwd"]
    if family in ("pbs", "torque", "moab"):
        # No -V in taskcore's header: the job gets PBS's variables, not the submitter's.
        assert env["STANDIN_MARK"] is None
        assert env["PBS_O_WORKDIR"] == os.getcwd()
        assert cwd == os.path.expanduser("~")   # PBS starts jobs in $HOME
        expected = job_id if family != "moab" else f"{job_id}.{program.TORQUE_SERVER}"
        assert env["PBS_JOBID"] == expected
        if family == "moab":
            assert env["MOAB_JOBID"] == job_id
    else:
        assert env["STANDIN_MARK"] == "from-the-submitter"
        assert cwd == os.getcwd()
        variable = {"lsf": "LSB_JOBID", "flux": "FLUX_JOB_ID", "htcondor": None}[family]
        if variable:
            assert env[variable] == job_id
        else:
            assert env["_CONDOR_JOB_IWD"] == os.getcwd()

    log_file = logs / system.log_file_name(script, job_id)
    assert "hello from the job" in log_file.read_text()
    if family == "lsf":
        assert "Successfully completed." in log_file.read_text()


def test_cancel_kills_the_job_and_ends_it(standin_batch, tmp_path):
    system = make_system(standin_batch)
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    _, path = write_script(system, tmp_path, [sys.executable, "-c", code])
    job_id, _ = submit(system, path)
    watch(system, job_id, lambda s: s is JobState.running)
    deadline = time.monotonic() + 5
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert pid_alive(pid)

    t0 = time.monotonic()
    asyncio.run(system.cancel([job_id]))
    states = watch(system, job_id, lambda s: s.ended)
    assert time.monotonic() - t0 < 3
    assert not pid_alive(pid)
    final = states[-1]
    family = standin_batch.family
    if family == "moab":
        assert final[0] is JobState.gone          # canceljob: off showq
    elif family == "htcondor":
        # condor_rm: JobStatus 3 (Removed) while the job is being killed, then off the queue.
        assert final[:2] in ((JobState.failed, "Removed"), (JobState.gone, None)), states
        watch(system, job_id, lambda s: s is JobState.gone)
    else:
        assert final[0] is JobState.failed, states
        assert final[1] == {"pbs": "F", "torque": "C", "lsf": "EXIT", "flux": "CANCELED"}[family]
    if family == "lsf":
        assert final[2] == "TERM_OWNER: job killed by owner"

    # The systems refuse to cancel a job that has ended (PBS "Job has finished", LSF
    # "Job has already finished", HTCondor "Couldn't find/remove", Flux "job is
    # inactive", Torque/Moab invalid state/job): the backends' cancel raises.
    with pytest.raises(BatchCommandError):
        asyncio.run(system.cancel([job_id]))


def test_walltime_kills_the_job(standin_batch, tmp_path, monkeypatch):
    family = standin_batch.family
    system = make_system(standin_batch)
    # The site's clock runs fast for walltimes: 1 s is enforced after 0.3 s, and LSF's
    # one minute (bsub -W is in minutes) after 0.3 s too.
    walltime = 1
    monkeypatch.setenv("TASKCORE_STANDIN_WALLTIME_SCALE", "0.3")
    if family == "lsf":
        monkeypatch.setenv("TASKCORE_STANDIN_WALLTIME_SCALE", "0.005")
        walltime = 60
    logs = tmp_path / "logs"
    logs.mkdir()
    script, path = write_script(system, tmp_path, ["/bin/sleep", "60"], walltime=walltime,
                                log_directory=str(logs))
    job_id, _ = submit(system, path)
    states = watch(system, job_id, lambda s: s.ended or s is JobState.failed, timeout=10)
    state, native, reason = states[-1]
    if family == "moab":
        assert state is JobState.gone
    else:
        assert state is JobState.failed, states
    if family == "pbs":
        assert native == "F"
        log = (logs / system.log_file_name(script, job_id)).read_text()
        assert "=>> PBS: job killed: walltime" in log
        assert json.loads(run(system, ["qstat", "-x", "-f", "-F", "json", job_id]))[
            "Jobs"][job_id]["Exit_status"] == -29
    elif family == "lsf":
        assert (native, reason) == (
            "EXIT", "TERM_RUNLIMIT: job killed after reaching LSF run time limit")
    elif family == "flux":
        assert native == "TIMEOUT"
    elif family == "htcondor":
        # allowed_job_duration exceeded: HTCondor holds the job; it stays in the queue
        # (taskcore's lingering_states) until removed.
        assert native == "Held"
        assert "exceeded allowed job duration" in reason
        assert standin_batch.jobs() == [(job_id, "Held")]
        asyncio.run(system.cancel([job_id]))
        assert standin_batch.jobs() == []


def test_jobs_wait_for_free_cpus(standin_batch, tmp_path):
    """8 CPUs: two 4-CPU jobs run, a third waits (pending) until one of them ends."""
    system = make_system(standin_batch)
    release = tmp_path / "release"
    wait = f"while [ ! -e {release} ]; do sleep 0.02; done"
    ids = []
    for i in range(3):
        _, path = write_script(system, tmp_path, ["/bin/sh", "-c", wait], name=f"job{i}",
                               cores=4)
        ids.append(submit(system, path)[0])
    for job_id in ids[:2]:
        watch(system, job_id, lambda s: s is JobState.running)
    # Had the third fitted, it would have been started with them (same start delay).
    time.sleep(0.05)
    assert status(system, [ids[2]])[ids[2]][0] is JobState.pending
    release.touch()
    # The third starts once the first two have ended, without anyone cancelling.
    for job_id in ids:
        watch(system, job_id, lambda s: s.ended)


# -------------------------------------------------------------------------------------------
# Refusals, as the real commands word them
# -------------------------------------------------------------------------------------------

BAD_QUEUE = {
    "pbs": ("qsub: Unknown queue", 170),
    "torque": ("qsub: submit error (Unknown queue MSG=requested queue not found)", 1),
    "moab": ("invalid class 'nosuch'", 1),
    "lsf": ("nosuch: No such queue. Job not submitted.", 255),
    "flux": ("flux-batch: ERROR: 'nosuch' is not a valid queue", 1),
}


def test_unknown_queue_is_refused(standin_batch, tmp_path):
    family = standin_batch.family
    system = make_system(standin_batch)
    if family == "htcondor":
        # HTCondor has no queues (the header has no queue line): refuse a bad request_memory.
        _, path = write_script(system, tmp_path, ["/bin/true"],
                               job_extra_directives=["request_memory = 12XB"])
        text, code = "request_memory = 12XB", 1
    else:
        _, path = write_script(system, tmp_path, ["/bin/true"], queue="nosuch")
        text, code = BAD_QUEUE[family]
    with pytest.raises(BatchCommandError) as info:
        submit(system, path)
    assert text in str(info.value)
    assert f"(exit status {code})" in str(info.value)
    assert standin_batch.jobs(all_states=True) == []
    # The queue that exists takes the same job.
    if family != "htcondor":
        _, path = write_script(system, tmp_path, ["/bin/true"], queue="bigmem")
        job_id, _ = submit(system, path)
        assert standin_batch.jobs()[0][0] == job_id
        asyncio.run(system.cancel([job_id]))
        watch(system, job_id, lambda s: s.ended)


@pytest.mark.parametrize("standin_batch", ["htcondor", "flux"], indirect=True)
def test_validate_uses_the_systems_dry_run(standin_batch, tmp_path):
    """BatchSystem.validate (test_argv): `condor_submit -dry-run` and `flux batch --dry-run`;
    the other systems have no such command."""
    family = standin_batch.family
    system = make_system(standin_batch)
    if family == "htcondor":
        _, bad = write_script(system, tmp_path, ["/bin/true"],
                              job_extra_directives=["request_disk = lots"])
        with pytest.raises(BatchCommandError, match="request_disk = lots"):
            asyncio.run(system.validate(bad))
    else:
        # `flux batch --dry-run` only parses options: the queue is checked by the
        # job-manager at submission, so a dry run passes an unknown queue.
        _, bad = write_script(system, tmp_path, ["/bin/true"], queue="nosuch")
        asyncio.run(system.validate(bad))
        _, bad = write_script(system, tmp_path, ["/bin/true"],
                              job_extra_directives=["--no-such-option"])
        with pytest.raises(BatchCommandError, match="unrecognized arguments"):
            asyncio.run(system.validate(bad))
    assert standin_batch.jobs(all_states=True) == []


def test_unknown_options_are_refused(standin_batch, tmp_path):
    submit_command = {"pbs": "qsub", "torque": "qsub", "moab": "msub", "lsf": "bsub",
                      "htcondor": "condor_submit", "flux": "flux"}[standin_batch.family]
    argv = [submit_command, "-Z"] if submit_command != "flux" else ["flux", "batch", "--zz"]
    proc = standin_batch.run(*argv, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip()
    assert standin_batch.jobs(all_states=True) == []


# -------------------------------------------------------------------------------------------
# Details of single systems
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("standin_batch", ["torque"], indirect=True)
def test_torque_refuses_more_cpus_than_a_node_has(standin_batch, tmp_path):
    system = make_system(standin_batch)
    _, path = write_script(system, tmp_path, ["/bin/true"], cores=16)
    with pytest.raises(BatchCommandError, match="cannot locate feasible nodes"):
        submit(system, path)


@pytest.mark.parametrize("standin_batch", ["torque"], indirect=True)
def test_torque_qstat_x_prints_one_document_per_job_id(standin_batch, tmp_path):
    """Torque's qstat stats and prints one operand at a time (qstat.c: run_job_mode ->
    display_statjob per operand), so `qstat -x ID1 ID2` is two XML documents."""
    system = make_system(standin_batch)
    ids = []
    for i in range(2):
        # Long enough to be cancelled while running, however slow the machine is.
        _, path = write_script(system, tmp_path, ["/bin/sleep", "30"], name=f"j{i}")
        ids.append(submit(system, path)[0])
    out = run(system, system.status_argv(ids), accept=system.status_accepts)
    assert out.count("<Data>") == 2 and out.count('<?xml version="1.0"?>') == 2
    # The backend reads every document (one ET.fromstring over the whole output would
    # fail: "junk after document element").
    assert set(ids) <= set(system.parse_status(out))
    asyncio.run(system.cancel(ids))


@pytest.mark.parametrize("standin_batch", ["lsf"], indirect=True)
def test_lsf_without_stdin_runs_the_file_as_a_command(standin_batch, tmp_path):
    """`bsub script` (use_stdin=False) makes the file the job's command: its #BSUB lines
    are not read (LSB_BSUB_PARSE_SCRIPT=N, the default) and it runs at start time."""
    system = make_system(standin_batch, use_stdin=False)
    _, path = write_script(system, tmp_path, ["/bin/true"], job_name="from-directive")
    os.chmod(path, 0o755)
    job_id, _ = submit(system, path)
    out = run(system, ["bjobs", "-a", "-o", "jobid job_name", "-json", job_id])
    assert json.loads(out)["RECORDS"][0]["JOB_NAME"] == path
    assert watch(system, job_id, lambda s: s.ended)[-1][0] is JobState.done


@pytest.mark.parametrize("standin_batch", ["pbs"], indirect=True)
def test_pbs_finished_job_needs_x(standin_batch, tmp_path):
    system = make_system(standin_batch)
    _, path = write_script(system, tmp_path, ["/bin/true"])
    job_id, _ = submit(system, path)
    watch(system, job_id, lambda s: s.ended)
    proc = standin_batch.run("qstat", "-f", "-F", "json", job_id, check=False)
    assert proc.returncode == 35
    assert "Job has finished, use -x or -H" in proc.stderr
    attrs = json.loads(standin_batch.run("qstat", "-x", "-f", "-F", "json", job_id).stdout)
    assert attrs["Jobs"][job_id]["job_state"] == "F"
    assert attrs["Jobs"][job_id]["Exit_status"] == 0
    # More CPUs than the site has: queued for ever, with the scheduler's comment.
    _, path = write_script(system, tmp_path, ["/bin/true"], cores=16)
    big, _ = submit(system, path)
    attrs = json.loads(standin_batch.run("qstat", "-f", "-F", "json", big).stdout)["Jobs"][big]
    assert attrs["job_state"] == "Q" and attrs["comment"].startswith("Can Never Run")
    asyncio.run(system.cancel([big]))
    assert status(system, [big])[big][:2] == (JobState.done, "F")  # no Exit_status: never ran


@pytest.mark.parametrize("standin_batch", ["htcondor"], indirect=True)
def test_condor_arguments_new_syntax_and_hold_on_exec_failure(standin_batch, tmp_path):
    out = tmp_path / "args.json"
    helper = tmp_path / "args.py"
    helper.write_text("import json, sys\n"
                      f"json.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    sub = tmp_path / "args.sub"
    sub.write_text(f"executable = {sys.executable}\n"
                   f"arguments = \"{helper} 'a b' 'it''s' \"\"q\"\" plain\"\n"
                   "queue\n")
    system = make_system(standin_batch)
    job_id, _ = submit(system, str(sub))
    watch(system, job_id, lambda s: s.ended)
    assert json.loads(out.read_text()) == ["a b", "it's", '"q"', "plain"]

    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    sub.write_text(f"executable = {noexec}\nqueue\n")
    job_id, _ = submit(system, str(sub))
    state, native, reason = watch(system, job_id, lambda s: s is JobState.failed)[-1]
    assert native == "Held" and "Failed to execute" in reason and "errno=13" in reason
    asyncio.run(system.cancel([job_id]))
    assert standin_batch.jobs() == []


@pytest.mark.parametrize("standin_batch", ["flux"], indirect=True)
def test_flux_ids_are_f58(standin_batch):
    assert program.f58_encode(0, "ƒ") == "ƒ1"
    assert program.f58_encode(57, "ƒ") == "ƒz"
    assert program.f58_encode(58, "ƒ") == "ƒ21"
    assert program.flux_decode("ƒ21") == program.flux_decode("f21") == 58
    proc = standin_batch.run("flux", "jobs", "-a", "-n", "--format={id.f58}", "ƒ21")
    assert proc.returncode == 0 and "JobID ƒ21 unknown" in proc.stderr

