"""deploy/Dockerfile and the image's scripts: hadolint, shellcheck, and the facts the
manifests rely on (base image in the supported vLLM range, non-root uid, entrypoint)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from deploy_render import DEPLOY, INSTALL_HINT, REPO, find_tool, load_pyproject
from packaging.specifiers import SpecifierSet

DOCKERFILE = DEPLOY / "Dockerfile"
SCRIPTS = sorted((DEPLOY / "docker").glob("*.sh"))
MANIFEST_UID = 2000  # runAsUser in deploy/k8s


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"dangling continuation: {pending!r}"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return path


def _hadolint(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), "--no-color", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes():
    proc = _hadolint(DOCKERFILE.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_an_unpinned_base_image():
    proc = _hadolint(DOCKERFILE.read_text().replace("vllm-openai:v0.26.0", "vllm-openai:latest"))
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def test_instructions_parser_joins_continuations():
    text = "# c\nFROM a:1 AS b\n\nRUN x \\\n    && y\nUSER 5\n"
    assert instructions(text) == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("USER", "5")]


def test_base_images_are_a_pinned_supported_vllm(dockerfile):
    extras = load_pyproject()["project"]["optional-dependencies"]
    (vllm_req,) = [r for r in extras["cuda"] if r.startswith("vllm")]
    supported = SpecifierSet(vllm_req.removeprefix("vllm"))
    froms = [args.split()[0] for keyword, args in dockerfile if keyword == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", image)
        assert m, f"FROM {image}: expected vllm/vllm-openai:vX.Y.Z"
        assert m.group(1) in supported, f"FROM {image}: outside the supported vLLM {supported}"


def test_runs_as_the_non_root_uid_of_the_manifests(dockerfile):
    args = dict(a.split("=", 1) for k, a in dockerfile if k == "ARG" and "=" in a)
    (user,) = [a for k, a in dockerfile if k == "USER"]
    uid = int(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user))
    assert uid == MANIFEST_UID != 0


def test_installs_the_wheel_and_enters_through_pbs_vllm_serve(dockerfile):
    runs = [a for k, a in dockerfile if k == "RUN"]
    assert any("build --wheel" in r for r in runs), runs
    assert any(re.search(r"pip install .*pbs_vllm-\*\.whl", r) for r in runs), runs
    (entrypoint,) = [a for k, a in dockerfile if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["pbs-vllm-serve"]
    copied = [a.split()[-2:] for k, a in dockerfile if k == "COPY" and "deploy/docker/" in a]
    assert sorted(dst.rsplit("/", 1)[1] for _, dst in copied) == ["pbs-ray-node", "pbs-vllm-serve"]
    for src, _ in copied:
        assert (REPO / src).is_file(), f"COPY source {src} is missing"


def test_wheel_stage_copies_what_pyproject_packages(dockerfile):
    package_dirs = set(load_pyproject()["tool"]["setuptools"]["package-dir"].values())
    copied = {a.split()[0] for k, a in dockerfile if k == "COPY" and "--from" not in a}
    assert package_dirs | {"pyproject.toml"} <= copied, copied


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    proc = subprocess.run(
        [_tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["bogus"], {}, "unknown role 'bogus'"),
        ([], {}, "unknown role ''"),
        (["leader", "m"], {}, "LWS_GROUP_SIZE is not set"),
        (["worker"], {}, "LWS_LEADER_ADDRESS is not set"),
        (["check"], {}, "LWS_LEADER_ADDRESS is not set"),
    ],
)
def test_ray_node_script_rejects_a_bad_role_or_missing_lws_env(args, env, message):
    proc = subprocess.run(
        ["bash", str(DEPLOY / "docker" / "pbs-ray-node.sh"), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
