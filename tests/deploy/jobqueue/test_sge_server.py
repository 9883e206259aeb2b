"""The real single-node Sun Grid Engine of the test suite (sge_server.py) works as the
SGE batch system will use it: job scripts submitted as files run, several at once, in
both queues; qdel ends a running job; impossible requests fail at submission with
SGE's own message."""
import os
import time

import pytest

from taskcore.testing import wait_until


def script(path, body):
    # shell_start_mode posix_compliant: /bin/sh runs the script whatever its #! line.
    path.write_text("#!/bin/sh\n#$ -S /bin/sh\n" + body)
    return path


def test_job_script_runs_and_writes_a_file_in_either_queue(sge_clean, tmp_path):
    job = script(tmp_path / "job.sh",
                 'echo "$JOB_ID $QUEUE $(pwd)" > "result.$JOB_ID"\necho to-stdout\nexit 3\n')
    ids = {
        "all.q": sge_clean.qsub("-cwd", "-j", "y", "-o", str(tmp_path / "out.$JOB_ID"),
                                str(job)),
        "bigmem.q": sge_clean.qsub("-cwd", "-q", "bigmem.q", "-j", "y",
                                   "-o", str(tmp_path / "out.$JOB_ID"), str(job)),
    }
    for queue, job_id in ids.items():
        assert job_id.isdigit()
        result = tmp_path / f"result.{job_id}"
        wait_until(lambda: result.exists() and result.read_text().strip(), 15,
                 f"{result.name} from job {job_id}")
        assert result.read_text().split() == [job_id, queue, str(tmp_path)]
    sge_clean.wait_idle(10)  # ended jobs leave qstat about a second later
    for queue, job_id in ids.items():
        assert (tmp_path / f"out.{job_id}").read_text() == "to-stdout\n"
        # accounting_flush_time=0: the record is there once the job has left qstat.
        acct = dict(line.split(None, 1) for line in
                    sge_clean.run("qacct", "-j", job_id).stdout.splitlines()[1:])
        assert (acct["qname"].strip(), acct["failed"].strip(), acct["exit_status"].strip()) \
            == (queue, "0", "3")


def test_two_jobs_run_at_once(sge_clean, tmp_path):
    # Each job announces itself, then waits (up to 10 s) for the other one: each sees
    # both only if SGE runs them concurrently.
    job = script(tmp_path / "pair.sh", """\
touch "started.$JOB_ID"
n=0
while [ "$(ls started.* | wc -l)" -lt 2 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ls started.* | wc -l > "seen.$JOB_ID"
""")
    ids = [sge_clean.qsub("-cwd", "-o", "/dev/null", "-e", "/dev/null", str(job))
           for _ in range(2)]
    # (qstat may never show them "r": a job is "t" until the execd confirms it, about
    # a second after it started, and these end sooner.)
    for job_id in ids:
        seen = tmp_path / f"seen.{job_id}"
        wait_until(lambda: seen.exists() and seen.read_text().strip(), 15, seen.name)
        assert seen.read_text().strip() == "2"
    sge_clean.wait_idle(10)


def test_qdel_ends_a_running_job(sge_clean, tmp_path):
    job = script(tmp_path / "long.sh", 'echo $$ > "pid.$JOB_ID"\nsleep 300\n')
    job_id = sge_clean.qsub("-cwd", "-o", "/dev/null", "-e", "/dev/null", str(job))
    pid_file = tmp_path / f"pid.{job_id}"
    wait_until(pid_file.exists, 15, "the job to start")
    wait_until(lambda: dict(sge_clean.jobs()).get(job_id) == "r", 10, "state r")
    pid = int(wait_until(lambda: pid_file.read_text().strip(), 5, "the pid"))
    start = time.monotonic()
    out = sge_clean.run("qdel", job_id).stdout
    assert out.strip() == f"root has registered the job {job_id} for deletion"
    sge_clean.wait_idle(8)
    elapsed = time.monotonic() - start
    assert elapsed < 8
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    unknown = sge_clean.run("qdel", job_id, check=False)
    assert unknown.returncode == 1
    assert unknown.stdout.strip() == f'denied: job "{job_id}" does not exist'


@pytest.mark.parametrize("args, message", [
    (["-q", "nosuch.q"], 'Job was rejected because job requests unknown queue "nosuch.q"'),
    (["-l", "nosuch=1"], 'unknown resource "nosuch"'),
    (["-pe", "smp", "2"], 'the requested parallel environment "smp" does not exist'),
    (["-w", "e", "-l", "arch=nosuch"], "error: no suitable queues"),
])
def test_impossible_requests_fail_at_submission(sge_clean, tmp_path, args, message):
    job = script(tmp_path / "never.sh", "touch ran\n")
    proc = sge_clean.run("qsub", "-cwd", *args, str(job), check=False)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith("Unable to run job: ") and message in proc.stderr, proc.stderr
    assert sge_clean.jobs() == []
    assert not (tmp_path / "ran").exists()
