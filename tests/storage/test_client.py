"""Client configuration from the standard environment or an explicit session; credential errors name the
fix, never the secret."""

from __future__ import annotations

import pytest

from finetune_engine.manifest import MANIFEST_NAME
from finetune_engine.storage import (
    MissingCredentialsError,
    StorageError,
    delete_prefix,
    download_dir,
    download_file,
    ensure_bucket,
    exists,
    is_complete,
    join,
    list_children,
    list_complete_children,
    list_objects,
    make_client,
    put_bytes,
    read_bytes,
    session_client,
    upload_dir,
)

CANARY = "wrong-secret-canary-123"


@pytest.fixture()
def bare_env(monkeypatch, tmp_path):
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
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
    with pytest.raises(
        StorageError,
        match=r"s3://bkt/x: cannot reach the S3 endpoint http://127.0.0.1:9 after retries; "
        r"check AWS_ENDPOINT_URL",
    ) as err:
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
        for action in (
            lambda: upload_dir(src, uri),
            lambda: download_dir(uri, tmp_path / "d"),
            lambda: is_complete(uri),
        ):
            with pytest.raises(StorageError) as err:
                action()
            text = str(err.value)
            assert uri in text and "AWS_SECRET_ACCESS_KEY" in text and "denied" in text, text
            assert CANARY not in text and s3_env["secret"] not in text
            assert CANARY not in repr(err.value.__cause__) and err.value.__suppress_context__


def _signed_put_digests(monkeypatch, tmp_path, body: bytes, sha256: str | None) -> list[str]:
    """The X-Amz-Content-SHA256 of each PUT that ``upload_file`` sends (answered here, never sent)."""
    from botocore.awsrequest import AWSResponse

    from finetune_engine.storage import upload_file

    class Raw:
        def stream(self, **_):
            yield b""

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    sent: list[str] = []

    def answer(request, **_):
        value = request.headers["X-Amz-Content-SHA256"]
        sent.append(value.decode() if isinstance(value, bytes) else value)
        return AWSResponse(request.url, 200, {}, Raw())

    events = make_client().meta.events
    events.register("before-send.s3.PutObject", answer)
    try:
        path = tmp_path / "file.bin"
        path.write_bytes(body)
        upload_file(path, "s3://bkt/dir/file.bin", sha256=sha256)
    finally:
        events.unregister("before-send.s3.PutObject", answer)
    return sent


def test_single_put_signs_the_known_digest_without_hashing_the_body(bare_env, monkeypatch, tmp_path):
    import hashlib

    body = b"weights" * 1000
    # A digest that is not the body's: only the known value, never a re-hash, can end up signed.
    known = "ab" * 32
    assert _signed_put_digests(monkeypatch, tmp_path, body, known) == [known]
    # Without a known digest botocore hashes the body itself, as plain s3v4 does.
    assert _signed_put_digests(monkeypatch, tmp_path, body, None) == [hashlib.sha256(body).hexdigest()]


def test_known_digest_signer_keeps_botocore_rules_for_parts_and_unsigned_payloads():
    """Parts of a multipart upload are hashed by botocore as usual, and a configuration that turns
    payload signing off still gets UNSIGNED-PAYLOAD: the known digest replaces only a body hash."""
    import hashlib

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    from finetune_engine.storage import s3

    s3._register_signer()
    signer = botocore.auth.AUTH_TYPE_MAPS[s3.SIGNATURE_VERSION](
        Credentials("id", "secret"), "s3", "us-east-1"
    )
    known, body = "cd" * 32, b"part bytes"

    def payload(url: str, method: str = "PUT", **context) -> str:
        request = AWSRequest(method=method, url=url, data=body)
        request.context.update(context)
        s3._KNOWN_SHA256.value = known
        try:
            return signer.payload(request)
        finally:
            s3._KNOWN_SHA256.value = None

    assert payload("http://h/bkt/key") == known
    assert payload("http://h/bkt/key?partNumber=1&uploadId=u1") == hashlib.sha256(body).hexdigest()
    assert payload("http://h/bkt/key", method="POST") == hashlib.sha256(body).hexdigest()
    unsigned = Config(s3={"payload_signing_enabled": False})
    assert payload("http://h/bkt/key", client_config=unsigned) == botocore.auth.UNSIGNED_PAYLOAD


def test_session_client_takes_everything_from_the_session(bare_env, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    session = boto3.session.Session(
        aws_access_key_id="session-id",
        aws_secret_access_key="session-secret",
        aws_session_token="session-token",
        region_name="eu-central-1",
    )
    client = session_client(session, "http://127.0.0.1:1234")
    assert client.meta.endpoint_url == "http://127.0.0.1:1234" and client.meta.region_name == "eu-central-1"
    credentials = client._request_signer._credentials.get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "session-id",
        "session-secret",
        "session-token",
    )
    config = client.meta.config  # configured like the environment's client
    assert (
        config.s3["addressing_style"] == "path"
        and config.signature_version == make_client().meta.config.signature_version
    )
    assert config.retries == {"total_max_attempts": 10, "mode": "standard"}
    assert session_client(session, None, "us-west-2").meta.region_name == "us-west-2"


def test_session_client_without_credentials_names_their_source(bare_env):
    import boto3

    with pytest.raises(MissingCredentialsError, match="no bucket credentials in Airflow connection 'x'"):
        session_client(boto3.session.Session(), "http://127.0.0.1:9", where="Airflow connection 'x'")


@pytest.mark.s3
@pytest.mark.parametrize("s3_server", ["rclone"], indirect=True)
def test_an_explicit_client_does_every_operation_with_the_environment_pointing_elsewhere(
    s3_env, monkeypatch, tmp_path
):
    import boto3

    from finetune_engine.storage import s3

    session = boto3.session.Session(aws_access_key_id=s3_env["key"], aws_secret_access_key=s3_env["secret"])
    client = session_client(session, s3_env["endpoint"])
    for var, value in (
        ("AWS_ACCESS_KEY_ID", "wrong-id"),
        ("AWS_SECRET_ACCESS_KEY", CANARY),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("FINETUNE_S3_MAX_ATTEMPTS", "1"),
    ):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(s3, "CHUNK", 100_000)  # the 300 kB file comes in ranged GETs on worker threads
    calls: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "big.bin").write_bytes(bytes(range(256)) * 1200)
    (src / "config.json").write_text('{"a": 1}')
    uri = join(s3_env["uri"], "m")

    upload_dir(src, uri, client=client)
    assert is_complete(uri, client=client)
    assert sorted(list_objects(uri, client=client)) == sorted(["config.json", MANIFEST_NAME, "sub/big.bin"])
    assert list_children(s3_env["uri"], client=client) == ["m"]
    assert list_complete_children(s3_env["uri"], client=client) == ["m"]
    download_dir(uri, tmp_path / "dst", client=client)
    assert (tmp_path / "dst" / "sub" / "big.bin").read_bytes() == (src / "sub" / "big.bin").read_bytes()
    assert calls.count("GetObject") >= 4  # 3 ranges of big.bin, config.json, the manifest
    put_bytes(join(uri, "note.txt"), b"hi", client=client)
    assert read_bytes(join(uri, "note.txt"), client=client) == b"hi" and exists(
        join(uri, "note.txt"), client=client
    )
    assert read_bytes(join(uri, "absent.txt"), client=client) is None
    assert download_file(join(uri, "note.txt"), tmp_path / "note.txt", client=client)
    ensure_bucket(s3_env["bucket"], client=client)
    assert (
        delete_prefix(uri, client=client) == 3 and list_objects(uri, client=client) == {}
    )  # the manifest goes first
    # the environment's client (what a pod uses) is still the default, and here it points nowhere
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9 after") as err:
        list_objects(uri)
    assert CANARY not in str(err.value)
