"""The Silogen engine's tests/test_serialization.py, case by case. The peer has a YAML dumper that
writes enum members as their plain values; this engine's configs dump through
``model_dump(mode="json")`` and yaml.safe_dump, which must give the same text."""

from __future__ import annotations

import yaml


def test_config_dumper_dictionary():
    """Restates test_serialization.py::test_config_dumper_dictionary: a plain mapping dumps as
    ``key: value``."""
    assert yaml.safe_dump({"key": "value"}) == "key: value\n"


def test_config_dumper_enum():
    """Restates test_serialization.py::test_config_dumper_enum: an enum-valued config key (here
    data_conf.chat_template_name, a string enum of the schema) dumps as its plain value."""
    from finetune_engine.config import parse_config
    from finetune_engine.config.schema import ChatTemplateName

    cfg = parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "t.jsonl"}]},
                "validation_data": {"type": "NONE"},
                "chat_template_name": ChatTemplateName("chat-ml"),
            },
            "batchsize_conf": {"total_train_batch_size": 1},
            "run_conf": {"model": "m"},
        }
    )
    dumped = cfg.model_dump(mode="json")["data_conf"]["chat_template_name"]
    assert yaml.safe_dump({"key": dumped}) == "key: chat-ml\n"
