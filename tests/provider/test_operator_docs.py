"""Every operator argument is documented: a ``:param name:`` line in the docstring of the class
whose ``__init__`` takes it (arguments a subclass passes through ``**kwargs`` are documented on the
base class that takes them)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest
from airflow.sdk import BaseOperator

import airflow_provider_finetune.operators as operators_package


def _operator_classes() -> list[type]:
    found = []
    for info in pkgutil.iter_modules(operators_package.__path__):
        module = importlib.import_module(f"{operators_package.__name__}.{info.name}")
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and value.__module__ == module.__name__
                and issubclass(value, BaseOperator)
            ):
                found.append(value)
    return sorted(found, key=lambda cls: cls.__qualname__)


def _arguments(cls: type) -> list[str]:
    skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in skip]


def _undocumented(cls: type) -> list[str]:
    doc = inspect.cleandoc(cls.__doc__ or "")
    return [name for name in _arguments(cls) if not re.search(rf"^:param {name}:", doc, flags=re.M)]


OPERATORS = _operator_classes()


def test_every_operator_module_is_seen():
    names = {cls.__name__ for cls in OPERATORS}
    assert set(operators_package.__all__) <= names
    assert "EngineJobOperator" in names  # the base whose arguments the engine operators pass through


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda cls: cls.__name__)
def test_every_init_argument_has_a_param_line(cls):
    assert _arguments(cls), f"{cls.__name__}.__init__ takes no named arguments: nothing checked"
    missing = _undocumented(cls)
    assert not missing, (
        f"{cls.__module__}.{cls.__name__}: add ':param {missing[0]}:' to its docstring ({missing})"
    )


def test_the_check_notices_a_missing_param_line():
    class Undocumented(BaseOperator):
        """:param documented: yes."""

        def __init__(self, *, documented: int = 0, forgotten: int = 0, **kwargs):
            super().__init__(**kwargs)

    assert _undocumented(Undocumented) == ["forgotten"]
