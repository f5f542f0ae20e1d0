"""The overlay example in README.md (Deploy on Kubernetes) renders, with the image and components it names."""

from __future__ import annotations

import re

from deploy_render import DEPLOY, REPO, find, kustomize_command, render

DOCS = REPO / "README.md"


def test_docs_overlay_example_renders(rendered, tmp_path):
    # `rendered` skips the test when no kustomize is installed.
    block = re.search(
        r"cat > my-pbs/kustomization.yaml <<'YAML'\n(.*?)\nYAML\n", DOCS.read_text(), re.S
    )
    assert block, "README.md lost its Deploy on Kubernetes overlay example"
    (tmp_path / "deploy").symlink_to(DEPLOY)  # the example sits beside deploy/
    (tmp_path / "my-pbs").mkdir()
    (tmp_path / "my-pbs" / "kustomization.yaml").write_text(block.group(1))
    objs = render(kustomize_command(), tmp_path / "my-pbs")
    assert {o["metadata"].get("namespace") for o in objs} == {"llm"}
    (deployment,) = find(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "REGISTRY/pbs-vllm:0.1.0"
    assert {"ServiceMonitor", "ScaledObject", "PodDisruptionBudget"} <= {o["kind"] for o in objs}
