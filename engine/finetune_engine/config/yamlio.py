"""YAML as the engine reads it: PyYAML's safe loader plus YAML 1.2 floats, refusing what PyYAML
would silently accept or take long over.

PyYAML follows YAML 1.1, where a float needs a dot: ``5e-05`` and ``1e-6`` are strings. Helm (Go)
writes small numbers exactly that way, so a config rendered by a Helm chart (the Silogen engine's
chart renders ``learning_rate: 5e-05``) would carry a string where a number was meant. This loader
reads them as the floats YAML 1.2 says they are.

It also refuses, each as a ``yaml.YAMLError`` naming the line:

- a key given twice in one mapping (PyYAML keeps the last one silently; YAML 1.2 forbids it),
- more than ``MAX_ALIASES`` aliases, or aliases that expand to more than ``MAX_NODES`` nodes or
  refer to themselves (a kilobyte of nested anchors, "billion laughs", would expand to a billion
  values in every later walk over the document),
- nesting deeper than ``MAX_DEPTH`` levels, input longer than ``MAX_BYTES``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError

# An experiment config is a few kilobytes; these bounds are far above any real one.
MAX_BYTES = 1 << 20
MAX_ALIASES = 1000
MAX_NODES = 200_000
MAX_DEPTH = 64

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLimitError(yaml.MarkedYAMLError):
    """The document is too large, or its aliases expand too far."""


class EngineYamlLoader(yaml.SafeLoader):
    """SafeLoader that resolves exponent-only floats (``5e-05``, ``1E+3``, ``-2e4``), refuses
    duplicate keys and bounds alias expansion."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise YamlLimitError(
                    problem=f"more than {MAX_ALIASES} aliases (*name); write the values out",
                    problem_mark=event.start_mark,
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimitError(
                    problem=f"nested deeper than {MAX_DEPTH} levels; an experiment config is a few "
                    "levels deep",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue
            ident = (key.tag, key.value)
            if ident in seen:
                first = seen[ident].start_mark.line + 1
                raise ComposerError(
                    context=f"key {key.value!r} first given on line {first}",
                    context_mark=seen[ident].start_mark,
                    problem=f"duplicate key {key.value!r} on lines {first} and {key.start_mark.line + 1} "
                    "(only one would count); keep one of them",
                    problem_mark=key.start_mark,
                )
            seen[ident] = key
        return node

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


EngineYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_expansion(root: yaml.Node) -> None:
    """Raise YamlLimitError when the node graph, with every alias expanded, has more than MAX_NODES
    nodes or contains itself. Shared nodes are sized once, so this is linear in the document."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    # Iterative post-order walk: (node, children done?)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_NODES:
                raise YamlLimitError(
                    problem=f"the aliases (*name) expand to more than {MAX_NODES} values; write the "
                    "values out or use fewer aliases",
                    problem_mark=node.start_mark,
                )
            continue
        if key in sizes:
            continue
        if key in active:
            raise YamlLimitError(
                problem="an alias (*name) refers to the node that contains it; a config cannot be recursive",
                problem_mark=node.start_mark,
            )
        active.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in active:
                raise YamlLimitError(
                    problem="an alias (*name) refers to the node that contains it; a config cannot "
                    "be recursive",
                    problem_mark=child.start_mark,
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def safe_load(text: str | bytes) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats, no duplicate keys, bounded aliases and size."""
    if len(text) > MAX_BYTES:
        raise YamlLimitError(
            problem=f"the document is {len(text)} bytes, more than the {MAX_BYTES} an experiment "
            "config may have; is this the right file?"
        )
    return yaml.load(text, Loader=EngineYamlLoader)  # noqa: S506 - a SafeLoader subclass


def has_tag(text: str) -> bool:
    """Whether ``text`` carries an explicit YAML tag (``!!str``, ``!!python/...``, ``!custom``)."""
    try:
        return any(isinstance(tok, yaml.TagToken) for tok in yaml.scan(text, Loader=EngineYamlLoader))
    except yaml.YAMLError:
        return False


def describe_error(err: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line or None, one-line reason) of a YAML error, for messages naming file:line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return (mark.line + 1 if mark else None), " ".join(str(problem).split())
