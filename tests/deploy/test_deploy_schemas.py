"""Every rendered object validates strictly: built-in kinds against Kubernetes' schemas
(kubernetes-validate), CRDs (LeaderWorkerSet, ServiceMonitor, ScaledObject) against the
closed schemas in crd_schemas/, whose pod templates refer to Kubernetes' PodTemplateSpec."""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from deploy_render import INSTALL_HINT, VARIANTS, Obj, find, name_of

pytest.importorskip("kubernetes_validate", reason=f"kubernetes-validate missing ({INSTALL_HINT})")
import jsonschema  # noqa: E402
from kubernetes_validate.utils import validate as validate_builtin  # noqa: E402
from referencing import Registry, Resource  # noqa: E402

# The oldest Kubernetes the manifests support (LeaderWorkerSet, PDB unhealthyPodEvictionPolicy
# GA) and the newest schema bundled.
K8S_VERSIONS = ("1.31.0", "1.37.0")
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"
CRD_KINDS = {
    "LeaderWorkerSet": "leaderworkerset.yaml",
    "ServiceMonitor": "servicemonitor.yaml",
    "ScaledObject": "scaledobject.yaml",
}


@functools.cache
def crd_validator(kind: str, k8s_version: str) -> jsonschema.protocols.Validator:
    """Validator for a CRD kind, resolving Kubernetes definitions of `k8s_version` (strict)."""
    defs_file = (
        resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{k8s_version}-local-strict"
        / "_definitions.json"
    )
    defs = json.loads(defs_file.read_text())
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    schema = yaml.safe_load((CRD_SCHEMAS / CRD_KINDS[kind]).read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: Obj, k8s_version: str) -> None:
    """Raise jsonschema.ValidationError where `obj` breaks its schema."""
    if obj["kind"] in CRD_KINDS:
        crd_validator(obj["kind"], k8s_version).validate(obj)
    else:
        validate_builtin(obj, k8s_version, strict=True)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_strictly(rendered, variant, k8s_version):
    errors = []
    for obj in rendered(variant):
        try:
            validate(obj, k8s_version)
        except jsonschema.ValidationError as e:
            errors.append(f"{name_of(obj)} at {'/'.join(map(str, e.absolute_path))}: {e.message}")
    assert not errors, "\n".join(errors)


def _set(obj: Obj, path: str, value) -> Obj:
    """A copy of obj with the dotted `path` (list indices as numbers) set to value."""
    obj = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = obj
    for p in parents:
        node = node[p]
    node[last] = value
    return obj


LWS_POD = "spec.leaderWorkerTemplate.leaderTemplate.spec"


@pytest.mark.parametrize(
    ("variant", "kind", "path", "value"),
    [
        ("single-gpu", "Deployment", "spec.template.spec.containers.0.imagePullPolcy", "Always"),
        ("single-gpu", "PersistentVolumeClaim", "spec.storageClass", "fast"),
        ("single-gpu", "Service", "spec.ports.0.port", "8000"),
        ("multi-node", "LeaderWorkerSet", "spec.leaderWorkerTemplate.groupSize", 2),
        ("multi-node", "LeaderWorkerSet", "spec.leaderWorkerTemplate.restartPolicy", "Always"),
        ("multi-node", "LeaderWorkerSet", f"{LWS_POD}.containers.0.resource", {}),
        ("multi-node", "LeaderWorkerSet", f"{LWS_POD}.volumes.0.emptyDir.medium", 1),
        ("tp4+all", "ScaledObject", "spec.triggers.0.metadata.threshold", 5),
        ("tp4+all", "ScaledObject", "spec.scaleTargetRef.nam", "pbs-vllm"),
        ("tp4+all", "ServiceMonitor", "spec.endpoints.0.interval", "15 seconds"),
        ("tp4+all", "PodDisruptionBudget", "spec.minAvailabe", 1),
    ],
)
def test_schemas_reject_typos_and_wrong_types(rendered, variant, kind, path, value):
    """The validation above is strict: a misspelt field or a wrong type fails it."""
    (obj,) = find(rendered(variant), kind)
    validate(obj, K8S_VERSIONS[0])  # the object as rendered is valid...
    with pytest.raises(jsonschema.ValidationError):  # ...and the broken copy is not
        validate(_set(obj, path, value), K8S_VERSIONS[0])
