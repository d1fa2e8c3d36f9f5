"""Client configuration from the standard environment; credential errors name the fix, never the secret."""

from __future__ import annotations

import pytest

from finetune_engine.storage import (
    MissingCredentialsError,
    StorageError,
    download_dir,
    is_complete,
    join,
    list_objects,
    make_client,
    upload_dir,
)

CANARY = "wrong-secret-canary-123"


@pytest.fixture()
def bare_env(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def test_missing_credentials_name_the_variables(bare_env, monkeypatch):
    with pytest.raises(MissingCredentialsError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        make_client()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someid")
    with pytest.raises(MissingCredentialsError, match="AWS_SECRET_ACCESS_KEY is not set"):
        make_client()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    with pytest.raises(MissingCredentialsError, match="AWS_ACCESS_KEY_ID is not set") as err:
        make_client()
    assert CANARY not in str(err.value)


def test_client_settings_from_env(bare_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1234")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    client = make_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:1234" and client.meta.region_name == "eu-west-3"
    config = client.meta.config
    assert config.s3["addressing_style"] == "path"
    assert config.retries == {"total_max_attempts": 10, "mode": "standard"}
    assert config.connect_timeout == 10 and config.read_timeout == 120
    assert make_client() is client  # cached per endpoint and credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert make_client() is not client


@pytest.mark.s3
def test_unreachable_endpoint_is_named(bare_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("FINETUNE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=r"s3://bkt/x: cannot reach the S3 endpoint http://127.0.0.1:9.*AWS_ENDPOINT_URL") as err:
        list_objects("s3://bkt/x")
    assert CANARY not in str(err.value)


@pytest.mark.s3
def test_wrong_credentials_give_a_clear_error_without_the_secret(s3_env, monkeypatch, tmp_path):
    uri = join(s3_env["uri"], "x")
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.txt").write_text("a")
    upload_dir(src, uri)
    for key_id, secret in ((s3_env["key"], CANARY), ("unknown-key-id", CANARY)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for action in (lambda: upload_dir(src, uri), lambda: download_dir(uri, tmp_path / "d"), lambda: is_complete(uri)):
            with pytest.raises(StorageError) as err:
                action()
            text = str(err.value)
            assert uri in text and "AWS_SECRET_ACCESS_KEY" in text and "denied" in text, text
            assert CANARY not in text and s3_env["secret"] not in text
            assert CANARY not in repr(err.value.__cause__) and err.value.__suppress_context__
