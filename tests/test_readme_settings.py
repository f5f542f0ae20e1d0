"""README's settings table and the pydantic model (`PBSConfig`) cannot drift apart: the
same keys in the same order, the same defaults, and every allowed-values entry of the
error messages matching what the table says is allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pbs_vllm.config import _ALLOWED, PBSConfig

README = Path(__file__).resolve().parents[1] / "README.md"


HEADER = "| key | default | allowed | meaning |"


def _settings_rows() -> list[list[str]]:
    """The rows of every settings table (serving settings, then research switches)."""
    rows = []
    for table in README.read_text().split(HEADER)[1:]:
        for line in table.splitlines()[2:]:
            if not line.startswith("| `"):
                break
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_has_the_serving_table_then_the_research_table():
    assert README.read_text().count(HEADER) == 2


def _readme_default(cell: str):
    cell = cell.strip("`")
    if cell == "null":
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def test_readme_lists_every_setting_in_model_order():
    keys = [row[0].strip("`") for row in _settings_rows()]
    assert keys == list(PBSConfig.model_fields)


def test_readme_defaults_match_the_model():
    defaults = {name: field.default for name, field in PBSConfig.model_fields.items()}
    for row in _settings_rows():
        name = row[0].strip("`")
        assert _readme_default(row[1]) == defaults[name], name


def test_every_setting_has_an_allowed_values_message():
    assert set(_ALLOWED) == set(PBSConfig.model_fields)
    for row in _settings_rows():
        assert row[2], f"README gives no allowed values for {row[0]}"
        assert re.search(r"\w", row[3]), f"README gives no meaning for {row[0]}"
