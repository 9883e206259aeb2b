"""The private SLURM of these tests works: jobs run, run side by side, are cancelled,
and bad submissions get SLURM's own errors."""
import os
import sys
import time

from taskcore.testing import wait_until


def state(slurm, job):
    return dict(slurm.jobs(all_states=True)).get(job)


def test_batch_job_runs_with_the_submitters_environment(slurm_clean, tmp_path):
    slurm = slurm_clean
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "tcprobe.py").write_text("VALUE = 'probe-ok'\n")
    result = tmp_path / "result.txt"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -c \"import os, tcprobe; open('{result}', 'w').write("
        "tcprobe.VALUE + ' ' + os.environ['SLURM_JOB_ID'] + ' ' + os.environ['SLURM_CONF'])\"\n")
    env = {**slurm.env, "PYTHONPATH": str(mods)}  # sbatch's default --export=ALL passes it on
    job = slurm.sbatch(f"--output={tmp_path / 'job.out'}", "--job-name=tc-write", str(script),
                       env=env)
    wait_until(lambda: state(slurm, job) == "COMPLETED", 15, f"job {job} to complete")
    assert result.read_text() == f"probe-ok {job} {slurm.conf}"
    assert (tmp_path / "job.out").read_text() == ""
    assert slurm.jobs() == []


def test_two_jobs_run_at_once(slurm_clean, tmp_path):
    slurm = slurm_clean
    # Each job marks that it started, then waits for the other's mark: both finish only
    # when they ran side by side.
    script = tmp_path / "pair.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'touch {tmp_path}/started.$1\n'
        "i=0\n"
        f'while [ ! -e {tmp_path}/started.$2 ]; do\n'
        '  i=$((i + 1)); [ $i -gt 100 ] && exit 1; sleep 0.1\n'
        "done\n")
    jobs = [slurm.sbatch(f"--output={tmp_path}/pair-{a}.out", "--mem=2G", str(script), a, b)
            for a, b in (("a", "b"), ("b", "a"))]
    wait_until(lambda: all(state(slurm, j) in ("COMPLETED", "FAILED") for j in jobs), 15,
             f"jobs {jobs} to end")
    assert [state(slurm, j) for j in jobs] == ["COMPLETED", "COMPLETED"]


def test_scancel_kills_a_running_job(slurm_clean, tmp_path):
    slurm = slurm_clean
    pidfile = tmp_path / "pid"
    job = slurm.sbatch(f"--output={tmp_path}/sleep.out", "--wrap",
                       f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 300")
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15,
                       "the job to start"))
    assert state(slurm, job) == "RUNNING"
    t0 = time.monotonic()
    slurm.run("scancel", job)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5, f"the job's process {pid} to end")
    wait_until(lambda: state(slurm, job) == "CANCELLED", 10, "squeue to show CANCELLED")
    assert time.monotonic() - t0 < 10
    assert slurm.jobs() == []  # plain squeue lists only jobs not finished


def test_srun_outside_an_allocation(slurm_clean):
    out = slurm_clean.run("srun", "-n", "4", sys.executable, "-c",
                          "import os; print(os.environ['SLURM_PROCID'])").stdout
    assert sorted(out.split()) == ["0", "1", "2", "3"]


def test_bad_submissions_are_refused_with_slurms_errors(slurm_clean):
    slurm = slurm_clean
    r = slurm.run("sbatch", "--partition=nosuch", "--wrap", "true", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "sbatch: error: invalid partition specified: nosuch",
        "sbatch: error: Batch job submission failed: Invalid partition name specified"]
    r = slurm.run("sbatch", "--partition=restricted", "--account=bad", "--wrap", "true",
                  check=False)
    assert r.returncode == 1
    assert ("sbatch: error: Batch job submission failed: Invalid account or account/partition"
            " combination specified") in r.stderr.splitlines()
    r = slurm.run("sbatch", "--mem=20G", "--wrap", "true", check=False)
    assert r.returncode == 1
    assert "sbatch: error: Memory specification can not be satisfied" in r.stderr
    # The allowed account passes (--test-only: checked, never queued).
    r = slurm.run("sbatch", "--test-only", "--partition=restricted", "--account=acct-ok",
                  "--wrap", "true", check=False)
    assert r.returncode == 0 and " in partition restricted" in r.stderr, r.stderr
    assert slurm.jobs() == []


def test_gpus_as_generic_resources(slurm_clean, tmp_path):
    """SLURM hands out the node's two (file-backed) GPUs: CUDA_VISIBLE_DEVICES for the
    job, and more than the node has is refused at submission."""
    slurm = slurm_clean
    out = tmp_path / "gpu.out"
    job = slurm.sbatch(f"--output={out}", "--gres=gpu:2", "--wrap",
                       'echo "CVD=$CUDA_VISIBLE_DEVICES"')
    wait_until(lambda: state(slurm, job) == "COMPLETED", 15, f"job {job} to complete")
    assert "CVD=0,1" in out.read_text().splitlines()
    r = slurm.run("sbatch", "--gres=gpu:3", "--wrap", "true", check=False)
    assert r.returncode == 1
    assert "Requested node configuration is not available" in r.stderr, r.stderr
