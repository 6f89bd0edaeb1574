"""The docs stay true: generated blocks are current, the README's set-up commands are what CI runs,
the commands shown exist, and the links resolve."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith import docs
from tunesmith.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


@pytest.mark.parametrize("name", docs.FILES)
def test_generated_blocks_are_current(name):
    text = (ROOT / name).read_text()
    assert docs.blocks_in(text), f"{name} holds no generated block"
    assert docs.fill(text, name) == text, f"{name} is out of date; run: python -m tunesmith.docs --write"


def test_each_block_lives_where_the_docs_link_to():
    assert docs.blocks_in((ROOT / "docs" / "config.md").read_text()) == ["config-reference"]
    assert docs.blocks_in((ROOT / "README.md").read_text()) == ["methods", "objectives"]
    assert docs.blocks_in((ROOT / "docs" / "models.md").read_text()) == ["support-table"]


def test_fill_replaces_a_stale_block_and_keeps_the_rest():
    begin, end = docs.markers("objectives")
    text = f"intro\n{begin}\n| old table |\n{end}\noutro\n"
    new = docs.fill(text)
    assert new.startswith(f"intro\n{begin}\n") and new.endswith(f"{end}\noutro\n")
    assert "| old table |" not in new and "| `sft` |" in new and "| `cls` |" in new
    assert docs.fill(new) == new
    with pytest.raises(SystemExit, match="objectives:end"):
        docs.fill(f"{begin}\nno end marker\n")


def test_methods_table_lists_every_registered_method():
    from tunesmith.methods import registry
    rows = docs.methods_table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(registry.all_methods())
    assert "| `lora` | low-rank |" in docs.methods_table() and "(peft `LORA`) | yes |" in docs.methods_table()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert "tunesmith train examples/quickstart.yaml" in block[0]
    test_cmd = block[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def _shell_lines(path: Path) -> list[str]:
    blocks = re.findall(r"```(?:bash|text)\n(.*?)```", path.read_text(), flags=re.S)
    return [line.removeprefix("$ ").strip() for b in blocks for line in b.splitlines()]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_cli_commands_shown_exist(path):
    subcommands = build_parser()._subparsers._group_actions[0].choices
    shown = [m.group(1) for line in _shell_lines(path) for m in re.finditer(r"(?:^|/|&& )tunesmith (\S+)", line)]
    unknown = sorted({c for c in shown if c not in subcommands})
    assert not unknown, f"{path.name} shows tunesmith subcommands that do not exist: {unknown}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
    missing = [link for link in links if not (path.parent / link).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; move detail into docs/ (it links there)"
