"""Fields of the custom resources that no bundled schema knows: the LeaderWorkerSet's Ray
group, the ServiceMonitor's scrape target, the KEDA ScaledObject's metric and target."""

from __future__ import annotations

import pytest
from deploy_render import find


@pytest.fixture
def lws(rendered):
    (obj,) = find(rendered("multi-node"), "LeaderWorkerSet")
    return obj


def test_leaderworkerset_leader_runs_ray_head_and_vllm_with_ray_backend(lws):
    lwt = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
    assert leader["command"] == ["pbs-ray-node", "leader"]
    assert "--distributed-executor-backend=ray" in leader["args"]
    # Workers start with the leader: with LeaderReady the leader would wait forever for them.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lwt["size"] >= 2


def test_leaderworkerset_workers_join_and_share_the_leader_image_and_cache(lws):
    lwt = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    assert worker["command"] == ["pbs-ray-node", "worker"] and "args" not in worker
    assert worker["image"] == leader["image"]
    leader_env = {e["name"]: e for e in leader["env"]}
    for e in worker["env"]:  # workers load weights: same cache location and token
        assert leader_env[e["name"]] == e, e["name"]
    assert {"HF_HOME", "HF_TOKEN"} <= {e["name"] for e in worker["env"]}
    assert worker["volumeMounts"] == leader["volumeMounts"]
    assert lwt["workerTemplate"]["spec"]["volumes"] == lwt["leaderTemplate"]["spec"]["volumes"]


@pytest.mark.parametrize("variant", ["tp4+all", "multi-node+servicemonitor+pdb"])
def test_servicemonitor_scrapes_the_service_metrics_port(rendered, variant):
    objs = rendered(variant)
    (monitor,) = find(objs, "ServiceMonitor")
    (service,) = find(objs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("variant", ["single-gpu+all", "tp4+all"])
def test_scaledobject_scales_the_deployment_on_waiting_requests(rendered, variant):
    objs = rendered(variant)
    (scaled,) = find(objs, "ScaledObject")
    (deployment,) = find(objs, "Deployment")
    (service,) = find(objs, "Service")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "vllm:num_requests_waiting" in query
    # Prometheus Operator labels scraped series with the Service's name.
    assert f'service="{service["metadata"]["name"]}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0
