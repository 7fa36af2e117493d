"""The README stays true: its config tables match ``lgen predict --help``, its module table the files."""

from __future__ import annotations

import re
from pathlib import Path

from lgen.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def table_keys(heading: str) -> set[str]:
    """The keys in the first column of the table after ``heading``."""
    section = README[README.index(heading):]
    section = section[: section.index("\n\n", section.index("|---"))]
    keys = set()
    for row in section.splitlines()[2:]:
        first = row.split("|")[1]
        keys.update(re.findall(r"`([a-z_]+)`", first))
    return keys


def test_the_config_tables_list_every_key_and_only_those(capsys):
    assert main(["predict", "--help"]) == 0
    help_keys = set(re.findall(r"^--((?:model|data)\.[a-z_]+|[a-z_]+):", capsys.readouterr().out, re.M))
    linked = {"data.max_new_tokens", "data.token", "data.seed", "model.seed"}  # set from other keys
    for group, heading in (("model", "`model:`"), ("data", "`data:`")):
        documented = {f"{group}.{k}" for k in table_keys(heading)}
        offered = {k for k in help_keys if k.startswith(f"{group}.")} - linked
        assert documented == offered, (group, documented ^ offered)
    top = {k for k in help_keys if "." not in k} - {"help", "config", "print_config", "trainer", "model", "data"}
    assert table_keys("Top level:") == top


def test_the_parts_table_matches_the_files():
    """Every top-level module and every folder of the package has its row."""
    rows = [line.split("|")[1] for line in README.splitlines() if line.startswith("| `lgen/")]
    listed = {name for row in rows for name in re.findall(r"`lgen/([a-z_0-9]+(?:\.py|/))`", row)}
    files = {p.name for p in (ROOT / "lgen").glob("*.py")} - {"__init__.py", "__main__.py"}
    folders = {f"{p.name}/" for p in (ROOT / "lgen").iterdir() if (p / "__init__.py").is_file()}
    assert listed == files | folders


def test_the_readme_is_a_users_document():
    assert len(README.splitlines()) <= 300
    for doc in re.findall(r"\]\((docs/[a-z_]+\.md)\)", README):
        assert (ROOT / doc).is_file(), doc
    assert "the seed" not in README  # run_gen.py is named, not called "the seed" (it clashes with seed_everything)
