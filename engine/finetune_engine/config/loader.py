"""Load an experiment YAML, apply ``--set key.path=value`` overrides, validate strictly."""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune_engine.config import schema
from finetune_engine.config.errors import ConfigError
from finetune_engine.config.presets import apply_preset
from finetune_engine.config.training_args import METHODS, TrainingArgsError
from finetune_engine.config.yamlio import MAX_BYTES, MAX_DEPTH, MAX_NODES, describe_error, has_tag, safe_load

_DISCRIMINATOR_TAGS = {
    "CONCATENATION",
    "PRECOMPUTE_WEIGHTED_MIX",
    "TEXT_FILES",
    "AUTO_SPLIT",
    "NONE",
    "NO_PEFT",
    "PRETRAINED_PEFT",
    "no-quantization",
    "bits-and-bytes",
    *schema.PEFT_TYPES,
}


def _all_field_names() -> list[str]:
    names: set[str] = set()
    for obj in vars(schema).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            names.update(obj.model_fields)
    return sorted(names)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _field_names_at(path: tuple) -> list[str]:
    """Field names of the section(s) at ``path`` (all members of a union), [] when unknown."""
    models: list[type[BaseModel]] = [schema.ExperimentConfig]
    for part in path:
        if isinstance(part, int):
            continue
        models = [
            m
            for model in models
            if part in model.model_fields
            for m in _models_in(model.model_fields[part].annotation)
        ]
    return sorted({name for model in models for name in model.model_fields})


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map key paths to 1-based line numbers of a YAML document."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _fmt_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(err: ValidationError, lines: dict[tuple, int], source: str) -> list[str]:
    vocab = _all_field_names()
    problems = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if p not in _DISCRIMINATOR_TAGS and not str(p).startswith("function-")
        )
        where = _fmt_path(loc) or "(top level)"
        line = lines.get(loc)
        at = f" ({source}:{line})" if line else ""
        if e["type"] == "extra_forbidden":
            # Keys of the same section first: a near miss there is what the user meant.
            close = difflib.get_close_matches(
                str(loc[-1]), _field_names_at(loc[:-1]), n=1
            ) or difflib.get_close_matches(str(loc[-1]), vocab, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}{at}: unknown key{hint}")
        elif e["type"] == "missing":
            problems.append(f"{where}{at}: required key is missing")
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            disc = str(ctx.get("discriminator", "type")).strip("'")
            tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
            close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}{at}: {disc} {ctx.get('tag')!r} is not one of {', '.join(tags)}{hint}")
        elif isinstance(e.get("ctx", {}).get("error"), TrainingArgsError):
            for key, msg in e["ctx"]["error"].problems:
                sub = loc + (key,)
                line = lines.get(sub)
                problems.append(f"{_fmt_path(sub)}{f' ({source}:{line})' if line else ''}: {msg}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}{at}: {msg}")
    return problems


_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for raw in key.split("."):
        if not raw:
            raise ConfigError("--set", [f"{key!r}: empty path component"])
        m = _INDEX.match(raw)
        if m:
            if m.group(1):
                parts.append(m.group(1))
            parts.append(int(m.group(2)))
        elif raw.isdigit():
            parts.append(int(raw))
        else:
            parts.append(raw)
    return parts


def _override_value(key: str, raw: str) -> Any:
    """The YAML value of ``--set key=raw``; a ConfigError naming the key when it is not plain YAML."""
    if not raw.strip():
        return ""
    if has_tag(raw):
        raise ConfigError(
            "--set",
            [
                f"{key}: the value {raw!r} carries a YAML tag (!...); give a plain value, or quote "
                "it as a string"
            ],
        )
    try:
        return safe_load(raw)
    except yaml.YAMLError as err:
        _, reason = describe_error(err)
        raise ConfigError(
            "--set",
            [
                f"{key}: the value {raw!r} is not valid YAML ({reason}); quote it to pass a string, "
                "e.g. --set 'key=\"text\"'"
            ],
        ) from None


def _check_size(data: Any, source: str) -> None:
    """Refuse a config whose values, shared references counted each time, exceed MAX_NODES, or that
    contains itself: later walks over it (validation, line lookup) would run for minutes."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        obj, done = stack.pop()
        children = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, list) else None
        if children is None:
            continue
        key = id(obj)
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > MAX_NODES:
                raise ConfigError(
                    source,
                    [
                        f"the config expands to more than {MAX_NODES} values (shared anchors/aliases?); "
                        "write it out plainly"
                    ],
                )
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(source, ["the config contains itself (a recursive alias); remove the cycle"])
        active.add(key)
        stack.append((obj, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


_INT64 = 2**63


def _huge_ints(data: Any) -> list[str]:
    """Key paths of integers beyond 64 bits (no trainer setting means them, and torch cannot hold
    them), or of nesting deeper than MAX_DEPTH."""
    out: list[str] = []
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        obj, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return [f"{_fmt_path(path[:3])}...: nested deeper than {MAX_DEPTH} levels"]
        if isinstance(obj, int) and not isinstance(obj, bool) and not -_INT64 <= obj < _INT64:
            out.append(
                f"{_fmt_path(path) or '(top level)'}: {obj} is too large a number; give a realistic value"
            )
        elif isinstance(obj, dict):
            stack.extend((v, path + (k,)) for k, v in obj.items())
        elif isinstance(obj, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(obj))
    return sorted(out)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b[0].c=value`` applied (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", [f"{item!r}: expected key.path=value"])
        value = _override_value(key.strip(), raw)
        parts = _split_key(key.strip())
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError("--set", [f"{key}: index {part} out of range"])
            elif not isinstance(node, dict):
                raise ConfigError("--set", [f"{key}: {_fmt_path(parts[:i])} is not a section"])
            elif part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last > len(node):
                raise ConfigError("--set", [f"{key}: index {last} out of range"])
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError("--set", [f"{key}: {_fmt_path(parts[:-1])} is not a section"])
    return data


def parse_config(
    data: Any,
    source: str = "<config>",
    overrides: Iterable[str] = (),
    method: str = "sft",
    text: str | None = None,
) -> schema.ExperimentConfig:
    """Validate a config mapping for ``method`` (sft, dpo, kto, orpo, cpo); raise ConfigError
    listing every problem."""
    if method not in METHODS:
        raise ConfigError(source, [f"unknown method {method!r}; expected one of {', '.join(METHODS)}"])
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [
                f"expected a mapping of sections (data_conf, training_args, ...), got "
                f"{'an empty document' if data is None else type(data).__name__}"
            ],
        )
    _check_size(data, source)
    if problems := _huge_ints(data):
        raise ConfigError(source, problems)
    data = apply_overrides(data, overrides)
    if problems := _huge_ints(data):
        raise ConfigError(source, problems)
    data, _, _ = apply_preset(data)  # fills only keys the config leaves out; logs what it set
    lines = _yaml_lines(text) if text else {}
    try:
        cfg = schema.ExperimentConfig.model_validate(data, context={"method": method})
    except ValidationError as err:
        raise ConfigError(source, _problems(err, lines, source)) from None
    return cfg


def read_config_file(path: str | Path) -> str:
    """The text of an experiment YAML file; a ConfigError naming the file when it is missing, a
    directory, unreadable, larger than MAX_BYTES or not UTF-8."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; check the path"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["is a directory; give the path of the YAML config file"]) from None
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read the file: {err.strerror or err}"]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            str(path), [f"larger than {MAX_BYTES} bytes; an experiment config is a small YAML file"]
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            str(path),
            [f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the config as UTF-8 YAML"],
        ) from None


def read_config_yaml(text: str, source: str) -> Any:
    """The document of an experiment config's YAML text, read by the engine's safe loader (duplicate
    keys, alias bombs, recursion, depth and size refused); a ConfigError naming ``source:line``."""
    try:
        return safe_load(text)
    except yaml.YAMLError as err:
        line, reason = describe_error(err)
        where = f"{source}:{line}" if line else source
        raise ConfigError(source, [f"{where}: not valid YAML: {reason}"]) from None


def load_config(
    path: str | Path, overrides: Iterable[str] = (), method: str = "sft"
) -> schema.ExperimentConfig:
    """Read and validate an experiment YAML file."""
    text = read_config_file(path)
    data = read_config_yaml(text, str(path))
    return parse_config(data, source=str(path), overrides=overrides, method=method, text=text)
