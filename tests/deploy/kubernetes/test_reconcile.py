"""The reconciler's decisions (reconcile.plan and the adaptive rules), driven with dicts
alone: no API server, no processes."""
from taskcore.deploy.kubernetes import resources as r
from taskcore.deploy.kubernetes.reconcile import (AdaptiveCounter, Create, Delete, DeleteCluster,
                                                  Observed, Retire, SetStatus,
                                                  dashboard_address_of, plan, pod_problem,
                                                  split_target)


def cluster(n=2, groups=None, **status):
    c = r.make_cluster_spec("c1", n_workers=n)
    c["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    if groups is not None:
        c["spec"]["workerGroups"] = groups
    if status:
        c["status"] = status
    return c


def service(ip="10.0.0.7"):
    svc = r.scheduler_service(cluster())
    svc["spec"]["clusterIP"] = ip
    return svc


def dep():
    return r.scheduler_deployment(cluster())


TEMPLATE = r.template_hash(r.make_worker_spec()["spec"])   # of every group made here


def pod(name, group="default", phase="Running", ready=True, component="worker", **extra):
    p = {"metadata": {"name": name, "labels": r.cluster_labels("c1", component,
                                                                 group if component == "worker"
                                                                 else None),
                      "annotations": {r.ANNOTATION_TEMPLATE_HASH: TEMPLATE}},
         "status": {"phase": phase, "conditions": [
             {"type": "Ready", "status": "True" if ready else "False"}]}}
    meta = extra.pop("metadata", {})
    p["metadata"]["annotations"].update(meta.pop("annotations", {}))
    p["metadata"].update(meta)
    p["status"].update(extra)
    return p


def kinds(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def test_a_new_cluster_gets_its_scheduler_first():
    actions = plan(Observed(cluster()))
    created = [a.kind for a in kinds(actions, Create)]
    assert created == ["Service", "Deployment"]       # no workers before the Service has an IP
    (st,) = kinds(actions, SetStatus)
    assert st.status["phase"] == "Pending"
    dep = kinds(actions, Create)[1].manifest
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert dep["spec"]["strategy"]["type"] == "Recreate"


def test_workers_are_made_with_the_service_address():
    actions = plan(Observed(cluster(n=3), deployment=dep(), service=service()))
    pods = [a.manifest for a in kinds(actions, Create)]
    assert len(pods) == 3 and {p["kind"] for p in pods} == {"Pod"}
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["TASKCORE_SCHEDULER_ADDRESS"] == "tcp://10.0.0.7:8786"
    assert pods[0]["metadata"]["labels"][r.LABEL_GROUP] == "default"


def test_a_cluster_with_tls_credentials_is_addressed_over_tls():
    c = cluster(n=1)
    c["spec"]["security"] = r.security_spec("c1-credentials-x", tls=True, token=True)
    obs = Observed(c, deployment=dep(), service=service(),
                   pods=[pod("s", component="scheduler")])
    actions = plan(obs)
    (worker,) = [a.manifest for a in kinds(actions, Create)]
    env = {e["name"]: e for e in worker["spec"]["containers"][0]["env"]}
    assert env["TASKCORE_SCHEDULER_ADDRESS"]["value"] == "tls://10.0.0.7:8786"
    assert env["TASKCORE_TOKEN"] == {"name": "TASKCORE_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "c1-credentials-x", "key": "token"}}}
    (st,) = kinds(actions, SetStatus)
    assert st.status["schedulerAddress"] == "tls://10.0.0.7:8786"
    # A token alone: tcp://, the token from the Secret, no files mounted.
    c["spec"]["security"] = r.security_spec("c1-credentials-x", tls=False, token=True)
    (worker,) = [a.manifest for a in kinds(plan(obs), Create)]
    assert "volumes" not in worker["spec"]
    env = {e["name"]: e for e in worker["spec"]["containers"][0]["env"]}
    assert env["TASKCORE_SCHEDULER_ADDRESS"]["value"] == "tcp://10.0.0.7:8786"
    assert "secretKeyRef" in env["TASKCORE_TOKEN"]["valueFrom"]


def test_status_reports_running_and_is_not_rewritten_when_unchanged():
    obs = Observed(cluster(n=1), deployment=dep(), service=service(),
                   pods=[pod("s", component="scheduler"), pod("w1")], controller="me")
    (st,) = kinds(plan(obs), SetStatus)
    assert st.status["phase"] == "Running"
    assert st.status["schedulerAddress"] == "tcp://10.0.0.7:8786"
    assert st.status["dashboardAddress"] == "10.0.0.7:8787"
    assert st.status["groups"] == {"default": {"replicas": 1, "pods": 1, "ready": 1}}
    obs.cluster["status"] = st.status
    assert plan(obs) == []


def test_surplus_goes_cheapest_first_and_data_holders_are_retired():
    pods = [pod("pending", phase="Pending", ready=False), pod("busy"), pod("idle-big"),
            pod("idle-small"), pod("unknown")]
    known = {"busy": {"processing": 3, "nbytes": 0}, "idle-big": {"processing": 0, "nbytes": 900},
             "idle-small": {"processing": 0, "nbytes": 10}}
    base = dict(deployment=dep(), service=service(), scheduler_workers=known)
    actions = plan(Observed(cluster(n=4), pods=pods, **base))
    assert [a.name for a in kinds(actions, Delete)] == ["pending"]
    actions = plan(Observed(cluster(n=1), pods=pods, **base))
    assert sorted(a.name for a in kinds(actions, Delete)) == ["pending", "unknown"]
    (ret,) = kinds(actions, Retire)
    assert ret.pods == ("idle-small", "idle-big")      # busy stays: only 4 go
    # Scheduler unreachable: running pods are retired (not deleted), nothing judged "empty".
    actions = plan(Observed(cluster(n=3), pods=pods[1:], deployment=dep(), service=service()))
    assert not kinds(actions, Delete)
    assert len(kinds(actions, Retire)[0].pods) == 1


def test_ended_pods_are_deleted_and_replaced():
    crashed = pod("w1", phase="Failed", ready=False, reason="Evicted", message="low memory")
    done = pod("w2", phase="Succeeded", ready=False)
    actions = plan(Observed(cluster(n=2), pods=[crashed, done], deployment=dep(),
                            service=service()))
    deleted = {a.name: a.reason for a in kinds(actions, Delete)}
    assert set(deleted) == {"w1", "w2"}
    assert "Evicted" in deleted["w1"] and "low memory" in deleted["w1"]
    assert len(kinds(actions, Create)) == 2


def test_retiring_and_terminating_pods_are_neither_counted_nor_replaced_twice():
    leaving = pod("w1", metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})
    obs = Observed(cluster(n=1), pods=[leaving, pod("w2"), pod("w3")], deployment=dep(),
                   service=service(), retiring=frozenset({"w3"}))
    actions = plan(obs)
    assert not kinds(actions, Create) and not kinds(actions, Retire)
    assert not kinds(actions, Delete)


def test_groups_are_planned_independently_and_removed_groups_retire():
    g = [r.make_worker_spec(name="a", n_workers=1), r.make_worker_spec(name="b", n_workers=2)]
    pods = [pod("a1", "a"), pod("b1", "b"), pod("b2", "b"), pod("b3", "b"), pod("old1", "old")]
    known = {p["metadata"]["name"]: {"processing": 0, "nbytes": 0} for p in pods}
    actions = plan(Observed(cluster(groups=g), pods=pods, deployment=dep(), service=service(),
                            scheduler_workers=known))
    retired = {a.group: a.pods for a in kinds(actions, Retire)}
    assert set(retired) == {"b", "old"}
    assert len(retired["b"]) == 1 and retired["old"] == ("old1",)
    assert not kinds(actions, Create)


def test_idle_timeout_deletes_the_cluster():
    c = cluster()
    c["spec"]["idleTimeout"] = 30.0
    assert not kinds(plan(Observed(c, deployment=dep(), service=service(), idle_for=10)),
                     DeleteCluster)
    (d,) = plan(Observed(c, deployment=dep(), service=service(), idle_for=31))
    assert isinstance(d, DeleteCluster) and "idle" in d.reason


def test_a_bad_spec_fails_the_cluster_with_a_message():
    c = cluster()
    c["spec"]["workerGroups"][0]["spec"]["containers"][0]["name"] = "oops"
    (st,) = plan(Observed(c))
    assert st.status["phase"] == "Failed" and "named 'worker'" in st.status["message"]


def test_deleted_clusters_are_left_to_the_garbage_collector():
    c = cluster()
    c["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert plan(Observed(c, pods=[pod("w1")])) == []


def test_pod_problems():
    crash = pod("s", component="scheduler", phase="Running", ready=False, containerStatuses=[{
        "name": "scheduler", "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}])
    msg = pod_problem(crash)
    assert "CrashLoopBackOff" in msg and "exit code 2" in msg and "restarts: 3" in msg
    pull = pod("w", phase="Pending", ready=False, containerStatuses=[{
        "name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                "message": 'Back-off pulling image "x"'}}}])
    assert "ImagePullBackOff" in pod_problem(pull) and '"x"' in pod_problem(pull)
    assert pod_problem(pod("ok")) is None
    waiting = pod("w", phase="Pending", ready=False, containerStatuses=[{
        "name": "worker", "state": {"waiting": {"reason": "ContainerCreating"}}}])
    assert pod_problem(waiting) is None
    # The status message carries problems for `kubectl get` and the client.
    actions = plan(Observed(cluster(n=1), deployment=dep(), service=service(), pods=[crash]))
    assert "CrashLoopBackOff" in kinds(actions, SetStatus)[0].status["message"]


def test_split_target_fills_adaptive_groups_in_order_within_bounds():
    fixed = r.make_worker_spec(name="fixed", n_workers=2)
    a = dict(r.make_worker_spec(name="a"), adapt={"minimum": 1, "maximum": 3})
    b = dict(r.make_worker_spec(name="b"), adapt={"minimum": 0, "maximum": 4})
    groups = [fixed, a, b]
    assert split_target(groups, 0) == {"a": 1, "b": 0}
    assert split_target(groups, 4) == {"a": 2, "b": 0}
    assert split_target(groups, 7) == {"a": 3, "b": 2}
    assert split_target(groups, 100) == {"a": 3, "b": 4}
    # A function of the target only: the same answer whatever the groups' sizes now.
    a["replicas"], b["replicas"] = 3, 4
    assert split_target(groups, 7) == {"a": 3, "b": 2}
    unbounded = dict(r.make_worker_spec(name="u"), adapt={"minimum": 0})
    assert split_target([unbounded], 9) == {"u": 9}


def test_adaptive_counter_goes_up_at_once_and_down_after_wait_count():
    c = AdaptiveCounter()
    assert c.step(5, 2, wait_count=3) == 5
    assert c.step(2, 5, 3) is None
    assert c.step(1, 5, 3) is None
    assert c.step(3, 5, 3) == 3           # the largest ask of the window
    assert c.step(1, 3, 3) is None
    assert c.step(3, 3, 3) is None        # back to plan: the count starts over
    assert c.step(1, 3, 3) is None
    assert c.step(1, 3, 3) is None
    assert c.step(1, 3, 3) == 1


def test_pods_named_in_scale_down_go_first_and_are_still_retired():
    picked = pod("busy-picked", metadata={"annotations": {r.ANNOTATION_RETIRE: "requested"}})
    pods = [pod("idle"), picked]
    known = {"idle": {"processing": 0, "nbytes": 0}, "busy-picked": {"processing": 5,
                                                                     "nbytes": 10**6}}
    actions = plan(Observed(cluster(n=1), pods=pods, deployment=dep(), service=service(),
                            scheduler_workers=known))
    assert not kinds(actions, Delete)
    assert [a.pods for a in kinds(actions, Retire)] == [("busy-picked",)]


def test_a_changed_pod_spec_rolls_one_pod_at_a_time():
    c = cluster(n=2)
    c["spec"]["workerGroups"][0]["spec"]["containers"][0]["env"] = [{"name": "X", "value": "2"}]
    old = [pod("w1"), pod("w2")]
    known = {"w1": {"processing": 0, "nbytes": 0}, "w2": {"processing": 0, "nbytes": 5}}
    base = dict(deployment=dep(), service=service(), scheduler_workers=known)
    (new,) = kinds(plan(Observed(c, pods=old, **base)), Create)     # one new pod first
    h = new.manifest["metadata"]["annotations"][r.ANNOTATION_TEMPLATE_HASH]
    assert h != TEMPLATE
    assert not kinds(plan(Observed(c, pods=old + [pod("w3", ready=False)], **base)), Create)
    fresh = pod("w3", metadata={"annotations": {r.ANNOTATION_TEMPLATE_HASH: h}})
    known["w3"] = {"processing": 0, "nbytes": 0}
    actions = plan(Observed(c, pods=old + [fresh], **base))
    assert [a.pods for a in kinds(actions, Retire)] == [("w1",)]     # an old one goes
    # Not while the roll's new pod is still starting.
    assert not kinds(plan(Observed(c, pods=old[1:] + [fresh, pod("w4", ready=False, metadata={
        "annotations": {r.ANNOTATION_TEMPLATE_HASH: h}})], **base)), Create)


def test_a_changed_scheduler_spec_replaces_its_deployment():
    c = cluster()
    c["spec"]["scheduler"]["spec"]["containers"][0]["args"].append("--idle-timeout=1h")
    (d,) = kinds(plan(Observed(c, deployment=dep(), service=service())), Delete)
    assert d.kind == "Deployment" and "spec changed" in d.reason
    assert not kinds(plan(Observed(cluster(), deployment=dep(), service=service())), Delete)


def test_dashboard_address_is_the_services_dashboard_port():
    assert dashboard_address_of(service()) == "10.0.0.7:8787"
    svc = service()
    svc["spec"]["ports"] = [p for p in svc["spec"]["ports"] if p["name"] != "dashboard"]
    assert dashboard_address_of(svc) is None                 # a custom spec without one
    assert dashboard_address_of(service(ip="None")) is None  # headless
    assert dashboard_address_of(service(ip="fd00::7")) == "[fd00::7]:8787"
