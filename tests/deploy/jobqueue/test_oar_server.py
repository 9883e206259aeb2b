"""The machine's OAR of these tests works: as the test user, from its home, script jobs
run with their #OAR directives, run side by side, are deleted, reach servers on the
host's 127.0.0.1, and bad submissions get OAR's own errors."""
import os
import pwd
import socket
import threading
import time

from taskcore.testing import wait_until


def write_script(oar, path, text):
    """An executable script owned by the test user (oarsub -S runs it from its path)."""
    path.write_text(text)
    pw = pwd.getpwnam(oar.user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o755)
    return path


def wait_final(oar, jobs, timeout=30):
    wait_until(lambda: all(oar.state(j) in ("Terminated", "Error") for j in jobs), timeout,
               f"jobs {jobs} to end")
    return [oar.state(j) for j in jobs]


def test_script_job_with_directives_writes_a_file(oar_clean, oar_dir):
    oar, d = oar_clean, oar_dir
    write_script(oar, d / "job.sh", (
        "#!/bin/bash\n"
        "#OAR -n tc-write\n"
        "#OAR -l /nodes=1/core=2,walltime=00:10:00\n"
        "#OAR -q default\n"
        "#OAR -p memcore>=1000\n"
        f"#OAR -O {d}/%jobid%.out\n"
        f"#OAR -E {d}/%jobid%.err\n"
        'echo "$OAR_JOB_ID $PWD $(sort -u $OAR_NODEFILE) $(wc -l < $OAR_NODEFILE)"'
        " > result.txt\n"
        "echo to-stdout; echo to-stderr >&2\n"))
    r = oar.run_as_user("oarsub", "-S", "./job.sh", cwd=d)
    last = r.stdout.splitlines()[-1]
    assert last.startswith("OAR_JOB_ID="), r.stdout
    job = last.split("=", 1)[1]
    assert wait_final(oar, [job]) == ["Terminated"]
    assert (d / "result.txt").read_text() == f"{job} {d} localhost 2\n"
    assert (d / f"{job}.out").read_text() == "to-stdout\n"
    assert (d / f"{job}.err").read_text() == "to-stderr\n"
    info = oar.info(job, full=True)
    assert (info["name"], info["queue"], info["owner"], info["walltime"], info["exit_code"],
            len(info["assigned_resources"]), info["stdout_file"], info["launchingDirectory"]
            ) == ("tc-write", "default", oar.user, 600, 0, 2, f"{d}/{job}.out", str(d))
    assert oar.jobs() == []  # plain oarstat lists only jobs not finished


def test_two_jobs_run_at_once(oar_clean, oar_dir):
    oar, d = oar_clean, oar_dir
    # Each job marks that it started, then waits for the other's mark: both succeed only
    # when they ran side by side.
    write_script(oar, d / "pair.sh", (
        "#!/bin/bash\n"
        'touch started.$1\n'
        "i=0\n"
        'while [ ! -e started.$2 ]; do\n'
        '  i=$((i + 1)); [ $i -gt 150 ] && exit 1; sleep 0.1\n'
        "done\n"))
    jobs = [oar.submit("-q", queue, "-l", "/nodes=1/core=1,walltime=00:05:00",
                       f"./pair.sh {a} {b}", cwd=d)
            for queue, a, b in (("default", "a", "b"), ("debug", "b", "a"))]
    assert wait_final(oar, jobs) == ["Terminated", "Terminated"]
    assert [oar.info(j)["queue"] for j in jobs] == ["default", "debug"]
    assert [oar.info(j, full=True)["exit_code"] for j in jobs] == [0, 0]


def test_oardel_ends_a_running_job(oar_clean, oar_dir):
    oar, d = oar_clean, oar_dir
    pidfile = d / "pid"
    job = oar.submit(f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 300",
                     cwd=d)
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
                         "the job to start"))
    assert oar.state(job) == "Running"
    t0 = time.monotonic()
    r = oar.run_as_user("oardel", job, cwd=d)
    assert r.stdout == (f"Deleting the job = {job} ...REGISTERED.\n"
                        f"The job(s) [ {job} ] will be deleted in the near future.\n")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"the job's process {pid}")
    assert wait_final(oar, [job], 10) == ["Error"]
    assert time.monotonic() - t0 < 10
    r = oar.run_as_user("oardel", job, cwd=d, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        6, f"Deleting the job = {job} ...ERROR.\n",
        f"Cannot frag {job} ; This job was already killed.\n")
    assert oar.jobs() == []


def test_bad_submissions_get_oars_errors(oar_clean, oar_dir):
    oar, d = oar_clean, oar_dir

    def oarsub(*args):
        return oar.run_as_user("oarsub", *args, cwd=d, check=False)

    r = oarsub("-q", "nosuch", "true")
    assert (r.returncode, r.stderr) == (248, "ERROR : The queue nosuch does not exist\n")
    assert "OAR_JOB_ID" not in r.stdout
    r = oarsub("-l", "/nosuch=1", "true")
    assert r.returncode == 8 and r.stdout.splitlines()[-1] == "OAR_JOB_ID=-5"
    assert r.stderr.startswith('Bad resource request (ERROR:  column "nosuch" does not exist')
    assert r.stderr.endswith("[ERROR] Oarsub failed, please verify your request syntax.\n")
    r = oarsub("-l", "/nodes=1/core=9", "true")  # 8 resources
    assert (r.returncode, r.stderr) == (
        8, "There are not enough resources for your request\n"
           "[ERROR] Oarsub failed, please verify your request syntax.\n")
    r = oarsub("-p", "nosuchprop=1", "true")
    assert r.returncode == 8 and 'column "nosuchprop" does not exist' in r.stderr
    r = oarsub("-S", "./nosuch.sh")
    assert r.returncode == 12 and "[ERROR] Cannot open the file ./nosuch.sh." in r.stderr
    # OAR's admission rules refuse root.
    r = oar.run("oarsub", "true", cwd=d, check=False, env={**os.environ, "PWD": str(d)})
    assert (r.returncode, r.stderr.strip()) == (
        254, "[ADMISSION RULE] root and oar users are not allowed to submit jobs.")
    r = oar.run_as_user("oardel", "999999999", cwd=d, check=False)
    assert (r.returncode, r.stderr) == (1, "Cannot frag 999999999 ; You are not the right user.\n")
    assert oar.jobs() == []


def test_job_environment_and_connection_to_the_hosts_loopback(oar_clean, oar_dir):
    oar, d = oar_clean, oar_dir
    received = []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(30)
        port = srv.getsockname()[1]

        def accept():
            conn, _ = srv.accept()
            with conn:
                received.append(conn.makefile().read())

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        # The submitter's environment does not reach the job (PYTHONPATH, FOO).
        job = oar.submit(
            f'echo "$OAR_JOB_ID|$PWD|$PATH|${{PYTHONPATH-unset}}|${{FOO-unset}}"'
            f" > /dev/tcp/127.0.0.1/{port}",
            cwd=d, env={"PYTHONPATH": str(d), "FOO": "bar"})
        t.join(30)
    assert wait_final(oar, [job]) == ["Terminated"]
    assert received == [f"{job}|{d}|/usr/lib/oar/oardodo:/usr/lib/oar/oardodo:"
                        "/usr/local/bin:/usr/bin:/bin:/usr/games|unset|unset\n"]
    # oarsub takes the job's directory from $PWD, not from its working directory.
    job = oar.submit("true", cwd=d, env={"PWD": str(oar.home)})
    assert oar.info(job)["launchingDirectory"] == str(oar.home)
    assert wait_final(oar, [job]) == ["Terminated"]
    for ext in ("stdout", "stderr"):
        os.unlink(oar.home / f"OAR.{job}.{ext}")
