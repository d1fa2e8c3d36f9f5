"""A config error lists every problem with its key path (and file:line when known)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An experiment config that cannot run. ``problems`` holds one line per bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid experiment config {source}: {len(problems)} problem(s)\n{lines}")
