"""The batch systems' parsers on the tools' real outputs (SLURM's are in test_system.py).

For SGE, OAR, PBS Pro, Torque, Moab, LSF, HTCondor and Flux: `parse_job_id` on the submit
command's output, `parse_status` on the status command's output (pending / running / done /
failed, failed states that linger in the queue, empty outputs), and `status_accepts` where a
status command fails the whole call for one id it forgot. Each sample is taken from, or
shaped exactly as, the tool's documentation or a project that parses its real output; the
source is named above it. Pure: nothing is run.
"""
import json

import pytest

from taskcore.deploy.jobqueue.flux import Flux
from taskcore.deploy.jobqueue.htcondor import HTCondor
from taskcore.deploy.jobqueue.lsf import LSF
from taskcore.deploy.jobqueue.oar import OAR
from taskcore.deploy.jobqueue.pbs import PBS, Moab, Torque
from taskcore.deploy.jobqueue.sge import SGE
from taskcore.deploy.jobqueue.system import JobState

P, R, D, F = JobState.pending, JobState.running, JobState.done, JobState.failed


def states(system, out):
    return {job_id: state for job_id, (state, _, _) in system.parse_status(out).items()}


# ---------------------------------------------------------------------------------------------
# SGE: qsub -terse, qstat -xml
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("3064076\n", "3064076"),            # qsub -terse: the id alone
    ("3064076.1-10:1\n", "3064076"),     # an array job: ID.first-last:step
    ("  42  \n", "42"),
])
def test_sge_parse_job_id(out, job_id):
    assert SGE().parse_job_id(out) == job_id


@pytest.mark.parametrize("out", ["", 'Your job 42 ("sleep") has been submitted\n',
                                 "Unable to run job: denied\n"])
def test_sge_parse_job_id_needs_terse_output(out):
    # submit_argv passes -terse; the verbose form is not read.
    assert SGE().submit_argv("/s.sh")[:2] == ["qsub", "-terse"]
    with pytest.raises(ValueError, match="qsub printed no job id"):
        SGE().parse_job_id(out)


# `qstat -xml`: running jobs under queue_info, pending ones (Eqw included) under the inner
# job_info. From kisielk/gorge qstat/qstat_test.go (a recorded Grid Engine 6.2 output).
SGE_QSTAT_XML = """\
<?xml version='1.0'?>
<job_info  xmlns:xsd="http://gridengine.sunsource.net/source/browse/*checkout*/gridengine/source/dist/util/resources/schemas/qstat/qstat.xsd?revision=1.11">
  <queue_info>
    <job_list state="running">
      <JB_job_number>3064076</JB_job_number>
      <JAT_prio>0.67712</JAT_prio>
      <JB_name>QRLOGIN</JB_name>
      <JB_owner>bob</JB_owner>
      <state>r</state>
      <JAT_start_time>2012-11-01T13:06:41</JAT_start_time>
      <queue_name>interactive.q@cluster</queue_name>
      <slots>1</slots>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>3050948</JB_job_number>
      <JAT_prio>0.70234</JAT_prio>
      <JB_name>Something</JB_name>
      <JB_owner>john</JB_owner>
      <state>Eqw</state>
      <JB_submission_time>2012-10-28T09:47:07</JB_submission_time>
      <queue_name></queue_name>
      <slots>1</slots>
    </job_list>
  </job_info>
</job_info>
"""

# `qstat -f -xml` (queues listed as Queue-List, jobs inside them): a recorded Son of Grid
# Engine 8.1 session (arc.liv.ac.uk qstat.xsd) kept as test data in a public repository,
# shortened to one queue.
SGE_QSTAT_F_XML = """\
<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <Queue-List>
      <name>all.q@ip-172-16-2-146.us-west-2.compute.internal</name>
      <qtype>BIP</qtype>
      <slots_used>1</slots_used>
      <slots_total>8</slots_total>
      <arch>lx-amd64</arch>
      <job_list state="running">
        <JB_job_number>2</JB_job_number>
        <JAT_prio>0.55500</JAT_prio>
        <JB_name>sleep</JB_name>
        <JB_owner>devinp</JB_owner>
        <state>r</state>
        <JAT_start_time>2019-07-15T19:27:55</JAT_start_time>
        <slots>1</slots>
      </job_list>
    </Queue-List>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>3</JB_job_number>
      <JAT_prio>0.00000</JAT_prio>
      <JB_name>sleep</JB_name>
      <JB_owner>devinp</JB_owner>
      <state>qw</state>
      <JB_submission_time>2019-07-15T19:27:55</JB_submission_time>
      <slots>1</slots>
    </job_list>
  </job_info>
</job_info>
"""

SGE_EMPTY_XML = """\
<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
  </queue_info>
  <job_info>
  </job_info>
</job_info>
"""


def sge_job(number, state, section="pending"):
    return (f'<?xml version="1.0"?><job_info><job_info><job_list state="{section}">'
            f"<JB_job_number>{number}</JB_job_number><state>{state}</state>"
            f"</job_list></job_info></job_info>")


def test_sge_parse_status():
    assert SGE().parse_status(SGE_QSTAT_XML) == {"3064076": (R, "r", None),
                                                 "3050948": (F, "Eqw", None)}
    assert states(SGE(), SGE_QSTAT_F_XML) == {"2": R, "3": P}


@pytest.mark.parametrize("out", ["", "\n", SGE_EMPTY_XML])
def test_sge_parse_status_without_jobs(out):
    assert SGE().parse_status(out) == {}


# The states of sge_status(5), "Job state" table (Debian gridengine-common 8.1):
# pending qw, Rq, hqw, hRwq; running r, hr, t, Rr, Rt; suspended s, ts, S, tS, T, tT,
# Rs, Rts, RS, RtS, RT, RtT; error Eqw, Ehqw, EhRqw; deleting dr, dt, dRr, dRt, ds, dS, dT,
# dRs, dRS, dRT ("same as the equivalent states without the d").
@pytest.mark.parametrize("native, state", [
    ("qw", P), ("Rq", P), ("hqw", P), ("hRwq", P),
    ("r", R), ("hr", R), ("t", R), ("Rr", R), ("Rt", R),
    ("s", R), ("ts", R), ("S", R), ("tS", R), ("tT", R), ("Rs", R), ("Rts", R), ("RS", R),
    ("RtS", R), ("RtT", R),
    ("Eqw", F), ("Ehqw", F), ("EhRqw", F),
    ("dr", R), ("dt", R), ("dRr", R), ("dRt", R), ("ds", R), ("dS", R), ("dT", R),
    ("dRs", R), ("dRS", R), ("dRT", R),
])
def test_sge_documented_states(native, state):
    assert SGE().parse_status(sge_job(7, native)) == {"7": (state, native, None)}


@pytest.mark.parametrize("native", ["T", "RT"])
def test_sge_threshold_suspended_states_are_running(native):
    assert states(SGE(), sge_job(7, native)) == {"7": R}


def test_sge_error_state_is_failed_and_lingers():
    # Eqw stays queued until deleted (qdel): the job is cancelled when seen there.
    (state, native, _), = SGE().parse_status(sge_job(7, "Eqw")).values()
    assert state is F and native in SGE().lingering_states
    assert "Ehqw" in SGE().lingering_states


def test_sge_every_error_state_lingers():
    (state, native, _), = SGE().parse_status(sge_job(7, "EhRqw")).values()
    assert state is F
    assert native in SGE().lingering_states


def test_sge_status_argv():
    assert SGE().status_argv(["1"])[:3] == ["qstat", "-xml", "-u"]


# ---------------------------------------------------------------------------------------------
# OAR: oarsub -S, oarstat -J
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    # oarsub(1) (oar-team/oar docs/source/user/commands/oarsub.rst): "...\nOAR_JOB_ID=702\n..."
    ("[ADMISSION RULE] Modify resource description with type constraints\n"
     "OAR_JOB_ID=702\n", "702"),
    ("OAR_JOB_ID=123456", "123456"),  # submitit's OAR tests
])
def test_oar_parse_job_id(out, job_id):
    assert OAR().parse_job_id(out) == job_id


def test_oar_parse_job_id_refuses_anything_else():
    with pytest.raises(ValueError, match="oarsub printed no job id"):
        OAR().parse_job_id("[ADMISSION RULE] Error: walltime too big\n")


# `oarstat -J`: one JSON object keyed by job id, each job with its "state" (submitit
# submitit/oar/test_oar.py: '{"12": {"state": "Running"}}'; the other fields as OAR 2.5's
# oarstat -f -J prints them). The states are OAR's (oar-team/oar, jobs.state).
OARSTAT_J = json.dumps({
    "4242": {"Job_Id": 4242, "name": "tc-job", "owner": "u", "state": "Running",
             "message": "R=16,W=1:0:0,J=B (Karma=0.000,quota_ok)", "queue": "default"},
    "4243": {"Job_Id": 4243, "name": "tc-job", "owner": "u", "state": "Waiting",
             "message": "", "queue": "default"},
    "4244": {"Job_Id": 4244, "state": "Hold", "message": ""},
    "4240": {"Job_Id": 4240, "state": "Terminated", "message": ""},
    "4241": {"Job_Id": 4241, "state": "Error",
             "message": "Cannot launch the job: the script does not exist"},
}, indent=2)


def test_oar_parse_status():
    seen = OAR().parse_status(OARSTAT_J)
    assert {k: v[0] for k, v in seen.items()} == {"4242": R, "4243": P, "4244": P,
                                                  "4240": D, "4241": F}
    assert seen["4241"] == (F, "Error", "Cannot launch the job: the script does not exist")
    assert seen["4243"] == (P, "Waiting", None)


@pytest.mark.parametrize("native, state", [
    ("Waiting", P), ("Hold", P), ("toLaunch", P), ("toAckReservation", P), ("Launching", P),
    ("Running", R), ("Suspended", R), ("Resuming", R), ("Finishing", R), ("toError", R),
    ("Terminated", D), ("Error", F),
])
def test_oar_states(native, state):
    assert states(OAR(), json.dumps({"1": {"state": native}})) == {"1": state}


@pytest.mark.parametrize("out", ["", "{}", "\n"])
def test_oar_parse_status_without_jobs(out):
    assert OAR().parse_status(out) == {}


# ---------------------------------------------------------------------------------------------
# PBS Pro: qsub, qstat -x -f -F json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("40.pbs\n", "40.pbs"),                      # buildtest docs: "JobID: 40.pbs"
    ("4499334.pbsserver\n", "4499334.pbsserver"),
    ("1234[].server\n", "1234[].server"),        # an array job
    ("77\n", "77"),
])
def test_pbs_parse_job_id(out, job_id):
    assert PBS().parse_job_id(out) == job_id


def test_pbs_parse_job_id_refuses_errors():
    with pytest.raises(ValueError, match="qsub printed no job id"):
        PBS().parse_job_id("qsub: Unknown queue\n")


# `qstat -x -f -F json`: the finished job is buildtesters/buildtest docs/batch_support.rst
# (PBS 19.0.0, "job_state": "F", "Exit_status": 0, numbers as JSON numbers); the others are
# the same record in the other states (an Exit_status of 271 is 256 + SIGKILL, PBS Pro's
# code for a job killed by a signal, e.g. at its walltime).
PBS_JOB_F = {
    "Job_Name": "pbs_sleep", "Job_Owner": "pbsuser@pbs",
    "resources_used": {"cpupercent": 0, "cput": "00:00:00", "mem": "5620kb", "ncpus": 1,
                       "vmem": "25632kb", "walltime": "00:00:10"},
    "job_state": "F", "queue": "workq", "server": "pbs",
    "Resource_List": {"ncpus": 1, "nodect": 1, "place": "scatter", "select": "1:ncpus=1",
                      "walltime": "00:02:00"},
    "comment": "Job run at Wed Mar 17 at 20:36 on (pbs:ncpus=1) and finished",
    "run_count": 1, "Exit_status": 0,
}


def pbs_json(**jobs):
    return json.dumps({"timestamp": 1616013438, "pbs_version": "19.0.0", "pbs_server": "pbs",
                       "Jobs": jobs}, indent=4)


PBS_QSTAT = pbs_json(**{
    "40.pbs": PBS_JOB_F,
    "41.pbs": {**PBS_JOB_F, "job_state": "F", "Exit_status": 271,
               "comment": "Job run at Wed Mar 17 at 20:40 on (pbs:ncpus=1) and failed"},
    "42.pbs": {k: v for k, v in PBS_JOB_F.items() if k not in ("Exit_status",)}
    | {"job_state": "R", "comment": "Job run at Wed Mar 17 at 20:41 on (pbs:ncpus=1)"},
    "43.pbs": {"Job_Name": "pbs_sleep", "job_state": "Q",
               "comment": "Not Running: Insufficient amount of resource: ncpus"},
    "44.pbs": {"Job_Name": "pbs_sleep", "job_state": "H"},
    "45.pbs": {"Job_Name": "pbs_sleep", "job_state": "E"},
})


def test_pbs_parse_status():
    seen = PBS().parse_status(PBS_QSTAT)
    assert seen["40.pbs"] == (D, "F", PBS_JOB_F["comment"])
    assert seen["41.pbs"][:2] == (F, "F")
    assert seen["42.pbs"][:2] == (R, "R")
    assert seen["43.pbs"] == (P, "Q", "Not Running: Insufficient amount of resource: ncpus")
    assert seen["44.pbs"][:2] == (P, "H")
    assert seen["45.pbs"][:2] == (R, "E")
    # Known by the id qsub printed and by its number alone.
    assert seen["40"] == seen["40.pbs"] and seen["43"] == seen["43.pbs"]


@pytest.mark.parametrize("letter, state", [
    # qstat(1B) of PBS Pro: job states.
    ("B", R), ("E", R), ("F", D), ("H", P), ("Q", P), ("R", R), ("S", R), ("T", P),
    ("U", P), ("W", P), ("X", D),
])
def test_pbs_states(letter, state):
    assert states(PBS(), pbs_json(**{"7.s": {"job_state": letter}}))["7.s"] is state


@pytest.mark.parametrize("out", ["", pbs_json(), json.dumps({"timestamp": 1, "Jobs": None})])
def test_pbs_parse_status_without_jobs(out):
    assert PBS().parse_status(out) == {}


@pytest.mark.parametrize("system", [PBS, Torque])
@pytest.mark.parametrize("returncode, err, accepted", [
    (0, "", True),
    # PBS Pro: "qstat: Unknown Job Id 41.pbs" for an id purged from the job history;
    # Torque: "qstat: Unknown Job Id Error 3685292.mgt.meerkat.mcri.edu.au" (ssadedin/bpipe
    # TorqueStatusMonitor.groovy). The other jobs are still printed: the call counts.
    (153, "qstat: Unknown Job Id 41.pbs\n", True),
    (153, "qstat: Unknown Job Id Error 3685292.mgt.meerkat.mcri.edu.au\n", True),
    (15010, "qstat: cannot connect to server pbs (errno=15010)\n", False),
    (2, "usage: qstat [-f] ...\n", False),
])
def test_pbs_and_torque_status_accepts_unknown_ids(system, returncode, err, accepted):
    assert system().status_accepts(returncode, "", err) is accepted


def test_pbs_status_argv_asks_for_history():
    assert PBS().status_argv(["40.pbs", "41.pbs"]) == ["qstat", "-x", "-f", "-F", "json",
                                                       "40.pbs", "41.pbs"]


# ---------------------------------------------------------------------------------------------
# Torque: qsub, qstat -x (XML)
# ---------------------------------------------------------------------------------------------

# `qstat -x ID`: "<?xml version="1.0"?>" then one <Data> document per job-id operand
# (adaptivecomputing/torque src/cmds/qstat.c display_statjob: printf of the declaration,
# then MXMLToXString of the "Data" element, once per operand). The job is from
# OSC/osc-machete test/test_torque_helper.rb (Torque 4, job_state Q), shortened.
TORQUE_Q = ("<Data><Job><Job_Id>16376372.opt-batch.osc.edu</Job_Id>"
            "<Job_Name>stage.pbs.sh</Job_Name><Job_Owner>efranz@websvcs06.osc.edu</Job_Owner>"
            "<job_state>Q</job_state><queue>serial</queue>"
            "<server>opt-batch.osc.edu:15001</server><Checkpoint>u</Checkpoint>"
            "<ctime>1386618379</ctime><Resource_List><nodect>1</nodect>"
            "<nodes>1:ppn=8</nodes><walltime>10:00:00</walltime></Resource_List>"
            "</Job></Data>")


def torque_job(job_id, state, exit_status=None, comment=None):
    extra = "" if exit_status is None else f"<exit_status>{exit_status}</exit_status>"
    extra += "" if comment is None else f"<comment>{comment}</comment>"
    return (f"<Data><Job><Job_Id>{job_id}</Job_Id><Job_Name>tc</Job_Name>"
            f"<job_state>{state}</job_state>{extra}</Job></Data>")


def torque_out(*documents):
    return "".join(f'<?xml version="1.0"?>\n{d}\n' for d in documents)


@pytest.mark.parametrize("out, job_id", [
    ("16376372.opt-batch.osc.edu\n", "16376372.opt-batch.osc.edu"),
    ("4761849\n", "4761849"),
])
def test_torque_parse_job_id(out, job_id):
    assert Torque().parse_job_id(out) == job_id


@pytest.mark.parametrize("document, state", [
    (TORQUE_Q, P),
    (torque_job("1.srv", "R"), R),
    (torque_job("1.srv", "E"), R),          # exiting after having run
    (torque_job("1.srv", "H"), P),
    (torque_job("1.srv", "W"), P),
    (torque_job("1.srv", "T"), P),
    (torque_job("1.srv", "S"), R),
    (torque_job("1.srv", "C", 0), D),
    (torque_job("1.srv", "C", 271), F),      # killed
    (torque_job("1.srv", "C", -11), F),      # JOB_EXEC_KILL_WALLTIME
])
def test_torque_parse_status_one_job(document, state):
    seen = Torque().parse_status(torque_out(document))
    (full,) = [k for k in seen if "." in k]
    assert seen[full][0] is state
    assert seen[full.split(".")[0]] == seen[full]


def test_torque_parse_status_keeps_the_comment():
    seen = Torque().parse_status(torque_out(torque_job(
        "5.srv", "Q", comment="job held, too many failed attempts to run")))
    assert seen["5.srv"] == (P, "Q", "job held, too many failed attempts to run")


@pytest.mark.parametrize("out", ["", "\n"])
def test_torque_parse_status_without_jobs(out):
    assert Torque().parse_status(out) == {}


def test_torque_parse_status_of_several_ids():
    out = torque_out(torque_job("1.srv", "R"), torque_job("2.srv", "Q"))
    assert states(Torque(), out) == {"1.srv": R, "1": R, "2.srv": P, "2": P}


def test_torque_status_argv():
    assert Torque().status_argv(["1.srv", "2.srv"]) == ["qstat", "-x", "1.srv", "2.srv"]


# ---------------------------------------------------------------------------------------------
# Moab: msub, showq --xml
# ---------------------------------------------------------------------------------------------

# MatterMiners/tardis tests/adapters_t/sites_t/test_moab.py (recorded from a Moab/Torque
# site): msub prints the id after an empty line; showq --xml lists the active, eligible
# and blocked queues.
MOAB_MSUB = "\n4761849\n"
MOAB_SHOWQ = """
<Data>
 <Object>queue</Object>
 <cluster LocalActiveNodes="68" LocalAllocProcs="1360" LocalConfigNodes="1037" LocalIdleNodes="7" LocalIdleProcs="7192" LocalUpNodes="922" LocalUpProcs="18432" RemoteActiveNodes="0" RemoteAllocProcs="0" RemoteConfigNodes="0" RemoteIdleNodes="0" RemoteIdleProcs="0" RemoteUpNodes="0" RemoteUpProcs="0" time="1553503935"/>
 <queue count="1" option="active">
  <job AWDuration="140875" Account="bw16g013" DRMJID="5096381.mg1.nemo.privat" EEDuration="44150" GJID="5096381" Group="ka_etp" JobID="5096381" JobName="startVM.py" MasterHost="n4545.nemo.privat" PAL="torque" ReqAWDuration="172800" ReqProcs="20" RsvStartTime="1553362801" RunPriority="-43322" StartPriority="-43322" StartTime="1553362801" StatPSDed="2813667.000000" StatPSUtl="140642.124800" State="Running" SubmissionTime="1553318572" SuspendDuration="0" User="ka_qb1555"/>
 </queue>
 <queue count="1" option="eligible">
  <job Account="bw16g013" EEDuration="72423" GJID="4761849" Group="ka_etp" JobID="4761849" JobName="startVM.py" ReqAWDuration="172800" ReqProcs="20" StartPriority="-38601" StartTime="0" State="Idle" SubmissionTime="1553431244" SuspendDuration="0" User="ka_qb1555"/>
 </queue>
 <queue count="1" option="blocked">
  <job Account="bw16g013" BlockReason="IdlePolicy" GJID="4761850" Group="ka_etp" JobID="4761850" JobName="startVM.py" ReqAWDuration="172800" ReqProcs="20" State="Deferred" SubmissionTime="1553431244" User="ka_qb1555"/>
 </queue>
</Data>
"""


def test_moab_parse_job_id():
    assert Moab().parse_job_id(MOAB_MSUB) == "4761849"


def test_moab_parse_status():
    seen = Moab().parse_status(MOAB_SHOWQ)
    assert seen == {"5096381": (R, "Running", None), "4761849": (P, "Idle", None),
                    "4761850": (P, "Deferred", "IdlePolicy")}
    # The id msub printed is the key showq uses.
    assert Moab().parse_job_id(MOAB_MSUB) in seen


@pytest.mark.parametrize("native, state", [
    # Moab job states (tardis' STATE_TRANSLATIONS, Moab's checkjob/showq docs).
    ("Idle", P), ("Hold", P), ("UserHold", P), ("SystemHold", P), ("BatchHold", P),
    ("Deferred", P), ("Blocked", P), ("Staging", P), ("Starting", P), ("NotQueued", P),
    ("Migrated", P), ("Running", R), ("Suspended", R), ("Canceling", R), ("Completed", D),
    ("Removed", F), ("Vacated", F),
])
def test_moab_states(native, state):
    out = f'<Data><queue option="active"><job JobID="9" State="{native}"/></queue></Data>'
    assert states(Moab(), out) == {"9": state}


@pytest.mark.parametrize("out", ["", '<Data><Object>queue</Object><queue count="0" '
                                     'option="active"/><queue count="0" option="eligible"/>'
                                     '<queue count="0" option="blocked"/></Data>'])
def test_moab_parse_status_without_jobs(out):
    assert Moab().parse_status(out) == {}


def test_moab_status_accepts_only_success():
    assert Moab().status_accepts(0, "", "") is True
    assert Moab().status_accepts(1, "", "ERROR:  client timed out after 30 seconds") is False


def test_moab_prefixed_ids_match_showq():
    job_id = Moab().parse_job_id("\nMoab.123\n")
    out = '<Data><queue option="eligible"><job JobID="Moab.123" State="Idle"/></queue></Data>'
    assert job_id in Moab().parse_status(out)


# ---------------------------------------------------------------------------------------------
# LSF: bsub, bjobs -o "jobid stat exit_reason" -json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("Job <12345678> is submitted to default queue <normal>.\n", "12345678"),
    # "Cannot connect to LSF. Please wait ..." lines come first at a busy site
    # (the orchestrator LSF client tests).
    ("Cannot connect to LSF. Please wait ...\nJob <12345678> is submitted to queue "
     "<short>.\n", "12345678"),
])
def test_lsf_parse_job_id(out, job_id):
    assert LSF().parse_job_id(out) == job_id


def test_lsf_parse_job_id_refuses_errors():
    with pytest.raises(ValueError, match="bsub printed no job id"):
        LSF().parse_job_id("Job not submitted: project name required.\n")


# `bjobs -o "jobid stat exit_reason" -json IDS`: {"COMMAND", "JOBS", "RECORDS": [...]}, all
# values strings (TheRoddyWMS BatchEuphoria LSFJobManagerSpec.groovy, balsam's LSF scheduler
# comment: "JOBID":"806290","STAT":"RUN"; EXIT_REASON "TERM_OWNER: job killed by owner" from
# an LSF client's tests). An id bjobs no longer knows is a record with an ERROR instead of
# the fields (IBM Spectrum LSF bjobs -json: "Job <N> is not found").
LSF_BJOBS = """\
{
  "COMMAND":"bjobs",
  "JOBS":6,
  "RECORDS":[
    {
      "JOBID":"806290",
      "STAT":"RUN",
      "EXIT_REASON":""
    },
    {
      "JOBID":"806291",
      "STAT":"PEND",
      "EXIT_REASON":""
    },
    {
      "JOBID":"22005",
      "STAT":"DONE",
      "EXIT_REASON":""
    },
    {
      "JOBID":"487641",
      "STAT":"EXIT",
      "EXIT_REASON":"TERM_OWNER: job killed by owner"
    },
    {
      "JOBID":"58652",
      "STAT":"PSUSP",
      "EXIT_REASON":""
    },
    {
      "JOBID":"99999",
      "ERROR":"Job <99999> is not found"
    }
  ]
}
"""


def test_lsf_parse_status():
    assert LSF().parse_status(LSF_BJOBS) == {
        "806290": (R, "RUN", None), "806291": (P, "PEND", None), "22005": (D, "DONE", None),
        "487641": (F, "EXIT", "TERM_OWNER: job killed by owner"),
        "58652": (P, "PSUSP", None)}


def test_lsf_not_found_record_without_jobid_is_skipped():
    out = json.dumps({"COMMAND": "bjobs", "JOBS": 1,
                      "RECORDS": [{"ERROR": "Job <99999> is not found"}]})
    assert LSF().parse_status(out) == {}


@pytest.mark.parametrize("native, state", [
    ("PEND", P), ("PSUSP", P), ("WAIT", P), ("PROV", P), ("RUN", R), ("USUSP", R),
    ("SSUSP", R), ("UNKWN", R), ("ZOMBI", R), ("DONE", D), ("EXIT", F),
])
def test_lsf_states(native, state):
    out = json.dumps({"COMMAND": "bjobs", "JOBS": 1,
                      "RECORDS": [{"JOBID": "7", "STAT": native, "EXIT_REASON": ""}]})
    assert states(LSF(), out) == {"7": state}


@pytest.mark.parametrize("out", ["", '{"COMMAND":"bjobs","JOBS":0,"RECORDS":[]}'])
def test_lsf_parse_status_without_jobs(out):
    assert LSF().parse_status(out) == {}


@pytest.mark.parametrize("returncode, out, err, accepted", [
    (0, LSF_BJOBS, "", True),
    # One id unknown: bjobs exits 255, the JSON still has the others.
    (255, LSF_BJOBS, "", True),
    (255, '  {"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"ERROR":"Job <9> is not found"}]}',
     "", True),
    (255, "", "LSF is down. Please wait ...\n", False),
    (255, "Job <9> is not found\n", "", False),
])
def test_lsf_status_accepts(returncode, out, err, accepted):
    assert LSF().status_accepts(returncode, out, err) is accepted


def test_lsf_status_argv():
    assert LSF().status_argv(["1", "2"]) == ["bjobs", "-a", "-o", "jobid stat exit_reason",
                                             "-json", "1", "2"]


# ---------------------------------------------------------------------------------------------
# HTCondor: condor_submit, condor_q -json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("Submitting job(s).\n1 job(s) submitted to cluster 5184659.\n", "5184659"),
    ("Submitting job(s)...\n3 job(s) submitted to cluster 12.\n", "12"),
])
def test_htcondor_parse_job_id(out, job_id):
    assert HTCondor().parse_job_id(out) == job_id


def test_htcondor_parse_job_id_refuses_errors():
    with pytest.raises(ValueError, match="condor_submit printed no job id"):
        HTCondor().parse_job_id("ERROR: Failed to connect to local queue manager\n")


# `condor_q -attributes ClusterId,ProcId,JobStatus -json`: an array of ads, printed with
# "\n,\n" between them (paulgessinger/kong tests/driver/test_htcondor_driver.py, recorded
# output); HoldReason as on a held job (condor_q -hold).
CONDOR_Q = """\
[
{
  "ClusterId": 5184660,
  "JobStatus": 1,
  "ProcId": 0
}
,
{
  "ClusterId": 5184661,
  "JobStatus": 2,
  "ProcId": 0
}
,
{
  "ClusterId": 5184662,
  "JobStatus": 3,
  "ProcId": 0
}
,
{
  "ClusterId": 5184663,
  "JobStatus": 4,
  "ProcId": 0
}
,
{
  "ClusterId": 5184664,
  "HoldReason": "Error from slot1@node7: Job has gone over memory limit of 4096 megabytes.",
  "JobStatus": 5,
  "ProcId": 0
}
,
{
  "ClusterId": 5184665,
  "JobStatus": 6,
  "ProcId": 0
}
,
{
  "ClusterId": 5184666,
  "JobStatus": 7,
  "ProcId": 0
}
]
"""


def test_htcondor_parse_status():
    assert HTCondor().parse_status(CONDOR_Q) == {
        "5184660": (P, "Idle", None), "5184661": (R, "Running", None),
        "5184662": (F, "Removed", None), "5184663": (D, "Completed", None),
        "5184664": (F, "Held", "Error from slot1@node7: Job has gone over memory limit of "
                               "4096 megabytes."),
        "5184665": (R, "TransferringOutput", None), "5184666": (R, "Suspended", None)}


def test_htcondor_held_is_failed_and_lingers():
    # A held job stays in the queue until condor_rm: it is removed when seen held.
    state, native, _ = HTCondor().parse_status(CONDOR_Q)["5184664"]
    assert state is F and native in HTCondor().lingering_states
    assert "Removed" not in HTCondor().lingering_states  # leaves the queue by itself


def test_htcondor_unknown_status_is_failed():
    assert HTCondor().parse_status('[{"ClusterId": 1, "ProcId": 0, "JobStatus": 42}]') == \
        {"1": (F, "Unknown", None)}


@pytest.mark.parametrize("out", ["", "\n", "[]"])
def test_htcondor_parse_status_without_jobs(out):
    # condor_q -json prints nothing at all when no job matches.
    assert HTCondor().parse_status(out) == {}


def test_htcondor_status_argv():
    assert HTCondor().status_argv(["12", "13"]) == [
        "condor_q", "-json", "-attributes", "ClusterId,ProcId,JobStatus,HoldReason", "12", "13"]


# ---------------------------------------------------------------------------------------------
# Flux: flux batch, flux jobs --format="{id.f58} {state} {result}"
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, job_id", [
    ("ƒ2Bx3YkZMd\n", "ƒ2Bx3YkZMd"),     # F58, UTF-8 locale
    ("f2Bx3YkZMd\n", "f2Bx3YkZMd"),     # F58, ASCII locale
    ("12345678\n", "12345678"),          # decimal
    ("flux-batch: warning: foo\nƒ4VBcxNdVd\n", "ƒ4VBcxNdVd"),
])
def test_flux_parse_job_id(out, job_id):
    assert Flux().parse_job_id(out) == job_id


@pytest.mark.parametrize("out", ["", "flux-batch: ERROR: unknown queue\n", "ƒ0OIl\n"])
def test_flux_parse_job_id_refuses_anything_else(out):
    with pytest.raises(ValueError, match="flux batch printed no job id"):
        Flux().parse_job_id(out)


# `flux jobs -a -n --format="{id.f58} {state} {result}"`: state is one of DEPEND, PRIORITY,
# SCHED, RUN, CLEANUP, INACTIVE; result is COMPLETED, FAILED, CANCELED or TIMEOUT for an
# inactive job and the empty string otherwise (flux-core doc/man1/flux-jobs.rst, OUTPUT
# FORMAT: "state", "result"), so an active job's line ends with a space.
FLUX_JOBS = """\
ƒ4VBcxNdVd DEPEND 
ƒ4VBcxNdVe PRIORITY 
ƒ4VBcxNdVf SCHED 
ƒ4VBcxNdVg RUN 
ƒ4VBcxNdVh CLEANUP 
ƒ4VBcxNdVi INACTIVE COMPLETED
ƒ4VBcxNdVj INACTIVE FAILED
ƒ4VBcxNdVk INACTIVE CANCELED
ƒ4VBcxNdVm INACTIVE TIMEOUT
"""


def test_flux_parse_status():
    assert Flux().parse_status(FLUX_JOBS) == {
        "ƒ4VBcxNdVd": (P, "DEPEND", None), "ƒ4VBcxNdVe": (P, "PRIORITY", None),
        "ƒ4VBcxNdVf": (P, "SCHED", None), "ƒ4VBcxNdVg": (R, "RUN", None),
        "ƒ4VBcxNdVh": (R, "CLEANUP", None), "ƒ4VBcxNdVi": (D, "COMPLETED", None),
        "ƒ4VBcxNdVj": (F, "FAILED", None), "ƒ4VBcxNdVk": (F, "CANCELED", None),
        "ƒ4VBcxNdVm": (F, "TIMEOUT", None)}


def test_flux_ids_are_compared_as_printed():
    job_id = Flux().parse_job_id("ƒ4VBcxNdVg\n")
    assert job_id in Flux().parse_status(FLUX_JOBS)


@pytest.mark.parametrize("out", ["", "\n", "   \n"])
def test_flux_parse_status_without_jobs(out):
    assert Flux().parse_status(out) == {}


def test_flux_status_argv():
    assert Flux().status_argv(["ƒ4VBcxNdVd"]) == [
        "flux", "jobs", "-a", "-n", "--format={id.f58} {state} {result}",
        "ƒ4VBcxNdVd"]
