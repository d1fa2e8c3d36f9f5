"""OCI artifacts against a real registry (distribution 2.8, htpasswd auth): push, pull byte for byte,
tag immutability, wrong password, a deleted blob, an unknown tag, a push cut off midway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from finetune_engine.cli.main import main as engine_main
from finetune_engine.manifest import MANIFEST_NAME, read_manifest, write_manifest
from finetune_engine.storage import oci
from tests.registry import PASSWORD

# --- references (no registry) ----------------------------------------------------------------------


def test_parse_reference():
    ref = oci.parse_oci("oci://registry.example.com:5000/team/adapters/llama-lora:v1")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "registry.example.com:5000",
        "team/adapters/llama-lora",
        "v1",
        None,
    )
    digest = "sha256:" + "a" * 64
    assert oci.parse_oci(f"oci://ghcr.io/org/data@{digest}").reference == digest
    assert oci.parse_oci("oci://localhost:5000/data").reference == "latest"
    with_path = oci.parse_oci("oci://ghcr.io/org/data:v2#train/chat.jsonl", allow_path=True)
    assert with_path.path == "train/chat.jsonl"
    assert str(with_path) == "oci://ghcr.io/org/data:v2#train/chat.jsonl"


@pytest.mark.parametrize(
    ("reference", "part"),
    [
        ("s3://bucket/model", "not an OCI reference"),
        ("oci://registry.example.com", "no repository"),
        ("oci://bad_host!/repo:v1", "registry 'bad_host!'"),
        ("oci://reg.io:99999/repo:v1", "registry 'reg.io:99999'"),
        ("oci://reg.io/Team/Repo:v1", "repository part 'Team'"),
        ("oci://reg.io/team//repo:v1", "repository part ''"),
        ("oci://reg.io/repo:-v1", "tag '-v1'"),
        ("oci://reg.io/repo@sha256:abc", "digest 'sha256:abc'"),
        ("oci://reg.io/repo:v1#data.jsonl", "not allowed here"),
    ],
)
def test_malformed_reference_names_the_part(reference, part):
    with pytest.raises(oci.OciInputError) as err:
        oci.parse_oci(reference)
    assert part in str(err.value)


def test_unsafe_file_part_is_refused():
    with pytest.raises(oci.OciInputError, match=r"file part '#\.\./x'"):
        oci.parse_oci("oci://reg.io/repo:v1#../x", allow_path=True)


# --- against the registry --------------------------------------------------------------------------


def _make_dir(root: Path, marker: str = "a") -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 4, "marker": marker}))
    (root / "weights.bin").write_bytes(os.urandom(70_000) + marker.encode())
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("nested file\n")
    return root


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = engine_main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_push_pull_byte_for_byte_and_tag_immutability(oci_registry, docker_config, tmp_path, capsys):
    src = _make_dir(tmp_path / "adapter")
    write_manifest(src)  # as the engine writes it for every output
    ref = oci_registry.ref("tests/adapter", "v1")

    code, out = _run(capsys, "oci-push", str(src), ref, "--plain-http")
    assert code == 0, out
    pushed = json.loads(out.strip().splitlines()[-1])
    assert pushed["status"] == "pushed" and pushed["digest"].startswith("sha256:")

    dest = tmp_path / "pulled" / "adapter"
    code, out = _run(capsys, "oci-pull", ref, str(dest), "--plain-http")
    assert code == 0, out
    assert _files(dest) == _files(src)
    assert (dest / MANIFEST_NAME).read_bytes() == (src / MANIFEST_NAME).read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["adapter"]  # no staging dir left beside it

    # the same content again: nothing moves; a pull into the complete copy keeps it
    again = oci.push(src, ref, plain_http=True)
    assert again["status"] == "unchanged" and again["digest"] == pushed["digest"]
    assert oci.pull(ref, dest, plain_http=True)["status"] == "present"

    # other content to the same tag: refused, the tag still points at the first push
    other = _make_dir(tmp_path / "other", marker="b")
    code, out = _run(capsys, "oci-push", str(other), ref, "--plain-http")
    assert code == 2
    assert "already holds other content" in out and "--force" in out and "Traceback" not in out
    assert oci.pull(ref, tmp_path / "still-v1", plain_http=True)["digest"] == pushed["digest"]

    # --force moves it; a pull by digest still gets the first content
    moved = oci.push(other, ref, force=True, plain_http=True)
    assert moved["digest"] != pushed["digest"]
    oci.pull(ref, tmp_path / "v1-now", plain_http=True)
    assert _files(tmp_path / "v1-now") == _files(other)
    by_digest = ref.rsplit(":", 1)[0] + "@" + pushed["digest"]
    oci.pull(by_digest, tmp_path / "by-digest", plain_http=True)
    assert _files(tmp_path / "by-digest") == _files(src)

    # a pull into a directory that holds something else is refused and leaves it alone
    with pytest.raises(oci.OciInputError, match="not empty"):
        oci.pull(ref, src, plain_http=True)
    assert read_manifest(src) is not None and _files(src)["adapter_config.json"].find(b'"a"') > 0


def test_wrong_password_and_missing_credentials(oci_registry, tmp_path, capsys, caplog, monkeypatch):
    src = _make_dir(tmp_path / "model")
    ref = oci_registry.ref("tests/denied", "v1")
    wrong = "wrong-" + PASSWORD[::-1]
    config = oci_registry.docker_config(tmp_path / "wrong", password=wrong)
    code, out = _run(capsys, "oci-push", str(src), ref, "--plain-http", "--docker-config", str(config))
    assert code == 2
    assert "refused the credentials" in out and "user 'finetune'" in out and str(config) in out
    assert "Traceback" not in out
    for text in (out, caplog.text):
        assert wrong not in text and PASSWORD not in text

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"auths": {}}')
    code, out = _run(capsys, "oci-pull", ref, str(tmp_path / "x"), "--plain-http")
    assert code == 2 and "needs credentials" in out and "has none for it" in out
    assert not (tmp_path / "x").exists()


def test_deleted_blob_fails_naming_it_and_writes_nothing(oci_registry, docker_config, tmp_path):
    src = _make_dir(tmp_path / "data")
    ref = oci_registry.ref("tests/damaged", "v1")
    oci.push(src, ref, plain_http=True)
    digest = "sha256:" + read_manifest_entry(src, "weights.bin")
    oci_registry.blob_path(digest).unlink()

    dest = tmp_path / "out" / "data"
    with pytest.raises(oci.OciBlobMissingError) as err:
        oci.pull(ref, dest, plain_http=True)
    assert "weights.bin" in str(err.value) and digest in str(err.value)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the staging dir is gone too


def read_manifest_entry(directory: Path, name: str) -> str:
    from finetune_engine.manifest import sha256_file

    return sha256_file(directory / name)


def test_unknown_tag_lists_the_tags(oci_registry, docker_config, tmp_path, capsys):
    src = _make_dir(tmp_path / "m")
    oci.push(src, oci_registry.ref("tests/tags", "v1"), plain_http=True)
    code, out = _run(
        capsys, "oci-pull", oci_registry.ref("tests/tags", "v9"), str(tmp_path / "o"), "--plain-http"
    )
    assert code == 2 and "not found" in out and "(tags: v1)" in out
    with pytest.raises(oci.OciNotFoundError, match="no repository tests/nothing"):
        oci.pull(oci_registry.ref("tests/nothing", "v1"), tmp_path / "o", plain_http=True)
    assert not (tmp_path / "o").exists()


def test_partial_push_leaves_no_tag_and_a_retry_completes(oci_registry, docker_config, tmp_path, monkeypatch):
    src = _make_dir(tmp_path / "adapter")
    ref = oci_registry.ref("tests/partial", "v1")
    real = oci.RegistryClient.upload_blob
    calls = []

    def cut_off(self, source, digest, size, name):
        if len(calls) == 1:
            raise oci.OciError("connection lost mid-push (simulated)")
        calls.append(name)
        return real(self, source, digest, size, name)

    monkeypatch.setattr(oci.RegistryClient, "upload_blob", cut_off)
    with pytest.raises(oci.OciError, match="simulated"):
        oci.push(src, ref, plain_http=True)
    with pytest.raises(oci.OciNotFoundError):  # the tag was never written
        oci.pull(ref, tmp_path / "o", plain_http=True)
    monkeypatch.setattr(oci.RegistryClient, "upload_blob", real)
    uploaded = []
    monkeypatch.setattr(
        oci.RegistryClient,
        "upload_blob",
        lambda self, source, digest, size, name: (
            uploaded.append(name) or real(self, source, digest, size, name)
        ),
    )
    assert oci.push(src, ref, plain_http=True)["status"] == "pushed"
    assert calls[0] not in uploaded  # the blob sent before the cut is not sent again
    oci.pull(ref, tmp_path / "o", plain_http=True)
    assert _files(tmp_path / "o") == _files(src)


def test_transient_errors_are_retried(oci_registry, docker_config, tmp_path, monkeypatch):
    src = _make_dir(tmp_path / "m")
    real = requests.Session.request
    failures = {"left": 2}

    def flaky(self, method, url, *args, **kwargs):
        if "/manifests/" in url and failures["left"]:
            failures["left"] -= 1
            raise requests.ConnectionError("connection reset (simulated)")
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", flaky)
    monkeypatch.setattr(oci, "RETRY_BACKOFF_S", 0.01)
    result = oci.push(src, oci_registry.ref("tests/flaky", "v1"), plain_http=True, attempts=3)
    assert result["status"] == "pushed" and failures["left"] == 0
