"""The README names the two commands and CI runs the test one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# `make demo` itself (scripts/demo.sh) runs end to end in tests/dags/test_tutorial.py, shared with the
# tutorial DAG's checks and its relaunch.
