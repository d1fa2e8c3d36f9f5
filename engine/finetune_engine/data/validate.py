"""Validate JSONL training data before any model loads: every problem with file, line and reason.

    python -m finetune_engine.data.validate FILE... [--kind K] [--method sft|dpo|kto]

Pure Python (no torch), so Airflow and the data delivery job run it too.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("messages", "prompt_completion", "text", "dpo_messages", "dpo_trl", "kto")
METHOD_KINDS = {
    "sft": ("messages", "prompt_completion", "text"),
    "dpo": ("dpo_messages", "dpo_trl"),
    "kto": ("kto",),
}
ROLES = ("system", "user", "assistant")
OPTIONAL_KEYS = ("dataset", "id")
KIND_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "dpo_messages": ("prompt_messages", "chosen_messages", "rejected_messages"),
    "dpo_trl": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
MAX_LINE_BYTES = 10 * 2**20
MAX_DEPTH = 20
MAX_SHOWN = 20


@dataclass(frozen=True)
class DataProblem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataValidationError(ValueError):
    def __init__(self, problems: list[DataProblem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"{len(problems)} data problem(s):\n{shown}{more}")


@dataclass
class DataReport:
    file: str
    kind: str | None
    examples: int = 0
    problems: list[DataProblem] = field(default_factory=list)


def detect_kind(record: dict) -> str | None:
    keys = set(record) - set(OPTIONAL_KEYS)
    if "messages" in keys:
        return "messages"
    if {"prompt_messages", "chosen_messages", "rejected_messages"} & keys:
        return "dpo_messages"
    if "label" in keys and "prompt" in keys:
        return "kto"
    if {"chosen", "rejected"} & keys:
        return "dpo_trl"
    if "completion" in keys or ("prompt" in keys and "label" not in keys):
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_text(value: Any, where: str) -> str | None:
    if not isinstance(value, str):
        return f"{where} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"{where} is empty"
    return None


def _check_messages(messages: Any, where: str, need_assistant: bool = True, only_assistant: bool = False) -> list[str]:
    if not isinstance(messages, list):
        return [f"{where} must be a list of messages, got {type(messages).__name__}"]
    if not messages:
        return [f"{where} is empty"]
    out: list[str] = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            out.append(f"{at} must be an object with role and content, got {type(m).__name__}")
            continue
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            out.append(f"{at} has unknown key(s) {extra}; a message has only role and content")
        role = m.get("role")
        if "role" not in m:
            out.append(f"{at} has no role")
        elif role not in ROLES:
            out.append(f"{at} role {role!r} is not one of {', '.join(ROLES)}{_suggest(str(role), ROLES)}")
        elif only_assistant and role != "assistant":
            out.append(f"{at} role must be assistant, got {role!r}")
        elif role == "system" and i != 0:
            out.append(f"{at} is a system message after the first turn; put it first")
        if "content" not in m:
            out.append(f"{at} has no content")
        else:
            problem = _check_text(m["content"], f"{at}.content")
            if problem:
                out.append(problem)
    if need_assistant and not out and not any(m.get("role") == "assistant" for m in messages):
        out.append(f"{where} has no assistant turn: nothing to learn from")
    return out


def _check_prompt_like(value: Any, where: str) -> list[str]:
    if isinstance(value, list):
        return _check_messages(value, where, need_assistant=False)
    problem = _check_text(value, where)
    return [problem] if problem else []


def check_record(record: dict, kind: str) -> list[str]:
    """Problems of one record of ``kind`` (empty when valid)."""
    allowed = set(KIND_KEYS[kind]) | set(OPTIONAL_KEYS)
    out = [f"unknown key {k!r}{_suggest(k, allowed)}" for k in sorted(set(record) - allowed)]
    missing = [k for k in KIND_KEYS[kind] if k not in record]
    if missing:
        out.append(f"missing {', '.join(repr(k) for k in missing)} for {kind} data")
    if "id" in record and not isinstance(record["id"], (str, int)) or isinstance(record.get("id"), bool):
        out.append("id must be a string or an integer")
    if "dataset" in record and not isinstance(record["dataset"], str):
        out.append("dataset must be a string")
    if missing:
        return out
    if kind == "messages":
        out += _check_messages(record["messages"], "messages")
    elif kind == "prompt_completion":
        out += [p for p in (_check_text(record["prompt"], "prompt"), _check_text(record["completion"], "completion")) if p]
    elif kind == "text":
        out += [p for p in (_check_text(record["text"], "text"),) if p]
    elif kind == "dpo_messages":
        prompt = record["prompt_messages"]
        out += _check_messages(prompt, "prompt_messages", need_assistant=False)
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") != "user":
            out.append("prompt_messages must end with a user turn")
        out += _check_messages(record["chosen_messages"], "chosen_messages", only_assistant=True)
        out += _check_messages(record["rejected_messages"], "rejected_messages", only_assistant=True)
    elif kind == "dpo_trl":
        for key in ("prompt", "chosen", "rejected"):
            out += _check_prompt_like(record[key], key)
    elif kind == "kto":
        out += _check_prompt_like(record["prompt"], "prompt") + _check_prompt_like(record["completion"], "completion")
        if not isinstance(record["label"], bool):
            out.append(f"label must be true or false, got {record['label']!r}")
    return out


def _lines(path: Path, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(line number, bytes, full length); a line over ``limit`` is not kept in memory whole."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(limit + 1):
            number += 1
            length = len(raw)
            if length > limit and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    length += len(rest)
                length += len(rest)
                raw = b""
            yield number, raw, length


def validate_file(path: str | Path, kind: str | None = None, max_problems: int = 1000,
                  max_line_bytes: int = MAX_LINE_BYTES, allowed_kinds: Iterable[str] | None = None) -> DataReport:
    name = str(path)
    report = DataReport(name, kind)
    problems = report.problems
    allowed = tuple(allowed_kinds or KINDS)

    def add(line: int, reason: str) -> None:
        problems.append(DataProblem(name, line, reason))

    p = Path(path)
    if not p.is_file():
        add(0, "file not found" if not p.exists() else "not a regular file")
        return report
    ids: dict[Any, int] = {}
    skipped = 0
    for number, raw, length in _lines(p, max_line_bytes):
        if len(problems) >= max_problems:
            skipped += 1
            continue
        if length > max_line_bytes:
            add(number, f"line is {length / 2**20:.1f} MiB, over the {max_line_bytes / 2**20:.0f} MiB limit")
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            add(number, f"not UTF-8 (byte {err.start + 1}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8")
            continue
        if not text.strip():
            continue
        if number == 1 and text.lstrip().startswith("["):
            add(number, "this is a JSON array, not JSON Lines: write one object per line, e.g. with `jq -c '.[]'`")
            return report
        try:
            record = json.loads(text, parse_constant=_reject_constant)
        except ValueError as err:
            add(number, f"bad JSON: {err}")
            continue
        if not isinstance(record, dict):
            add(number, f"expected a JSON object, got {type(record).__name__}")
            continue
        if _depth(record, MAX_DEPTH) > MAX_DEPTH:
            add(number, f"nested deeper than {MAX_DEPTH} levels")
            continue
        if report.kind is None:
            detected = detect_kind(record)
            if detected is None:
                add(number, f"cannot tell the data format from keys {sorted(record)}; expected one of: "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in KIND_KEYS.items() if k in allowed))
                continue
            if detected not in allowed:
                add(number, f"{detected} data is not usable here (expected {' or '.join(allowed)})")
                return report
            report.kind = detected
        else:
            detected = detect_kind(record)
            if detected is not None and detected != report.kind and set(record) - set(KIND_KEYS[report.kind]) - set(OPTIONAL_KEYS):
                add(number, f"looks like {detected} data, but the file is {report.kind} (from its first record); one format per file")
                continue
        errors = check_record(record, report.kind)
        if "id" in record and isinstance(record["id"], (str, int)):
            if record["id"] in ids:
                errors.append(f"duplicate id {record['id']!r} (first on line {ids[record['id']]})")
            else:
                ids[record["id"]] = number
        for reason in errors:
            add(number, reason)
        if not errors:
            report.examples += 1
    if skipped:
        add(0, f"stopped after {max_problems} problems; {skipped} more line(s) not checked")
    if report.examples == 0 and not problems:
        add(0, "no examples: the file is empty")
    return report


def validate_files(paths: Iterable[str | Path], kind: str | None = None, method: str | None = None) -> list[DataReport]:
    """Validate every file; raise DataValidationError listing every problem of every file."""
    allowed = METHOD_KINDS.get(method) if method else None
    reports = [validate_file(p, kind=kind, allowed_kinds=allowed) for p in paths]
    problems = [pr for r in reports for pr in r.problems]
    if problems:
        raise DataValidationError(problems)
    return reports


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a file that passed validation."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, json.loads(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine validate-data", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--kind", choices=KINDS, default=None, help="Force the data format.")
    parser.add_argument("--method", choices=sorted(METHOD_KINDS), default=None, help="Allow only this method's formats.")
    args = parser.parse_args(argv)
    allowed = METHOD_KINDS.get(args.method) if args.method else None
    bad = 0
    for path in args.files:
        report = validate_file(path, kind=args.kind, allowed_kinds=allowed)
        for problem in report.problems:
            print(problem)
        bad += len(report.problems)
        print(f"{path}: {report.examples} valid {report.kind or 'unknown'} example(s), {len(report.problems)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

