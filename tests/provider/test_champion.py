"""Champion/challenger decisions, the champion record in a real S3 bucket, sweep selection and the
form's preflight helpers."""

from __future__ import annotations

import json
import math

import pytest

from airflow_provider_finetune.champion import ChampionStore, decide, tag_mlflow_run
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.preflight import check_conf_keys, form_overrides
from airflow_provider_finetune.selection import NoRunFinished, pick_best
from finetune_engine.storage import list_objects, put_bytes, read_bytes

CH, CP = "s3://b/challenger", "s3://b/champion"


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [
        (1.0, None, 0.0, True),  # a new line: the first challenger becomes champion
        (0.9, 1.0, 0.0, True),
        (1.0, 1.0, 0.0, False),  # a tie keeps the champion
        (1.1, 1.0, 0.0, False),
        (0.95, 1.0, 0.1, False),  # better, but not by the required margin
        (0.85, 1.0, 0.1, True),
        (math.nan, 1.0, 0.0, False),
    ],
)
def test_decide(challenger, champion, margin, promoted):
    scores = [{"model_uri": CH, "eval_loss": challenger}] + (
        [{"model_uri": CP, "eval_loss": champion}] if champion else []
    )
    d = decide(scores, CH, CP if champion else None, margin)
    assert d.promoted is promoted, d.reason
    assert d.challenger_loss == challenger or math.isnan(challenger)
    if champion is not None and not math.isnan(challenger):
        assert d.improvement == pytest.approx(champion - challenger)


def test_decide_refuses_scores_that_miss_a_model():
    with pytest.raises(ValueError, match="no score for the champion"):
        decide([{"model_uri": CH, "eval_loss": 1.0}], CH, CP)
    with pytest.raises(ValueError, match="no score for the challenger"):
        decide([{"model_uri": CP, "eval_loss": 1.0}], CH, CP)


def test_model_line_names_are_checked():
    for bad in ("", "../x", "a/b", "-lead", "x" * 200):
        with pytest.raises(FinetuneConfigError, match="model line"):
            ChampionStore("finetune", bad, "aws_default")


@pytest.fixture()
def bucket_conn(tmp_path, monkeypatch):
    from airflow_provider_finetune.hooks import bucket_connection_json
    from finetune_engine.storage.local_server import ensure_running, stop

    s3 = ensure_running(tmp_path / "s3")
    monkeypatch.setenv("AIRFLOW_CONN_CHAMPION_TEST", bucket_connection_json(s3))
    yield s3
    stop(tmp_path / "s3")


def test_champion_record_roundtrip_in_a_real_bucket(bucket_conn):
    store = ChampionStore(bucket_conn["FINETUNE_BUCKET"], "line-1", "champion_test")
    assert store.read() is None
    first = decide([{"model_uri": CH, "eval_loss": 1.2}], CH, None)
    where = store.record("manual__2026-01-01T00:00:00+00:00", first, {"model_uri": CH, "config": "a: 1\n"})
    assert where.endswith("/champions/line-1/decisions/manual__2026-01-01T00-00-00-00-00.json")
    record = store.read()
    assert record["model_uri"] == CH and record["eval_loss"] == 1.2 and record["config"] == "a: 1\n"
    # a rejected challenger is recorded but leaves the champion in place
    second = decide(
        [{"model_uri": "s3://b/c2", "eval_loss": 1.5}, {"model_uri": CH, "eval_loss": 1.2}], "s3://b/c2", CH
    )
    store.record("run-2", second, {"model_uri": "s3://b/c2", "config": "a: 2\n"})
    assert store.read()["model_uri"] == CH
    client, decisions = store._client(), f"s3://{bucket_conn['FINETUNE_BUCKET']}/champions/line-1/decisions"
    assert len(list_objects(decisions, client=client)) == 2
    kept = json.loads(read_bytes(f"{decisions}/run-2.json", client=client))
    assert kept["promoted"] is False and kept["champion_loss"] == 1.2 and "does not beat" in kept["reason"]


def test_a_broken_champion_record_is_named(bucket_conn):
    store = ChampionStore(bucket_conn["FINETUNE_BUCKET"], "broken", "champion_test")
    put_bytes(store.uri, b"{not json", client=store._client())
    with pytest.raises(
        FinetuneConfigError, match=r"champions/broken/champion.json is not valid JSON.*delete it"
    ):
        store.read()


def test_mlflow_tagging_never_raises_when_tracking_is_off_or_down():
    assert tag_mlflow_run(None, "r", {"k": "v"}) is False
    assert (
        tag_mlflow_run("http://127.0.0.1:9", "r", {"k": "v"}, timeout=2) is False
    )  # nothing listens on port 9


def test_mlflow_tagging_sets_tags_on_a_real_server(mlflow_server):
    import requests

    exp = requests.post(
        f"{mlflow_server}/api/2.0/mlflow/experiments/create", json={"name": "tags"}, timeout=30
    ).json()
    run = requests.post(
        f"{mlflow_server}/api/2.0/mlflow/runs/create",
        json={"experiment_id": exp["experiment_id"]},
        timeout=30,
    ).json()["run"]["info"]["run_id"]
    assert (
        tag_mlflow_run(mlflow_server, run, {"finetune.decision": "promoted", "finetune.champion_loss": 1.5})
        is True
    )
    tags = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": run}, timeout=30).json()
    assert {"key": "finetune.decision", "value": "promoted"} in tags["run"]["data"]["tags"]
    assert tag_mlflow_run(mlflow_server, "no-such-run", {"k": "v"}) is False


def test_pick_best_lowest_loss_ties_to_smaller_rank_failed_ranks_named():
    results = [
        {"lora_rank": 16, "final_eval_loss": 0.5},
        None,
        {"lora_rank": 4, "final_eval_loss": 0.5},
        {"lora_rank": 32, "final_eval_loss": float("nan")},
        {"lora_rank": 64, "final_eval_loss": 0.7},
    ]
    best, summary = pick_best(results, [4, 8, 16, 32, 64])
    assert best["lora_rank"] == 4
    assert "failed ranks: [8, 32]" in summary and "best: r=4" in summary
    with pytest.raises(NoRunFinished, match=r"failed lora_ranks: \[4, 8\]"):
        pick_best([None, {"lora_rank": 8}], [4, 8])


def test_unknown_conf_keys_are_refused_with_a_suggestion():
    params = {"lora_ranks": 1, "learning_rate": 1}
    check_conf_keys({"lora_ranks": [4]}, params)
    check_conf_keys(None, params)
    with pytest.raises(FinetuneConfigError, match=r"'lora_rank' \(did you mean 'lora_ranks'\?\)"):
        check_conf_keys({"lora_rank": [4]}, params)


def test_form_overrides():
    assert form_overrides({"learning_rate": 0.001, "epochs": 2, "max_steps": -1}) == [
        "training_args.learning_rate=0.001",
        "training_args.num_train_epochs=2",
    ]
    assert (
        form_overrides({"learning_rate": 1e-4, "epochs": 1, "max_steps": 7})[-1]
        == "training_args.max_steps=7"
    )


def test_a_line_is_scored_on_the_held_out_set_its_champion_pins():
    store = ChampionStore("finetune", "line-h", "aws_default")
    pinned = {"model_uri": CP, "config": "a: 1\n", "heldout_data": "s3://b/heldout.jsonl"}
    store.check_heldout(None, "s3://b/any.jsonl")  # a new line takes any set, its first promotion pins it
    store.check_heldout(pinned, "s3://b/heldout.jsonl")
    with pytest.raises(
        FinetuneConfigError,
        match=r"scored on s3://b/heldout.jsonl .* but this challenger is scored on s3://b/other.jsonl",
    ):
        store.check_heldout(pinned, "s3://b/other.jsonl")
    with pytest.raises(FinetuneConfigError, match="pins no held-out set"):
        store.check_heldout({"model_uri": CP, "config": "a: 1\n"}, "s3://b/heldout.jsonl")


def test_a_challenger_on_another_held_out_set_is_refused_before_anything_is_written(bucket_conn):
    store = ChampionStore(bucket_conn["FINETUNE_BUCKET"], "pinned", "champion_test")
    first = decide([{"model_uri": CP, "eval_loss": 1.0}], CP, None)
    store.record("run-1", first, {"model_uri": CP, "config": "a: 1\n", "heldout_data": "s3://b/h1.jsonl"})
    better = decide([{"model_uri": CH, "eval_loss": 0.1}, {"model_uri": CP, "eval_loss": 1.0}], CH, CP)
    with pytest.raises(FinetuneConfigError, match="cannot be compared"):
        store.record(
            "run-2", better, {"model_uri": CH, "config": "a: 2\n", "heldout_data": "s3://b/h2.jsonl"}
        )
    decisions = f"s3://{bucket_conn['FINETUNE_BUCKET']}/champions/pinned/decisions"
    assert list(list_objects(decisions, client=store._client())) == ["run-1.json"]
    assert store.read()["model_uri"] == CP and store.read()["heldout_data"] == "s3://b/h1.jsonl"
    # on the pinned set it is compared and promoted
    store.record("run-3", better, {"model_uri": CH, "config": "a: 2\n", "heldout_data": "s3://b/h1.jsonl"})
    assert store.read()["model_uri"] == CH


def test_unchanged_training_data_is_recognised_by_its_content_hash(bucket_conn):
    """A scheduled run on the content the champion was trained on is skipped; new content is not."""
    import hashlib

    store = ChampionStore(bucket_conn["FINETUNE_BUCKET"], "line-d", "champion_test")
    uri = f"s3://{bucket_conn['FINETUNE_BUCKET']}/datasets/retrain/train.jsonl"
    body = b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 1000
    put_bytes(uri, body, client=store._client())
    sha = store.data_sha256(uri, chunk=4096)  # several chunks
    assert sha == hashlib.sha256(body).hexdigest()
    champion = {"model_uri": CH, "train_data_sha256": sha, "promoted_at": "2026-12-01T04:00:00+00:00"}
    assert "nothing new to learn" in store.unchanged_data(champion, uri, sha)
    put_bytes(uri, body + b'{"messages": []}\n', client=store._client())
    assert store.unchanged_data(champion, uri, store.data_sha256(uri)) is None
    assert store.unchanged_data({"model_uri": CH}, uri, sha) is None  # a record from before data hashes
    assert store.unchanged_data(None, uri, sha) is None
    with pytest.raises(FinetuneConfigError, match="cannot read .*missing.jsonl"):
        store.data_sha256(f"s3://{bucket_conn['FINETUNE_BUCKET']}/datasets/missing.jsonl")
