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


def test_the_floors_workflow_runs_a_make_target_that_exists():
    """The version-floors GitHub workflow runs `make test-floors`, which runs scripts/test-floors.sh."""
    import re

    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "floors.yml").read_text())
    runs = [step.get("run", "") for job in flow["jobs"].values() for step in job["steps"]]
    assert "make test-floors" in runs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-floors:\n\t\./scripts/test-floors\.sh$", makefile, re.MULTILINE)
    assert (ROOT / "scripts" / "test-floors.sh").stat().st_mode & 0o111
