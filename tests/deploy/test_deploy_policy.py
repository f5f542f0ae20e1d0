"""Policies every rendered variant must keep: resource limits, /health probes, shm in
memory, the pbs backend, pinned images, no privilege, no plain-text secrets, references
that resolve, a PBS config the plugin accepts, GPUs that match the parallelism."""

from __future__ import annotations

import json
import re

import pytest
from deploy_render import (
    VARIANTS,
    containers,
    find,
    load_pyproject,
    parallel_size,
    pod_templates,
    role,
)

from pbs_vllm.config import ENV_PREFIX, PBSConfig

# A 70B checkpoint (~140 GB) must have time to download and load before liveness applies.
MIN_STARTUP_BUDGET_S = 3600
SERVER_PORT = 8000
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.IGNORECASE)
# Hugging Face, OpenAI-style and AWS access keys.
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}")
IMAGE_UID = 2000  # the `vllm` user of deploy/Dockerfile

variants = pytest.mark.parametrize("variant", VARIANTS)


def _budget_s(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@variants
def test_every_container_has_cpu_memory_gpu_limits(rendered, variant):
    for where, _, c in containers(rendered(variant)):
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        assert {"cpu", "memory", "nvidia.com/gpu"} <= limits.keys(), f"{where}: limits {limits}"
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: no GPU"
        # Extended resources must request exactly what they limit.
        assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], f"{where}: {requests}"


@variants
def test_servers_probe_health_and_workers_probe_ray(rendered, variant):
    roles = []
    for where, _, c in containers(rendered(variant)):
        roles.append(role(c))
        if role(c) == "server":
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[kind]["httpGet"]
                assert get["path"] == "/health", f"{where}.{kind}: {get}"
                assert ports.get(get["port"], get["port"]) == SERVER_PORT, f"{where}.{kind}: {get}"
            assert _budget_s(c["startupProbe"]) >= MIN_STARTUP_BUDGET_S, where
        else:
            assert role(c) == "ray-worker", f"{where}: command {c.get('command')} is neither"
            for kind in ("startupProbe", "livenessProbe"):
                assert c[kind]["exec"]["command"] == ["pbs-ray-node", "check"], where
            assert _budget_s(c["startupProbe"]) >= MIN_STARTUP_BUDGET_S, where
    assert roles.count("server") == 1, f"{variant}: one API server pod template, got {roles}"


@variants
def test_dev_shm_is_a_memory_emptydir(rendered, variant):
    for where, template, c in containers(rendered(variant)):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        empty_dir = volumes[mount["name"]].get("emptyDir", {})
        assert empty_dir.get("medium") == "Memory", f"{where}: /dev/shm is {volumes[mount['name']]}"
        assert "sizeLimit" in empty_dir, f"{where}: unbounded /dev/shm"


@variants
def test_servers_run_the_pbs_backend_with_the_configmap(rendered, variant):
    objs = rendered(variant)
    configmaps = {o["metadata"]["name"]: o for o in find(objs, "ConfigMap")}
    for where, _, c in containers(objs):
        if role(c) != "server":
            continue
        args = c["args"]
        assert args[0] == "$(MODEL)", f"{where}: vLLM wants the model first, got {args}"
        assert args.count("--attention-backend=pbs") == 1, f"{where}: {args}"
        env = {e["name"]: e for e in c["env"]}
        # Kubernetes leaves an undefined $(VAR) in args as literal text.
        for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
            assert ref in env, f"{where}: args use $({ref}) but env has no {ref}"
        (extra,) = [a for a in args if a.startswith("--additional-config=")]
        ref_var = re.fullmatch(r"--additional-config=\$\((\w+)\)", extra).group(1)
        key_ref = env[ref_var]["valueFrom"]["configMapKeyRef"]
        configmap = configmaps[key_ref["name"]]
        additional_config = json.loads(configmap["data"][key_ref["key"]])
        # The settings the plugin will see, PBS_<FIELD> variables included, must load.
        pbs_env = {n: e["value"] for n, e in env.items() if n.startswith(ENV_PREFIX)}
        PBSConfig.load(additional_config, env=pbs_env)


@variants
def test_images_are_pinned_to_the_project_version(rendered, variant):
    for where, _, c in containers(rendered(variant)):
        name, _, tag = c["image"].rpartition(":")
        assert name and "/" not in tag, f"{where}: image {c['image']!r} has no tag"
        assert tag == load_pyproject()["project"]["version"], f"{where}: image tag {tag!r}"
        assert c["imagePullPolicy"] == "IfNotPresent", where


@variants
def test_nothing_runs_privileged_or_as_root(rendered, variant):
    for where, template, c in containers(rendered(variant)):
        pod_sc = template["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == IMAGE_UID, where
        sc = c["securityContext"]
        assert sc.get("privileged", False) is False, f"{where}: privileged"
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
        assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostIPC"), (
            where
        )


@variants
def test_no_secret_in_plain_text(rendered, variant):
    objs = rendered(variant)
    assert not find(objs, "Secret"), "the manifests must reference Secrets, never ship one"
    for where, _, c in containers(objs):
        for e in c.get("env", []):
            if SECRET_ENV.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), (
                    f"{where}: {e['name']} in plain text"
                )
    leaked = SECRET_VALUE.findall(json.dumps(objs))
    assert not leaked, f"credential-like values in the manifests: {leaked}"


@variants
def test_references_resolve(rendered, variant):
    objs = rendered(variant)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for where, template, c in containers(objs):
        for e in c.get("env", []):
            if ref := e.get("valueFrom", {}).get("configMapKeyRef"):
                assert ("ConfigMap", ref["name"]) in names, f"{where}: ConfigMap {ref['name']}"
        for v in template["spec"].get("volumes", []):
            if claim := v.get("persistentVolumeClaim"):
                assert ("PersistentVolumeClaim", claim["claimName"]) in names, where
    for obj in find(objs, "ScaledObject"):
        target = obj["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in names, f"ScaledObject targets {target}"


def _selected(selector: dict, objs: list) -> list[str]:
    return [
        where
        for where, t in pod_templates(objs)
        if selector.items() <= t["metadata"].get("labels", {}).items()
    ]


@variants
def test_service_and_pdb_select_exactly_the_api_servers(rendered, variant):
    objs = rendered(variant)
    servers = sorted({w.rsplit("/", 1)[0] for w, _, c in containers(objs) if role(c) == "server"})
    (service,) = find(objs, "Service")
    assert _selected(service["spec"]["selector"], objs) == servers
    for pdb in find(objs, "PodDisruptionBudget"):
        assert _selected(pdb["spec"]["selector"]["matchLabels"], objs) == servers


@variants
def test_gpus_match_the_parallelism(rendered, variant):
    objs = rendered(variant)
    for obj in find(objs, "Deployment"):
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        world = parallel_size(c["args"], "--tensor-parallel-size") * parallel_size(
            c["args"], "--pipeline-parallel-size"
        )
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == world, c["args"]
    for obj in find(objs, "LeaderWorkerSet"):
        lwt = obj["spec"]["leaderWorkerTemplate"]
        (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
        (worker,) = lwt["workerTemplate"]["spec"]["containers"]
        tp = parallel_size(leader["args"], "--tensor-parallel-size")
        pp = parallel_size(leader["args"], "--pipeline-parallel-size")
        gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in (leader, worker)]
        assert gpus[0] == gpus[1] == tp, (
            f"one node holds one tensor-parallel group: {gpus}, tp={tp}"
        )
        assert lwt["size"] == pp, f"one pipeline stage per pod: size={lwt['size']}, pp={pp}"


@variants
def test_a_cache_shared_by_several_pods_is_read_write_many(rendered, variant):
    objs = rendered(variant)
    (pvc,) = find(objs, "PersistentVolumeClaim")
    pods = sum(
        d["spec"].get("replicas", 2)
        for d in find(objs, "Deployment")  # absent: autoscaled
    ) + sum(lws["spec"]["leaderWorkerTemplate"]["size"] for lws in find(objs, "LeaderWorkerSet"))
    if pods > 1:
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], f"{pods} pods share {pvc['spec']}"
    for so in find(objs, "ScaledObject"):
        (target,) = [
            d
            for d in find(objs, "Deployment")
            if d["metadata"]["name"] == so["spec"]["scaleTargetRef"]["name"]
        ]
        assert "replicas" not in target["spec"], (
            "KEDA's HPA owns replicas: the Deployment must not set them"
        )
