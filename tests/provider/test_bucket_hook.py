"""The bucket from Airflow: one hook on the amazon provider's AwsBaseHook, credentials passed to the
engine's storage calls as an explicit client, and the worker's os.environ never touched."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta

import pytest

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.hooks import (
    BucketConnectionError,
    BucketHook,
    ConnectionSecretResolver,
    SecretNames,
)

ROLE = "arn:aws:iam::123456789012:role/finetune-bucket"


class VLLMNotStarted(Exception):
    pass


def frozen(client):
    return client._request_signer._credentials.get_frozen_credentials()


@pytest.fixture()
def bare_aws(monkeypatch, tmp_path):
    """No AWS credentials, profile or config from the machine running the tests."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def connection(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "aws", **fields}))


def test_keys_session_token_region_and_endpoint_reach_the_client(bare_aws, monkeypatch):
    connection(
        monkeypatch,
        "tok",
        login="key-id",
        password="key-secret",
        extra={
            "aws_session_token": "session-token",
            "region_name": "eu-west-3",
            "service_config": {"s3": {"endpoint_url": "http://127.0.0.1:9"}},
        },
    )
    hook = BucketHook("tok")
    client = hook.storage_client
    assert (frozen(client).access_key, frozen(client).secret_key, frozen(client).token) == (
        "key-id",
        "key-secret",
        "session-token",
    )
    assert client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "eu-west-3"
    assert (
        client.meta.config.s3["addressing_style"] == "path"
    )  # the engine's client config, not boto3's default
    assert hook.storage_client is client  # built once per hook
    assert hook.env() == {
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "key-secret",
        "AWS_SESSION_TOKEN": "session-token",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }


def test_a_profile_named_by_the_connection_supplies_keys_and_region(bare_aws, monkeypatch):
    (bare_aws / "aws-credentials").write_text(
        "[team]\naws_access_key_id = profile-id\naws_secret_access_key = profile-secret\n"
    )
    (bare_aws / "aws-config").write_text("[profile team]\nregion = eu-north-1\n")
    connection(monkeypatch, "prof", extra={"profile_name": "team", "endpoint_url": "http://127.0.0.1:9"})
    client = BucketHook("prof").storage_client
    assert (frozen(client).access_key, frozen(client).secret_key) == ("profile-id", "profile-secret")
    assert client.meta.region_name == "eu-north-1"
    assert BucketHook("prof").env()["AWS_DEFAULT_REGION"] == "eu-north-1"


def test_a_role_arn_is_assumed_through_the_amazon_provider_session_factory(bare_aws, monkeypatch):
    from airflow.providers.amazon.aws.hooks.base_aws import BaseSessionFactory

    connection(
        monkeypatch,
        "role",
        login="base-id",
        password="base-secret",
        extra={"role_arn": ROLE, "endpoint_url": "http://127.0.0.1:9"},
    )
    asked: list[tuple[str | None, str]] = []

    def fake_sts(factory):  # stands in for the STS call; what it is asked is the point
        asked.append((factory.role_arn, factory.conn.assume_role_method))
        return {
            "access_key": "assumed-id",
            "secret_key": "assumed-secret",
            "token": "assumed-token",
            "expiry_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        }

    monkeypatch.setattr(BaseSessionFactory, "_refresh_credentials", fake_sts)
    hook = BucketHook("role")
    client = hook.storage_client
    assert asked == [(ROLE, "assume_role")]
    assert (frozen(client).access_key, frozen(client).token) == (
        "assumed-id",
        "assumed-token",
    )  # not the base keys
    env = ConnectionSecretResolver(SecretNames("finetune-bucket", "hf-token"), "role", "hf").bucket()
    assert env["AWS_ACCESS_KEY_ID"] == "assumed-id" and env["AWS_SESSION_TOKEN"] == "assumed-token"


def test_a_missing_connection_or_one_without_credentials_is_named(bare_aws, monkeypatch):
    with pytest.raises(BucketConnectionError, match=r"'nowhere' .*is not defined.*AIRFLOW_CONN_NOWHERE"):
        BucketHook("nowhere").storage_client  # noqa: B018 - the property builds the client
    assert issubclass(BucketConnectionError, FinetuneConfigError)  # not retried
    connection(monkeypatch, "empty", extra={"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(BucketConnectionError, match=r"no bucket credentials in Airflow connection 'empty'"):
        BucketHook("empty").storage_client  # noqa: B018


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from finetune_engine.storage.local_server import ensure_running, stop

    root = tmp_path_factory.mktemp("s3")
    values = ensure_running(root)
    yield values
    stop(root)


def test_champion_preflight_and_result_reading_leave_os_environ_alone(
    s3_server, bare_aws, monkeypatch, tmp_path
):
    from airflow_provider_finetune.champion import ChampionStore, decide
    from airflow_provider_finetune.operators import FinetuneKubernetesOperator
    from airflow_provider_finetune.preflight import check_inputs
    from finetune_engine.storage import join, put_bytes, upload_dir
    from tests.provider.test_operators import CONFIG

    monkeypatch.setenv(
        "AIRFLOW_CONN_TEAM_BUCKET",
        json.dumps(
            {
                "conn_type": "aws",
                "login": s3_server["AWS_ACCESS_KEY_ID"],
                "password": s3_server["AWS_SECRET_ACCESS_KEY"],
                "extra": {"endpoint_url": s3_server["AWS_ENDPOINT_URL"]},
            }
        ),
    )
    # the worker's own variables point nowhere: only the connection can reach the bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    bucket = f"s3://{s3_server['FINETUNE_BUCKET']}"
    client = BucketHook("team_bucket").storage_client
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    upload_dir(model, join(bucket, "models", "tiny"), client=client)
    line = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    put_bytes(join(bucket, "datasets", "chat.jsonl"), (json.dumps(line) + "\n").encode(), client=client)
    put_bytes(
        join(bucket, "runs", "r1", "result.json"),
        b'{"status": "completed", "final_eval_loss": 0.5}',
        client=client,
    )

    from airflow_provider_finetune.operators import deploy as deploy_module
    from airflow_provider_finetune.operators.deploy import DeployVLLMOperator

    monkeypatch.setenv("AIRFLOW__FINETUNE__VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_WORKDIR", str(tmp_path / "work"))

    def no_vllm(*args, **kwargs):
        raise VLLMNotStarted

    monkeypatch.setattr(deploy_module, "start_vllm", no_vllm)
    writes: list[str] = []
    real_set, real_del = os._Environ.__setitem__, os._Environ.__delitem__
    monkeypatch.setattr(
        os._Environ, "__setitem__", lambda env, k, v: (writes.append(k), real_set(env, k, v))[1]
    )
    monkeypatch.setattr(os._Environ, "__delitem__", lambda env, k: (writes.append(k), real_del(env, k))[1])
    before = dict(os.environ)

    store = ChampionStore(s3_server["FINETUNE_BUCKET"], "line", "team_bucket")
    assert store.read() is None
    store.record(
        "run-1",
        decide([{"model_uri": "s3://b/c", "eval_loss": 1.0}], "s3://b/c", None),
        {"model_uri": "s3://b/c", "config": "a: 1\n"},
    )
    assert store.read()["model_uri"] == "s3://b/c"
    ranks = check_inputs(
        model_uri=join(bucket, "models", "tiny"),
        dataset_uri=join(bucket, "datasets", "chat.jsonl"),
        method="sft",
        config=CONFIG,
        overrides=[],
        ranks=[8, 4, 8],
        conn_id="team_bucket",
        workdir=tmp_path / "preflight",
    )
    assert ranks == [4, 8]
    op = FinetuneKubernetesOperator(task_id="t", config=CONFIG, bucket_conn_id="team_bucket")
    assert op.read_remote_result(join(bucket, "runs", "r1")) == {
        "status": "completed",
        "final_eval_loss": 0.5,
    }
    # the deploy operator's local path pulls the model and adapters the same way (vLLM itself is not
    # started here)
    deploy = DeployVLLMOperator(
        task_id="serve",
        served_model_name="tiny",
        model_uri=join(bucket, "models", "tiny"),
        adapters={"a": join(bucket, "models", "tiny")},
        adapter_ranks={"a": 8},
        bucket_conn_id="team_bucket",
    )
    with pytest.raises(VLLMNotStarted):
        deploy.execute_local({})
    assert (deploy.local_dir() / "model" / "config.json").read_text() == "{}"
    assert (deploy.local_dir() / "adapters" / "a" / "config.json").is_file()

    assert writes == [] and dict(os.environ) == before
    assert (
        os.environ["AWS_ACCESS_KEY_ID"] == "worker-id"
        and os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    )
