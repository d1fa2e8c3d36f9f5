"""The shipped DAGs' trigger params and preflights, without Airflow servers: a run's conf picks configs
and data scripts by name from a set the platform fixes ([finetune] dag_defaults), never a worker path or
inline YAML; the promotion gate is the DAG's; every DAG checks its inputs before its first side effect."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

try:
    from airflow.sdk.exceptions import ParamValidationError
except ImportError:  # Airflow 3.1
    from airflow.exceptions import ParamValidationError

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.preflight import (
    CodeTrust,
    bundle_choices,
    check_conf_keys,
    check_configs,
    check_model_id,
    max_steps_overrides,
)
from tests.airflow_compat import dagbag_class

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
TINY = "engine/configs/tiny-sft-lora.yaml"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _dags(monkeypatch, defaults: dict | None = None):
    DagBag = dagbag_class()

    monkeypatch.setenv("AIRFLOW__FINETUNE__DAG_DEFAULTS", json.dumps(defaults or {}))
    bag = DagBag(str(DAGS))
    return bag


@pytest.fixture()
def dags(monkeypatch):
    bag = _dags(monkeypatch)
    assert bag.import_errors == {}
    return bag.dags


def _refused(dag, name: str, value) -> bool:
    try:
        dag.params.get_param(name).resolve(value)
    except ParamValidationError:
        return True
    return False


WORKER_FILES = ["/proc/self/environ", "/opt/airflow/airflow.cfg", "../airflow.cfg", "dags/tutorial.py"]
INLINE = "run_conf:\n  tokenizer: someone/tok\n  model_args: {trust_remote_code: true}\n"


@pytest.mark.parametrize(
    ("dag_id", "param"),
    [
        ("finetune_tutorial", "data_script"),
        ("finetune_tutorial", "config"),
        ("finetune_retraining", "initial_config"),
        ("finetune_retraining_data", "data_script"),
    ],
)
def test_file_params_take_names_of_the_set_never_a_path_or_inline_yaml(dags, dag_id, param):
    dag = dags[dag_id]
    schema = dag.params.get_param(param).schema
    assert schema["enum"] and dag.params[param] in schema["enum"]
    for value in [*WORKER_FILES, INLINE, str(ROOT / TINY), ""]:
        assert _refused(dag, param, value), (param, value)
    for name in schema["enum"]:
        assert not _refused(dag, param, name)


def test_the_set_grows_only_by_dag_defaults_with_files_inside_the_bundle(monkeypatch, tmp_path):
    bag = _dags(monkeypatch, {"finetune_tutorial": {"configs": {"dpo": "engine/configs/tiny-dpo-lora.yaml"}}})
    assert bag.import_errors == {}
    dag = bag.dags["finetune_tutorial"]
    assert "dpo" in dag.params.get_param("config").schema["enum"]
    rendered = jinja2.Template(dag.get_task("sweep").partial_kwargs["config"]).render(
        params={"config": "dpo"}
    )
    assert rendered == str(ROOT / "engine/configs/tiny-dpo-lora.yaml")
    outside = tmp_path / "x.yaml"
    outside.write_text("a: 1\n")
    for path, message in [
        (str(outside), "is outside the DAG bundle"),
        ("../../etc/passwd", "is outside the DAG bundle"),
        ("engine/configs/nope.yaml", "no file engine/configs/nope.yaml"),
    ]:
        errors = _dags(monkeypatch, {"finetune_tutorial": {"configs": {"x": path}}}).import_errors
        [error] = errors.values()
        assert "dag_defaults.finetune_tutorial.configs.x" in error and message in error, error


def test_a_symlink_out_of_the_bundle_is_refused(tmp_path):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (tmp_path / "secret.yaml").write_text("a: 1\n")
    (root / "configs" / "ok.yaml").write_text("a: 1\n")
    (root / "configs" / "link.yaml").symlink_to(tmp_path / "secret.yaml")
    choices = bundle_choices(
        root, "d", {}, option="config", set_key="configs", builtin={"ok": "configs/ok.yaml"}, default="ok"
    )
    assert choices.files == {"ok": str(root / "configs" / "ok.yaml")} and choices.default == "ok"
    with pytest.raises(
        FinetuneConfigError, match=r"dag_defaults\.d\.configs\.link: .* outside the DAG bundle"
    ):
        bundle_choices(
            root,
            "d",
            {"configs": {"link": "configs/link.yaml"}},
            option="config",
            set_key="configs",
            builtin={},
            default="link",
        )
    # a default given as a file of the bundle keeps the set's name for it
    same = bundle_choices(
        root,
        "d",
        {"config": "configs/ok.yaml"},
        option="config",
        set_key="configs",
        builtin={"ok": "configs/ok.yaml"},
        default="ok",
    )
    assert same.default == "ok" and list(same.files) == ["ok"]


def test_model_id_is_a_hub_repo_id_or_exactly_the_platforms_model_dir(monkeypatch, tmp_path):
    bag = _dags(monkeypatch)
    dag = bag.dags["finetune_tutorial"]
    for ok in ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gpt2", "org/name_v.2"):
        assert not _refused(dag, "model_id", ok), ok
    for bad in ("/etc", "/proc/self", "../models", "org/../x", "a/b/c", "org--x/y", "s3://b/m", ""):
        assert _refused(dag, "model_id", bad), bad
    local = str(tmp_path / "tiny-model")
    dag = _dags(monkeypatch, {"finetune_tutorial": {"model_id": local}}).dags["finetune_tutorial"]
    assert dag.params["model_id"] == local and not _refused(dag, "model_id", local)
    for bad in (str(tmp_path), local + "/..", local + "x", "/etc"):
        assert _refused(dag, "model_id", bad), bad
    assert not _refused(dag, "model_id", "org/name")
    # the preflight: the directory must hold a model
    with pytest.raises(FinetuneConfigError, match="no config.json"):
        check_model_id(local, local)
    (tmp_path / "tiny-model").mkdir()
    (tmp_path / "tiny-model" / "config.json").write_text("{}")
    assert check_model_id(local, local) == local
    with pytest.raises(FinetuneConfigError, match="Hub repo id"):
        check_model_id("/etc", local)


@pytest.mark.parametrize("dag_id", ["finetune_tutorial", "finetune_retraining", "finetune_ui"])
def test_max_steps_zero_is_refused(dags, dag_id):
    dag = dags[dag_id]
    assert _refused(dag, "max_steps", 0) and _refused(dag, "max_steps", -2)
    assert not _refused(dag, "max_steps", -1) and not _refused(dag, "max_steps", 1)
    with pytest.raises(FinetuneConfigError, match="max_steps 0: give -1"):
        max_steps_overrides(0)
    assert max_steps_overrides(-1) == [] and max_steps_overrides(5) == ["training_args.max_steps=5"]


def test_the_tutorial_dataset_file_is_a_file_name(dags):
    dag = dags["finetune_tutorial"]
    for bad in ("../models/x.jsonl", "a/b.jsonl", "x.json", ".jsonl"):
        assert _refused(dag, "dataset_file", bad), bad
    assert not _refused(dag, "dataset_file", "tiny-chat.jsonl")


def test_the_promotion_gate_is_not_a_param_and_urls_stay_in_the_bucket(dags):
    dag = dags["finetune_retraining"]
    assert "heldout_data" not in dag.params and "min_improvement" not in dag.params
    with pytest.raises(FinetuneConfigError, match="'min_improvement'"):
        check_conf_keys({"min_improvement": -5}, dag.params)
    for param in ("base_model", "train_data"):
        assert _refused(dag, param, "s3://another-bucket/x.jsonl") and _refused(dag, param, "/etc/passwd")
    assert not _refused(dag, "train_data", "s3://finetune/datasets/retrain/train.jsonl")
    evaluate = dag.get_task("evaluate")
    assert evaluate.datasets == ["s3://finetune/datasets/retrain/heldout.jsonl"]


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"min_improvement": -1}, "min_improvement -1: give a number >= 0"),
        ({"min_improvement": "0.1"}, "min_improvement '0.1'"),
        ({"heldout_data": "/data/heldout.jsonl"}, "heldout_data '/data/heldout.jsonl': give the s3:// URI"),
        ({"allow_trust_remote_code": "yes"}, "allow_trust_remote_code: give true or false"),
    ],
)
def test_a_bad_gate_setting_is_an_import_error_naming_it(monkeypatch, gate, message):
    errors = _dags(monkeypatch, {"finetune_retraining": gate}).import_errors
    [error] = errors.values()
    assert message in error and "dag_defaults.finetune_retraining" in error, error


def test_the_gate_comes_from_dag_defaults(monkeypatch):
    heldout = "s3://finetune/datasets/pinned/heldout.jsonl"
    bag = _dags(monkeypatch, {"finetune_retraining": {"heldout_data": heldout, "min_improvement": 0.05}})
    assert bag.import_errors == {}
    assert bag.dags["finetune_retraining"].get_task("evaluate").datasets == [heldout]


def test_a_line_is_served_under_this_dags_name(dags):
    template = dags["finetune_retraining"].get_task("deploy").served_model_name
    served = jinja2.Template(template).render(params={"line": "prod"})
    assert served == "finetune-retraining-prod"
    others = {dags["finetune_tutorial"].get_task("deploy").served_model_name}
    others.add(dags["finetune_ui"].get_task("deploy").served_model_name)
    for line in ("tutorial", "finetune-ui", "default"):
        assert jinja2.Template(template).render(params={"line": line}) not in others


@pytest.mark.parametrize(
    "dag_id", ["finetune_tutorial", "finetune_retraining", "finetune_retraining_data", "finetune_ui"]
)
def test_preflight_comes_before_every_other_task(dags, dag_id):
    dag = dags[dag_id]
    downstream = dag.get_task("preflight").get_flat_relative_ids(upstream=False)
    assert downstream == set(dag.task_ids) - {"preflight"}


def _tutorial_params(dag, **changes) -> dict:
    return {**{k: dag.params[k] for k in dag.params}, **changes}


def test_the_tutorial_preflight_checks_the_config_for_every_rank(monkeypatch, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    bag = _dags(monkeypatch, {"finetune_tutorial": {"model_id": str(model), "config": TINY}})
    dag = bag.dags["finetune_tutorial"]
    preflight = dag.get_task("preflight").python_callable
    params = _tutorial_params(dag, ranks=[16, 4, 4], max_steps=3, full_param_gpus=1)
    assert preflight(params=params, dag_run=None, dag=dag) == [4, 16]
    for changes, message in [
        ({"max_steps": 0}, "max_steps 0"),
        ({"model_id": "/etc"}, "model_id '/etc'"),
        ({"config": "/proc/self/environ"}, "config '/proc/self/environ': choose one of"),
        ({"data_script": "/proc/self/environ"}, "data_script '/proc/self/environ': choose one of"),
    ]:
        with pytest.raises(FinetuneConfigError, match=message):
            preflight(params=_tutorial_params(dag, **changes), dag_run=None, dag=dag)

    class Run:
        conf = {"heldout": 1}

    with pytest.raises(FinetuneConfigError, match="not params of this DAG"):
        preflight(params=params, dag_run=Run(), dag=dag)


CONFIG = (ROOT / TINY).read_text()


@pytest.mark.parametrize(
    ("run_conf", "setting"),
    [
        ({"model_args": {"trust_remote_code": True, "revision": SHA}}, "allow_trust_remote_code"),
        ({"model_args": {"attn_implementation": "kernels-community/flash-attn"}}, "allow_trust_remote_code"),
        ({"tokenizer": "someone/tokenizer"}, "allow_external_tokenizer"),
        ({"tokenizer": "/opt/tokenizer"}, "allow_external_tokenizer"),
    ],
)
def test_remote_code_and_outside_tokenizers_need_the_dags_setting(run_conf, setting):
    import yaml

    data = yaml.safe_load(CONFIG)
    for key, value in run_conf.items():
        if isinstance(value, dict):
            data["run_conf"].setdefault(key, {}).update(value)
        else:
            data["run_conf"][key] = value
    config = yaml.safe_dump(data)
    common = {
        "config": config,
        "overrides": [],
        "ranks": [4],
        "base_model": "s3://b/m",
        "datasets": ["s3://b/d.jsonl"],
    }
    with pytest.raises(FinetuneConfigError, match=rf'dag_defaults {{"my_dag": {{"{setting}": true}}}}'):
        check_configs(**common, trust=CodeTrust("my_dag"))
    allowed = CodeTrust(
        "my_dag", **{{"allow_trust_remote_code": "remote_code"}.get(setting, "external_tokenizer"): True}
    )
    assert check_configs(**common, trust=allowed) == [4]
    # a tokenizer in the bucket needs nothing
    data["run_conf"] = {k: v for k, v in data["run_conf"].items() if k not in ("tokenizer", "model_args")}
    data["run_conf"]["tokenizer"] = "s3://b/tokenizer"
    assert check_configs(**{**common, "config": yaml.safe_dump(data)}, trust=CodeTrust("my_dag")) == [4]


def test_the_ui_forms_config_files_stay_in_the_bundle(monkeypatch):
    errors = _dags(monkeypatch, {"finetune_ui": {"sft_config": "/etc/passwd"}}).import_errors
    [error] = errors.values()
    assert "dag_defaults.finetune_ui.sft_config" in error and "outside the DAG bundle" in error


@pytest.mark.parametrize("dag_id", ["finetune_tutorial", "finetune_retraining", "finetune_ui"])
def test_serving_tensor_parallel_size_is_its_own_param(dags, dag_id):
    dag = dags[dag_id]
    deploy = dag.get_task("deploy")
    assert (
        deploy.tensor_parallel_size == "{{ params.tensor_parallel_size }}"
        and deploy.gpus == "{{ params.gpus }}"
    )
    assert dag.params["tensor_parallel_size"] == 0  # auto: the largest power of two <= gpus
    assert _refused(dag, "tensor_parallel_size", -1)


@pytest.mark.parametrize(
    "gpus,tp,heads,expect",
    [(1, 0, None, 1), (6, 0, None, 4), (7, 0, 28, 4), (3, 0, None, 2), (8, 8, 32, 8), (6, 3, 12, 3)],
)
def test_check_serving_picks_a_tensor_parallel_size_that_fits(gpus, tp, heads, expect):
    from airflow_provider_finetune.preflight import check_serving

    assert check_serving(True, gpus, tp, runner="kubernetes", attention_heads=heads) == expect


def test_check_serving_refuses_what_cannot_serve():
    from airflow_provider_finetune.preflight import check_serving

    with pytest.raises(FinetuneConfigError, match="deploy is on with gpus 0"):
        check_serving(True, 0, 0, runner="kubernetes")
    assert check_serving(True, 0, 0, runner="local") == 1  # CPU vLLM on the worker
    assert check_serving(False, 0, 0, runner="kubernetes") == 0  # nothing served
    with pytest.raises(
        FinetuneConfigError, match=r"does not divide the model's 14 attention heads; use one of \[1, 2\]"
    ):
        check_serving(True, 4, 4, runner="kubernetes", attention_heads=14)
    with pytest.raises(FinetuneConfigError, match="tensor_parallel_size 4 > gpus 2"):
        check_serving(True, 2, 4, runner="kubernetes")


def test_the_tutorial_serves_a_trained_model_without_training(dags):
    dag = dags["finetune_tutorial"]
    gate = dag.get_task("want_training")
    assert gate.ignore_downstream_trigger_rules is True  # pick_best (all_done) is skipped too
    training = gate.get_flat_relative_ids(upstream=False)
    assert {"deliver_model", "sweep", "pick_best", "deploy"} <= training
    assert "serve_trained" not in training and "chat_trained" not in training
    serve = dag.get_task("serve_trained")
    assert (
        serve.model_uri == "{{ params.serve_model_uri }}" and "want_inference_only" in serve.upstream_task_ids
    )
    assert gate.python_callable(params={"inference_only": True}) is False
    assert dag.get_task("want_inference_only").python_callable(params={"inference_only": True}) is True
    preflight = dag.get_task("preflight").python_callable
    params = _tutorial_params(dag, inference_only=True, serve_model_uri="not-a-bucket", gpus=1)
    with pytest.raises(FinetuneConfigError, match="serve_model_uri"):
        preflight(params=params, dag_run=None, dag=dag)
    with pytest.raises(FinetuneConfigError, match="deploy is on with gpus 0"):
        preflight(params={**params, "gpus": 0}, dag_run=None, dag=dag)


def test_a_run_on_the_champions_own_training_data_is_skipped_unless_manual(dags):
    """`new_data` compares this run's data hash with the one the champion record holds (not with
    itself): the same content skips a scheduled or asset run, other content or no champion trains."""
    from types import SimpleNamespace

    new_data = dags["finetune_retraining"].get_task("new_data").python_callable
    champion = {"model_uri": "s3://finetune/champ", "train_data_sha256": "a" * 64, "promoted_at": "t"}
    params = {"line": "prod", "train_data": "s3://finetune/datasets/retrain/train.jsonl"}
    scheduled, manual = SimpleNamespace(run_type="scheduled"), SimpleNamespace(run_type="manual")
    assert new_data({**champion, "new_train_data_sha256": "a" * 64}, params, dag_run=scheduled) is False
    assert new_data({**champion, "new_train_data_sha256": "b" * 64}, params, dag_run=scheduled) is True
    assert new_data({**champion, "new_train_data_sha256": "a" * 64}, params, dag_run=manual) is True
    assert new_data({"model_uri": "", "new_train_data_sha256": "a" * 64}, params, dag_run=scheduled) is True
