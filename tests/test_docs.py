"""The README stays true: its set-up commands are what CI runs, and its reference is generated."""
from __future__ import annotations

from pathlib import Path

from tunesmith import docs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    current = text.split(docs.BEGIN, 1)[1].split(docs.END, 1)[0]
    assert current == "\n" + docs.reference(), "run: python -m tunesmith.docs --write README.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert "tunesmith train examples/quickstart.yaml" in block[0]
    test_cmd = block[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
