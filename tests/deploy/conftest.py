"""Fixtures for the offline checks of deploy/: rendered kustomize variants."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from deploy_render import INSTALL_HINT, Obj, kustomize_command, render_variant


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> Callable[[str], list[Obj]]:
    """rendered(variant) -> the variant's objects, each variant rendered once per session."""
    command = kustomize_command()
    if command is None:
        pytest.skip(f"neither kubectl nor kustomize is installed ({INSTALL_HINT})")
    cache: dict[str, list[Obj]] = {}

    def get(variant: str) -> list[Obj]:
        if variant not in cache:
            cache[variant] = render_variant(command, variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get
