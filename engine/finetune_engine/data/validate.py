"""Validate training data before any model loads: every problem with file, line and reason.

    python -m finetune_engine.data.validate FILE... [--kind K] [--method sft|dpo|kto]

A file is JSON Lines (one object a line) or one JSON array of objects (what the Silogen engine's
loader also reads; problems name the line each element starts on). Rows are read the way the
Silogen engine's data model reads them: keys that are not part of the format (``data_source``,
``extra_info``, ...) are ignored, ``dataset``/``id`` may be null, ``tags``/``labels`` may be given
on a row and on a message, and a message may be empty (e.g. an empty system prompt).

Pure Python (no torch), so Airflow and the data delivery job run it too.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
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
# Keys every format may carry beside its own: the Silogen data model's metadata fields.
OPTIONAL_KEYS = ("dataset", "id", "tags", "labels")
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
FORMAT_KEYS = frozenset(k for keys in KIND_KEYS.values() for k in keys)


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
    if "label" in keys:
        return "kto"
    if {"chosen", "rejected"} & keys:
        return "dpo_trl"
    if "completion" in keys or "prompt" in keys:
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


def _has_lone_surrogate(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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


def _check_metadata(record: dict, where: str = "") -> list[str]:
    """The Silogen data model's ``tags`` (a list of strings) and ``labels`` (an object of strings)."""
    out = []
    tags = record.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        out.append(f"{where}tags must be a list of strings, got {json.dumps(tags)[:60]}")
    labels = record.get("labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(v is None or isinstance(v, str) for v in labels.values())
    ):
        out.append(f"{where}labels must be an object of string values, got {json.dumps(labels)[:60]}")
    return out


def _check_messages(messages: Any, where: str, only_assistant: bool = False) -> list[str]:
    """A list of {role, content} messages. Content may be empty (the Silogen engine's data has empty
    system prompts), but not every message of the list; other message keys are ignored."""
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
        role = m.get("role")
        if "role" not in m:
            out.append(f"{at} has no role" + _near_miss("role", m))
        elif role not in ROLES:
            out.append(f"{at} role {role!r} is not one of {', '.join(ROLES)}{_suggest(str(role), ROLES)}")
        elif only_assistant and role != "assistant":
            out.append(f"{at} role must be assistant, got {role!r}")
        if "content" not in m:
            out.append(f"{at} has no content" + _near_miss("content", m))
        elif not isinstance(m["content"], str):
            out.append(f"{at}.content must be a string, got {type(m['content']).__name__}")
        out += _check_metadata(m, f"{at}.")
    if not out and all(not m["content"].strip() for m in messages):
        out.append(f"{where}: every message is empty; nothing to train on")
    return out


def _near_miss(key: str, record: dict) -> str:
    """' (found 'mesages': ...)' when the record has a key close to the missing ``key``."""
    close = difflib.get_close_matches(key, [k for k in record if isinstance(k, str)], n=1)
    return f" (found {close[0]!r}: did you mean {key!r}?)" if close else ""


def _typos(record: dict) -> str:
    """' (did you mean ...)' for the keys of ``record`` that are close to a format's key."""
    out = []
    for key in record:
        close = difflib.get_close_matches(str(key), sorted(FORMAT_KEYS), n=1)
        if close and key not in FORMAT_KEYS:
            out.append(f"{key!r}: did you mean {close[0]!r}?")
        if len(out) == 3:
            break
    return f" ({'; '.join(out)})" if out else ""


def _ends_with_user(messages: Any, where: str) -> list[str]:
    if (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") != "user"
    ):
        return [f"{where} must end with a user turn"]
    return []


def _check_prompt_like(value: Any, where: str, answer: bool = False) -> list[str]:
    """A string, or a message list: a prompt ends with a user turn, an answer has only assistant turns."""
    if isinstance(value, list):
        if answer:
            return _check_messages(value, where, only_assistant=True)
        return _check_messages(value, where) + _ends_with_user(value, where)
    problem = _check_text(value, where)
    return [problem] if problem else []


def _same_shape(record: dict, keys: tuple[str, ...]) -> list[str]:
    shapes = {isinstance(record[k], list) for k in keys if isinstance(record[k], (str, list))}
    if len(shapes) > 1:
        return [f"{', '.join(keys)} must be all strings or all message lists, not a mix"]
    return []


def _identical_pair(record: dict, chosen: str, rejected: str) -> list[str]:
    from finetune_engine.data.preference import identical_answers

    if identical_answers(record):
        return [
            f"{chosen} and {rejected} are identical, so the pair prefers nothing; fix the answers or "
            "drop the row"
        ]
    return []


def check_record(record: dict, kind: str) -> list[str]:
    """Problems of one record of ``kind`` (empty when valid). Keys outside the format are ignored,
    as the Silogen engine's data model ignores them."""
    out = []
    missing = [k for k in KIND_KEYS[kind] if k not in record]
    if missing:
        out.append(
            f"missing {', '.join(repr(k) for k in missing)} for {kind} data"
            + "".join(_near_miss(k, record) for k in missing)
        )
    rid = record.get("id")
    if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool)):
        out.append("id must be a string or an integer")
    if record.get("dataset") is not None and not isinstance(record["dataset"], str):
        out.append("dataset must be a string")
    out += _check_metadata(record)
    if missing:
        return out
    if kind == "messages":
        out += _check_messages(record["messages"], "messages")
    elif kind == "prompt_completion":
        out += [
            p
            for p in (
                _check_text(record["prompt"], "prompt"),
                _check_text(record["completion"], "completion"),
            )
            if p
        ]
    elif kind == "text":
        out += [p for p in (_check_text(record["text"], "text"),) if p]
    elif kind == "dpo_messages":
        prompt = record["prompt_messages"]
        out += _check_messages(prompt, "prompt_messages")
        out += _ends_with_user(prompt, "prompt_messages")
        out += _check_messages(record["chosen_messages"], "chosen_messages", only_assistant=True)
        out += _check_messages(record["rejected_messages"], "rejected_messages", only_assistant=True)
        out += _identical_pair(record, "chosen_messages", "rejected_messages")
    elif kind == "dpo_trl":
        for key in ("prompt", "chosen", "rejected"):
            out += _check_prompt_like(record[key], key, answer=key != "prompt")
        out += _same_shape(record, ("prompt", "chosen", "rejected"))
        out += _identical_pair(record, "chosen", "rejected")
    elif kind == "kto":
        out += _check_prompt_like(record["prompt"], "prompt") + _check_prompt_like(
            record["completion"], "completion", answer=True
        )
        out += _same_shape(record, ("prompt", "completion"))
        if not isinstance(record["label"], bool):
            out.append(f"label must be true or false, got {record['label']!r}")
    return out


def _check_kind_args(kind: str | None, allowed: tuple[str, ...]) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(
            f"unknown data kind {kind!r}{_suggest(kind, KINDS)}; expected one of {', '.join(KINDS)}"
        )
    if kind is not None and kind not in allowed:
        raise ValueError(f"data kind {kind!r} is not usable here (expected {' or '.join(allowed)})")


def _allowed_for(method: str | None) -> tuple[str, ...] | None:
    if method is None:
        return None
    if method not in METHOD_KINDS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHOD_KINDS)}")
    return METHOD_KINDS[method]


_JSON_WS = re.compile(r"[ \t\n\r]*")

# One parsed row: (line, record or None, the row's JSON text, problem or None). A row with a problem
# carries no record; a problem with line 0 concerns the whole file.
Row = tuple[int, Any, str, str | None]


def _first_byte(path: Path) -> bytes:
    """The first byte of the file that is not whitespace (after a UTF-8 BOM); b'' when there is none."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(1 << 16):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


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


def _too_long(length: int, limit: int) -> str:
    return (
        f"line is {length / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit; "
        "split the example or raise the limit"
    )


def _parse_json_lines(path: Path, limit: int) -> Iterator[Row]:
    first_content = True
    for number, raw, length in _lines(path, limit):
        if length > limit:
            yield number, None, "", _too_long(length, limit)
            first_content = False
            continue
        if number == 1:
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                yield (
                    number,
                    None,
                    "",
                    "the file is UTF-16, not UTF-8; re-encode it, e.g. iconv -f utf-16 -t utf-8",
                )
                return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield (
                number,
                None,
                "",
                (
                    f"not UTF-8 (bad byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ),
            )
            first_content = False
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if first_content:
            first_content = False
            if stripped == "{":
                yield (
                    number,
                    None,
                    "",
                    (
                        "this looks like pretty-printed JSON, not JSON Lines: write one object per "
                        "line, e.g. with `jq -c .`, or one JSON array of objects"
                    ),
                )
                return
        try:
            record = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            yield number, None, "", f"nested deeper than {MAX_DEPTH} levels"
            continue
        except ValueError as err:
            yield number, None, "", f"bad JSON: {err}"
            continue
        yield number, record, text, None


class _LineOf:
    """Line number of a character offset, for offsets met in increasing order."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            return self.text.count("\n", 0, pos) + 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _parse_json_array(path: Path, limit: float) -> Iterator[Row]:
    """The elements of a file that is one JSON array (as ``json.dump(rows, f)`` writes it), each
    with the line it starts on. Reading stops at the first syntax error: an array has no lines to
    resynchronize on."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        yield (
            raw[: err.start].count(b"\n") + 1,
            None,
            "",
            f"not UTF-8 (bad byte 0x{raw[err.start]:02x}); re-encode "
            "the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
        )
        return
    line_of = _LineOf(text)
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    pos = _JSON_WS.match(text).end() + 1  # past the opening bracket
    pos = _JSON_WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = pos
            try:
                value, pos = decoder.raw_decode(text, pos)
            except RecursionError:
                yield (
                    line_of(start),
                    None,
                    "",
                    f"nested deeper than {MAX_DEPTH} levels; the array is not read further",
                )
                return
            except json.JSONDecodeError as err:
                yield (
                    err.lineno,
                    None,
                    "",
                    f"bad JSON: {err.msg} (column {err.colno}); the array is not read further",
                )
                return
            except ValueError as err:
                yield line_of(start), None, "", f"bad JSON: {err}; the array is not read further"
                return
            if pos - start > limit:
                yield line_of(start), None, "", _too_long(len(text[start:pos].encode()), int(limit))
            else:
                yield line_of(start), value, text[start:pos], None
            pos = _JSON_WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _JSON_WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            yield (
                line_of(pos),
                None,
                "",
                "expected ',' or ']' after an array element; the array is not read further",
            )
            return
    rest = _JSON_WS.match(text, pos).end()
    if rest < len(text):
        yield (
            line_of(rest),
            None,
            "",
            "text after the end of the JSON array; a file is "
            "one JSON array, or JSON Lines (one object a line)",
        )


def _parse(path: Path, limit: int) -> Iterator[Row]:
    """The rows of a JSON Lines file, or of a file that is one JSON array."""
    if _first_byte(path) == b"[":
        return _parse_json_array(path, limit)
    return _parse_json_lines(path, limit)


def validate_file(
    path: str | Path,
    kind: str | None = None,
    max_problems: int = 1000,
    max_line_bytes: int = MAX_LINE_BYTES,
    allowed_kinds: Iterable[str] | None = None,
) -> DataReport:
    """Check one data file (JSON Lines, or one JSON array of objects); every problem goes into the
    report (nothing is raised for bad data).

    ``kind`` forces the format (otherwise the first record's keys decide); ``allowed_kinds`` restricts it.
    Raises ValueError only for a bad ``kind`` argument.
    """
    name = str(path)
    allowed = tuple(allowed_kinds or KINDS)
    _check_kind_args(kind, allowed)
    report = DataReport(name, kind)
    problems = report.problems

    def add(line: int, reason: str) -> None:
        problems.append(DataProblem(name, line, reason))

    p = Path(path)
    if not p.exists():
        add(0, "file not found; check the path")
        return report
    if not p.is_file():
        add(0, "not a regular file; give the path of a .jsonl file")
        return report
    ids: dict[Any, int] = {}
    skipped = 0
    try:
        for number, record, text, problem in _parse(p, max_line_bytes):
            if len(problems) >= max_problems:
                skipped += 1
                continue
            if problem is not None:
                add(number, problem)
                continue
            if not isinstance(record, dict):
                add(
                    number, f"expected a JSON object, got {type(record).__name__}; each example is one object"
                )
                continue
            # Depth can only exceed the limit if the row has that many brackets: skip the walk otherwise.
            if text.count("[") + text.count("{") > MAX_DEPTH and _depth(record, MAX_DEPTH) > MAX_DEPTH:
                add(number, f"nested deeper than {MAX_DEPTH} levels")
                continue
            if "\\u" in text and _has_lone_surrogate(record):
                add(
                    number,
                    "a string holds an unpaired surrogate escape (e.g. \\ud800); "
                    "fix the text encoding: it cannot be turned into UTF-8",
                )
                continue
            detected = detect_kind(record)
            if report.kind is None:
                if detected is None:
                    add(
                        number,
                        f"cannot tell the data format from keys {sorted(record)}; expected one of: "
                        + "; ".join(f"{k}: {', '.join(v)}" for k, v in KIND_KEYS.items() if k in allowed)
                        + _typos(record),
                    )
                    continue
                if detected not in allowed:
                    add(number, f"{detected} data is not usable here (expected {' or '.join(allowed)})")
                    return report
                report.kind = detected
            elif (
                detected is not None
                and detected != report.kind
                and (set(record) & FORMAT_KEYS) - set(KIND_KEYS[report.kind])
            ):
                add(
                    number,
                    f"looks like {detected} data, but the file is {report.kind} "
                    f"({'forced' if kind else 'from its first record'}); one format per file",
                )
                continue
            errors = check_record(record, report.kind)
            rid = record.get("id")
            if isinstance(rid, (str, int)) and not isinstance(rid, bool):
                if rid in ids:
                    errors.append(
                        f"duplicate id {rid!r} (first on line {ids[rid]}); ids must be unique in a file"
                    )
                else:
                    ids[rid] = number
            for reason in errors:
                add(number, reason)
            if not errors:
                report.examples += 1
    except OSError as err:
        add(0, f"cannot read the file: {err.strerror or err}")
        return report
    if skipped:
        add(0, f"stopped after {max_problems} problems; {skipped} more line(s) not checked")
    if report.examples == 0 and not problems:
        add(0, "no examples: the file is empty")
    return report


def validate_files(
    paths: Iterable[str | Path], kind: str | None = None, method: str | None = None
) -> list[DataReport]:
    """Validate every file; raise DataValidationError listing every problem of every file.

    ``method`` ("sft", "dpo", "kto") allows only that method's formats. A bad ``kind`` or ``method`` argument
    (unknown, or a kind the method cannot use) is a ValueError, not a data problem.
    """
    allowed = _allowed_for(method)
    _check_kind_args(kind, allowed or KINDS)
    paths = list(paths)
    # Plain-text sources (TEXT_FILES: .txt files, directories of them) for formats that take text.
    text = (
        [str(p) for p in paths if is_text_source(p)] if kind is None and "text" in (allowed or KINDS) else []
    )
    reports = [validate_file(p, kind=kind, allowed_kinds=allowed) for p in paths if str(p) not in text]
    problems = [pr for r in reports for pr in r.problems]
    if text:
        try:
            reports += validate_text_files(text)
        except DataValidationError as err:
            problems += err.problems
    if problems:
        raise DataValidationError(problems)
    return reports


def is_text_source(path: str | Path) -> bool:
    """A .txt file or a directory: plain text for continued pretraining, not JSON Lines."""
    return str(path).lower().endswith(".txt") or Path(path).is_dir()


def list_text_files(paths: list[str], where: str = "data_conf.training_data.datasets") -> list[Path]:
    """The .txt files of ``paths`` (TEXT_FILES data) (files as given, directories recursively, sorted),
    each once."""
    problems: list[DataProblem] = []
    out: list[Path] = []
    seen: set[Path] = set()
    for i, raw in enumerate(paths):
        p = Path(raw)
        if "://" in raw:
            problems.append(
                DataProblem(
                    raw,
                    0,
                    f"{where}[{i}]: bucket URIs are fetched by the train job; finetuning reads local files",
                )
            )
            continue
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                problems.append(DataProblem(raw, 0, f"{where}[{i}]: the directory has no .txt files"))
        elif p.is_file():
            found = [p]
        else:
            problems.append(
                DataProblem(raw, 0, f"{where}[{i}]: not found; give a .txt file or a directory of them")
            )
            continue
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if problems:
        raise DataValidationError(problems)
    return out


def validate_text_files(
    paths: list[str], where: str = "data_conf.training_data.datasets"
) -> list[DataReport]:
    """Every file must be UTF-8 text (a BOM is allowed); empty files are reported, not trained."""
    problems: list[DataProblem] = []
    reports = []
    for f in list_text_files(paths, where):
        report = DataReport(str(f), "text_file")
        try:
            raw = f.read_bytes()
        except OSError as err:
            problems.append(DataProblem(str(f), 0, f"cannot read the file: {err.strerror or err}"))
            continue
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            problems.append(
                DataProblem(
                    str(f), 0, "the file is UTF-16, not UTF-8; re-encode it, e.g. iconv -f utf-16 -t utf-8"
                )
            )
            continue
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            problems.append(
                DataProblem(
                    str(f),
                    line,
                    f"not UTF-8 (bad byte 0x{raw[err.start]:02x}); "
                    "re-encode the file, e.g. iconv -f latin1 -t utf-8",
                )
            )
            continue
        report.examples = 1 if text.strip() else 0
        reports.append(report)
    if problems:
        raise DataValidationError(problems)
    if not any(r.examples for r in reports):
        raise DataValidationError([DataProblem(str(paths[0]), 0, f"{where}: every text file is empty")])
    return reports


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a file that passed validation; rows split exactly as the validator
    splits them."""
    p = Path(path)
    if _first_byte(p) == b"[":
        for number, record, _, _ in _parse_json_array(p, float("inf")):
            yield number, record
        return
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield number, json.loads(raw.decode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-engine validate-data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("files", nargs="+")
    parser.add_argument("--kind", choices=KINDS, default=None, help="Force the data format.")
    parser.add_argument(
        "--method", choices=sorted(METHOD_KINDS), default=None, help="Allow only this method's formats."
    )
    args = parser.parse_args(argv)
    allowed = _allowed_for(args.method)
    if args.kind and allowed and args.kind not in allowed:
        parser.error(
            f"--kind {args.kind} is not usable with --method {args.method} (expected {' or '.join(allowed)})"
        )
    bad = 0
    for path in args.files:
        report = validate_file(path, kind=args.kind, allowed_kinds=allowed)
        for problem in report.problems:
            print(problem)
        bad += len(report.problems)
        print(
            f"{path}: {report.examples} valid {report.kind or 'unknown'} "
            f"example(s), {len(report.problems)} problem(s)"
        )
    if len(args.files) > 1:
        print(f"total: {bad} problem(s) in {len(args.files)} file(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
