"""The pod jobs against real S3 servers: deliver model and data, train, merge (the kill trials are in
test_faults.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_engine.jobs.deliver_data import deliver_data
from finetune_engine.jobs.deliver_model import DeliveryError, deliver_model
from finetune_engine.jobs.train import main as train_job
from finetune_engine.manifest import MANIFEST_NAME
from finetune_engine.manifest import read_manifest as local_manifest
from finetune_engine.storage import (
    download_dir,
    is_complete,
    join,
    list_complete_children,
    list_objects,
    read_manifest,
)
from finetune_engine.storage.lease import LEASE_NAME, PrefixLease
from tests.storage.conftest import train_config

pytestmark = pytest.mark.s3


# -- deliver-model ----------------------------------------------------------------------------------


def test_deliver_model_from_directory_is_idempotent(s3_env, tiny_model_dir, tmp_path):
    dest = join(s3_env["uri"], "models", "local", "tiny")
    first = deliver_model(str(tiny_model_dir), dest)
    assert first["status"] == "delivered" and is_complete(dest)
    stamp = read_manifest(dest)["created"]
    assert deliver_model(str(tiny_model_dir), dest)["status"] == "skipped"
    assert read_manifest(dest)["created"] == stamp  # nothing re-uploaded
    with pytest.raises(DeliveryError, match="--overwrite"):
        deliver_model(str(tiny_model_dir), dest, revision="other")
    assert deliver_model(str(tiny_model_dir), dest, revision="other", overwrite=True)["status"] == "delivered"
    # A retry with overwrite of the same source, revision and files keeps the complete copy.
    stamp = read_manifest(dest)["created"]
    assert deliver_model(str(tiny_model_dir), dest, revision="other", overwrite=True)["status"] == "skipped"
    assert read_manifest(dest)["created"] == stamp


def test_deliver_model_refuses_symlinks_out_of_the_source(s3_env, tiny_model_dir, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("not for the bucket")
    (src / "notes.txt").symlink_to(secret)
    dest = join(s3_env["uri"], "models", "linked")
    with pytest.raises(DeliveryError, match=r"notes.txt is a symlink to .*id_rsa, outside the source"):
        deliver_model(str(src), dest)
    assert list_objects(dest) == {}


def _fake_hub_cache(
    cache: Path, repo: str, files: dict[str, bytes], ref: str = "main", commit: str = "1" * 40
) -> str:
    """The huggingface_hub cache layout (blobs, snapshots/<commit>, refs/<ref>), offline."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def test_deliver_model_from_hub_cache_offline(s3_env, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"weights" * 100,
        "pytorch_model.bin": b"pickle" * 100,
        "original/consolidated.pth": b"raw" * 100,
    }
    commit = _fake_hub_cache(cache, "org/tiny-chat", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = join(s3_env["uri"], "models", "org", "tiny-chat")
    result = deliver_model("org/tiny-chat", dest, exclude=["original/*"])
    assert result["commit"] == commit
    names = sorted(list_objects(dest))
    assert names == sorted([MANIFEST_NAME, "config.json", "model.safetensors"])  # no pickle, no original/
    assert read_manifest(dest)["extra"]["source"] == "org/tiny-chat"


def test_deliver_model_hub_revisions_and_token_offline(s3_env, tmp_path, monkeypatch, caplog):
    """A tag and a commit resolve to their own snapshots; the same revision is skipped, another one needs
    --overwrite; HF_TOKEN reaches snapshot_download and is written nowhere."""
    import logging

    import huggingface_hub

    cache = tmp_path / "hub"
    main_commit = _fake_hub_cache(
        cache, "org/rev", {"config.json": b'{"v": "main"}', "model.safetensors": b"main" * 50}
    )
    v1_commit = _fake_hub_cache(
        cache,
        "org/rev",
        {"config.json": b'{"v": 1}', "model.safetensors": b"v1" * 80},
        ref="v1",
        commit="2" * 40,
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_offline_canary_token")
    seen = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):  # records what deliver-model passes, then the real offline download
        seen.append({"revision": kwargs.get("revision"), "token": kwargs.get("token")})
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    caplog.set_level(logging.DEBUG)
    dest = join(s3_env["uri"], "models", "org", "rev")
    result = deliver_model("org/rev", dest, revision="v1")
    assert seen[-1] == {"revision": "v1", "token": "hf_offline_canary_token"}
    assert result["commit"] == v1_commit and result["revision"] == "v1"
    manifest = read_manifest(dest)
    assert manifest["extra"] == {"source": "org/rev", "revision": "v1", "commit": v1_commit}
    body = (
        s3_env["server"]
        .client()
        .get_object(Bucket=s3_env["bucket"], Key="models/org/rev/config.json")["Body"]
        .read()
    )
    assert body == b'{"v": 1}'
    assert deliver_model("org/rev", dest, revision="v1")["status"] == "skipped"
    with pytest.raises(DeliveryError, match="--overwrite"):
        deliver_model("org/rev", dest)  # main is another revision
    by_commit = join(s3_env["uri"], "models", "org", "rev-main")
    assert deliver_model("org/rev", by_commit, revision=main_commit)["commit"] == main_commit
    body = (
        s3_env["server"]
        .client()
        .get_object(Bucket=s3_env["bucket"], Key="models/org/rev-main/config.json")["Body"]
        .read()
    )
    assert body == b'{"v": "main"}'
    with pytest.raises(Exception, match="(?i)revision|offline|not found|cannot find"):
        deliver_model("org/rev", join(s3_env["uri"], "models", "nope"), revision="v9")
    stored = "".join(json.dumps(read_manifest(u)) for u in (dest, by_commit))
    assert "hf_offline_canary_token" not in stored + caplog.text + json.dumps(result)


def test_deliver_model_from_another_bucket_prefix(s3_env, tiny_model_dir, tmp_path):
    src = join(s3_env["uri"], "models", "staging", "tiny")
    deliver_model(str(tiny_model_dir), src)
    dest = join(s3_env["uri"], "models", "prod", "tiny")
    result = deliver_model(src, dest, exclude=["tokenizer.json"])
    assert result == {"status": "delivered", "destination": dest, "source": src, "revision": "main"}
    src_objects, dest_objects = list_objects(src), list_objects(dest)
    assert sorted(dest_objects) == sorted(k for k in src_objects if k != "tokenizer.json")
    assert all(dest_objects[k] == src_objects[k] for k in dest_objects if k != MANIFEST_NAME)
    assert read_manifest(dest)["extra"] == {"source": src, "revision": "main"}
    download_dir(dest, tmp_path / "copy")  # verified against the new manifest
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()
    assert deliver_model(src, dest)["status"] == "skipped"
    with pytest.raises(Exception, match="not complete"):
        deliver_model(join(s3_env["uri"], "models", "absent"), join(s3_env["uri"], "models", "x"))


def test_deliver_model_refuses_pickle_only(s3_env, tmp_path):
    src = tmp_path / "pickle-model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x" * 10)
    with pytest.raises(DeliveryError, match="--allow-pickle"):
        deliver_model(str(src), join(s3_env["uri"], "models", "p"))
    assert list_objects(join(s3_env["uri"], "models", "p")) == {}
    deliver_model(str(src), join(s3_env["uri"], "models", "p"), allow_pickle=True)
    assert "pytorch_model.bin" in list_objects(join(s3_env["uri"], "models", "p"))


# -- deliver-data -----------------------------------------------------------------------------------

GOOD_SCRIPT = """
import json, os
out = os.environ["FINETUNE_DATA_DIR"]
with open(os.path.join(out, "chat.jsonl"), "w") as f:
    for i in range(5):
        row = {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        f.write(json.dumps(row) + "\\n")
"""


def test_deliver_data_script_uploads_validated_files(s3_env):
    dest = join(s3_env["uri"], "datasets")
    result = deliver_data(dest, script=GOOD_SCRIPT)
    assert result["files"] == [join(dest, "chat.jsonl")] and result["examples"] == {"chat.jsonl": 5}
    assert list(list_objects(dest)) == ["chat.jsonl"]


def test_deliver_data_takes_json_array_files(s3_env):
    """Silogen engine data scripts (and its end-to-end tests) may write one JSON array per file."""
    script = """
import json, os
rows = [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}"}], "data_source": "x"} for i in range(3)]
with open(os.path.join(os.environ["FINETUNE_DATA_DIR"], "chat.json"), "w") as f:
    json.dump(rows, f, indent=2)
"""
    dest = join(s3_env["uri"], "datasets-array")
    result = deliver_data(dest, script=script)
    assert result["examples"] == {"chat.json": 3}
    assert list(list_objects(dest)) == ["chat.json"]


def test_deliver_data_pulls_one_file_of_an_oci_artifact(
    s3_env, oci_registry, docker_config, tmp_path, monkeypatch
):
    """``oci://REG/REPO:TAG#FILE``: that file, verified, validated and uploaded under its name; the
    registry's address is checked like a URL's; several files and no '#FILE' upload nothing."""
    from finetune_engine.jobs.deliver_data import DeliveryError as DataDeliveryError
    from finetune_engine.storage import oci

    monkeypatch.setenv(oci.PLAIN_HTTP_ENV, "1")
    art = tmp_path / "data"
    (art / "train").mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (art / "train" / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(4)))
    (art / "eval.jsonl").write_text(json.dumps(row) + "\n")
    ref = oci_registry.ref("datasets/chat", s3_env["kind"])
    oci.push(art, ref)
    dest = join(s3_env["uri"], "datasets-oci")
    with pytest.raises(DataDeliveryError, match=r"oci://127\.0\.0\.1.*loopback"):  # a loopback registry
        deliver_data(dest, urls=[f"{ref}#train/chat.jsonl"])
    with pytest.raises(DataDeliveryError, match="several files; name one with '#FILE'"):
        deliver_data(dest, urls=[ref], allow_private_urls=True)
    assert list(list_objects(dest)) == []
    result = deliver_data(dest, urls=[f"{ref}#train/chat.jsonl"], allow_private_urls=True)
    assert result["files"] == [join(dest, "chat.jsonl")] and result["examples"] == {"chat.jsonl": 4}
    from finetune_engine.storage import download_file

    download_file(join(dest, "chat.jsonl"), tmp_path / "back" / "chat.jsonl")
    assert (tmp_path / "back" / "chat.jsonl").read_bytes() == (art / "train" / "chat.jsonl").read_bytes()


def test_data_script_sees_no_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_123")
    script = (
        GOOD_SCRIPT
        + """
env = dict(os.environ)
with open(os.path.join(out, "env.jsonl"), "w") as f:
    f.write(json.dumps({"text": json.dumps(env)}) + "\\n")
"""
    )
    dest = join(s3_env["uri"], "datasets")
    deliver_data(dest, script=script)
    import boto3  # noqa: F401 - the server client below

    body = (
        s3_env["server"]
        .client()
        .get_object(Bucket=s3_env["bucket"], Key="datasets/env.jsonl")["Body"]
        .read()
        .decode()
    )
    seen = json.loads(json.loads(body)["text"])
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "AWS_ENDPOINT_URL"):
        assert secret not in seen
    assert s3_env["server"].secret not in body and "hf_canary_token_123" not in body


PEEK_SCRIPT = (
    GOOD_SCRIPT
    + """
import subprocess, sys
report = {}
try:
    report["environ"] = open(f"/proc/{os.getppid()}/environ", "rb").read().decode(errors="replace")
except OSError as err:
    report["error"] = type(err).__name__
# a daemon that leaves the script's process group and outlives it
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
report["daemon"] = daemon.pid
with open(os.path.join(out, "report.jsonl"), "w") as f:
    f.write(json.dumps({"text": json.dumps(report)}) + "\\n")
"""
)


def test_data_script_cannot_read_the_jobs_environment_and_leaves_no_process(s3_env, tmp_path):
    """The job (its own process, as in a pod: no capabilities) is non-dumpable while its
    script runs: the script's read of /proc/<parent>/environ, where the bucket keys are, fails; the
    upload still works, and what the script started, even outside its process group, is gone when
    the job ends."""
    dest = join(s3_env["uri"], "datasets")
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    # with capabilities (root) any process's environment is readable: drop them all, as pods do
    no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    proc = subprocess.run(
        [*no_caps, sys.executable, "-m", "finetune_engine.jobs.deliver_data", dest],
        env={**os.environ, "FINETUNE_DATA_SCRIPT": PEEK_SCRIPT, "HOME": str(home), "TMPDIR": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(list_objects(dest)) == ["chat.jsonl", "report.jsonl"]
    body = s3_env["server"].client().get_object(Bucket=s3_env["bucket"], Key="datasets/report.jsonl")
    text = body["Body"].read().decode()
    seen = json.loads(json.loads(text)["text"])
    assert seen.get("error") == "PermissionError" and "environ" not in seen, seen
    assert s3_env["secret"] not in text
    stat = Path(f"/proc/{seen['daemon']}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize(
    "script,match",
    [
        (GOOD_SCRIPT + "\nopen(os.path.join(out, 'bad.jsonl'), 'w').write('{oops\\n')\n", "bad JSON"),
        ("import sys; sys.exit(3)\n", "exited with 3"),
        ("pass\n", "no files were produced"),
        (GOOD_SCRIPT + "\nopen(os.path.join(out, 'notes.txt'), 'w').write('x')\n", "only .jsonl"),
        ("import time; time.sleep(30)\n", "did not finish within 2s"),
    ],
)
def test_failing_or_invalid_data_uploads_nothing(s3_env, script, match):
    from finetune_engine.data.validate import DataValidationError

    dest = join(s3_env["uri"], "datasets")
    with pytest.raises((DataValidationError, DeliveryError, ValueError), match=match):
        deliver_data(dest, script=script, timeout=2)
    assert list_objects(dest) == {}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jsonl",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/d.jsonl",
        "http://localhost/d.jsonl",
        "file:///etc/passwd",
        "ftp://example.com/x.jsonl",
    ],
)
def test_urls_to_private_addresses_refused(s3_env, url):
    from finetune_engine.jobs.deliver_data import DeliveryError as DataDeliveryError

    with pytest.raises(DataDeliveryError):
        deliver_data(join(s3_env["uri"], "datasets"), urls=[url])


# -- train-job --------------------------------------------------------------------------------------


def test_train_job_end_to_end_then_skips(s3_env, delivered, tmp_path, capsys):
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri)
    ckpt = join(s3_env["uri"], "experiments", "e2e", "run-1")
    result_file = tmp_path / "result.json"
    argv = ["--config", str(config), "--checkpoint-uri", ckpt, "--result-file", str(result_file)]
    assert train_job([*argv, "--workdir", str(tmp_path / "w1")]) == 0
    result = json.loads(result_file.read_text())
    assert result["status"] == "completed" and result["global_step"] == 6
    for name in ("checkpoint-final", "checkpoint-final-adapter", "checkpoint-new-basemodel"):
        assert is_complete(join(ckpt, name)), name
    assert result["final_checkpoint_uri"] == join(ckpt, "checkpoint-final")
    assert "logs/train.log" in list_objects(ckpt) and "result.json" in list_objects(ckpt)
    assert LEASE_NAME not in list_objects(ckpt)  # held while the job wrote, released at its end
    assert sorted(list_complete_children(ckpt)) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-final",
        "checkpoint-final-adapter",
        "checkpoint-new-basemodel",
    ]
    # A second launch (fresh pod, empty workdir) does not retrain.
    assert train_job([*argv, "--workdir", str(tmp_path / "w2")]) == 0
    again = json.loads(result_file.read_text())
    assert again["status"] == "skipped" and again["global_step"] == 6
    assert not (tmp_path / "w2" / "output").exists()
    assert again["config_sha256"] == result["config_sha256"] and "config" not in again
    # A changed experiment into the same finished prefix is refused, the difference named.
    before = list_objects(ckpt)
    changed = [*argv, "--workdir", str(tmp_path / "w3"), "--set", "training_args.learning_rate=0.5"]
    assert train_job(changed) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of a different experiment config" in err
    assert "training_args.learning_rate:" in err and "-> 0.5" in err
    assert list_objects(ckpt) == before and not (tmp_path / "w3" / "output").exists()
    # A done marker without result.json (cut off between the two) is not a finished run.
    s3_env["server"].client().delete_object(
        Bucket=s3_env["bucket"], Key=ckpt.split("/", 3)[3] + "/result.json"
    )
    assert train_job([*argv, "--workdir", str(tmp_path / "w4")]) == 0
    redone = json.loads(result_file.read_text())
    assert redone["status"] == "completed" and redone["resumed_from"] == "checkpoint-6"
    assert "result.json" in list_objects(ckpt)
    # The merged model from the bucket loads and generates.
    download_dir(join(ckpt, "checkpoint-final"), tmp_path / "final")
    from finetune_engine.cli.chat import chat

    assert isinstance(chat(str(tmp_path / "final"), "What is 1 plus 1?", 4), str)


def test_checkpoint_uploads_run_in_the_background(s3_env, delivered, tmp_path, monkeypatch):
    """With a slow bucket (FINETUNE_TEST_UPLOAD_DELAY per object), training steps continue while a
    checkpoint uploads: step lines are logged between an upload's start and its end."""
    from datetime import datetime

    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri, max_steps=6, save_steps=2)
    monkeypatch.setenv("FINETUNE_TEST_UPLOAD_DELAY", "3")  # per object; objects upload in parallel
    ckpt = join(s3_env["uri"], "experiments", "bg", "run")
    assert (
        train_job(["--config", str(config), "--checkpoint-uri", ckpt, "--workdir", str(tmp_path / "w")]) == 0
    )
    lines = (tmp_path / "w" / "logs" / "train.log").read_text().splitlines()

    def at(pattern: str) -> tuple[int, datetime]:
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                return i, datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        raise AssertionError(f"{pattern!r} not in the log:\n" + "\n".join(lines[-40:]))

    overlapped = []
    for n in (2, 4):  # checkpoint-6 is the last save: no step follows it
        begin, t_begin = at(rf"uploading checkpoint-{n} in the background")
        end, t_end = at(rf"uploaded s3://\S+/checkpoint-{n}$")
        assert (t_end - t_begin).total_seconds() >= 2.0  # the upload really was slow
        overlapped += [
            line
            for line in lines[begin + 1 : end]
            if re.search(r"finetune_engine.callbacks: step \d+/6 ", line)
        ]
    assert overlapped, "no training step was logged while a checkpoint uploaded:\n" + "\n".join(lines)
    assert sorted(_complete_steps(ckpt)) == [2, 4, 6]


def test_train_job_bad_config_key_fails_before_download(s3_env, delivered, tmp_path, capsys):
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri)
    rc = train_job(
        [
            "--config",
            str(config),
            "--set",
            "training_args.learnin_rate=1",
            "--checkpoint-uri",
            join(s3_env["uri"], "experiments", "bad"),
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    assert rc == 2 and "training_args.learnin_rate" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert list_objects(join(s3_env["uri"], "experiments")) == {}


def test_a_second_run_into_a_prefix_being_written_is_refused(s3_env, delivered, tmp_path, capsys):
    """Two runs with one run name: while one holds the prefix's lease, the other stops before it
    downloads or writes anything and names the prefix, the holder and when its lease expires."""
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri)
    ckpt = join(s3_env["uri"], "experiments", "shared", "run")
    other = PrefixLease(ckpt, ttl=2, owner="finetune-run-a-pod/7/1a2b", settle=0).acquire()
    try:
        argv = ["--config", str(config), "--checkpoint-uri", ckpt, "--workdir", str(tmp_path / "w")]
        assert train_job(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {ckpt} is being written by another run")
        assert "'finetune-run-a-pod/7/1a2b'" in err and " UTC" in err and "Traceback" not in err
        assert not (tmp_path / "w").exists()
        assert list(list_objects(ckpt)) == [LEASE_NAME]  # the other run's lease, untouched
    finally:
        other.release()


def test_training_arguments_refused_in_the_pod_leave_no_manifest(s3_env, delivered, tmp_path, capsys):
    """A config the schema accepts but TrainingArguments refuses (load_best_model_at_end with
    different save and eval strategies) stops before the model loads: no grown base, checkpoint or
    final output with a manifest, locally or in the bucket, and no lease left behind."""
    model_uri, data_uri = delivered
    config = train_config(
        tmp_path,
        model_uri,
        data_uri,
        load_best_model_at_end=True,
        eval_strategy="steps",
        save_strategy="epoch",
    )
    ckpt = join(s3_env["uri"], "experiments", "refused", "run")
    argv = ["--config", str(config), "--checkpoint-uri", ckpt, "--workdir", str(tmp_path / "w")]
    assert train_job(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training_args: --load_best_model_at_end requires the save and eval")
    assert "Traceback" not in err
    assert not list((tmp_path / "w" / "output").rglob(MANIFEST_NAME))
    assert not (tmp_path / "w" / "output" / "checkpoint-new-basemodel").exists()
    assert list_objects(ckpt) == {}


def test_train_job_fetches_text_corpus_prefixes_and_prompt_files(s3_env, delivered, tmp_path):
    """TEXT_FILES corpora given as bucket prefixes (plain uploads, no manifest) and a sample-prompts
    file in the bucket reach the job as local paths; a path that names nothing is an input error."""
    from finetune_engine.config import parse_config
    from finetune_engine.jobs.train import _fetch_inputs
    from finetune_engine.storage import put_bytes

    model_uri, _ = delivered
    corpus = join(s3_env["uri"], "corpora", "novels")
    put_bytes(join(corpus, "a.txt"), b"It was a dark and stormy night.\n")
    put_bytes(join(corpus, "part2", "b.txt"), b"The rain fell in torrents.\n")
    prompts = join(s3_env["uri"], "prompts", "probe.txt")
    put_bytes(prompts, b"Once upon a time\n")
    cfg = parse_config(
        {
            "data_conf": {
                "training_data": {
                    "type": "TEXT_FILES",
                    "datasets": [{"path": corpus + "/"}],
                    "context_length": 32,
                }
            },
            "training_args": {"output_dir": str(tmp_path / "out"), "max_steps": 1},
            "batchsize_conf": {"total_train_batch_size": 2},
            "run_conf": {"model": model_uri},
            "tracking": {"sample_generations": {"every_n_steps": 1, "prompts_file": prompts}},
        },
        source="test",
    )
    local = _fetch_inputs(cfg, tmp_path / "w")
    corpus_dir = Path(local.data_conf.training_data.datasets[0].path)
    assert (corpus_dir / "a.txt").read_text().startswith("It was") and (
        corpus_dir / "part2" / "b.txt"
    ).exists()
    assert Path(local.tracking.sample_generations.prompts_file).read_text() == "Once upon a time\n"
    assert Path(local.run_conf.model).is_dir()
    missing = cfg.model_copy(deep=True)
    missing.data_conf.training_data.datasets[0].path = join(s3_env["uri"], "corpora", "nope")
    with pytest.raises(ValueError, match=r"corpora/nope: no such object or prefix in the bucket"):
        _fetch_inputs(missing, tmp_path / "w2")


def test_fetched_inputs_keep_their_names_with_or_without_a_trailing_slash(s3_env, tmp_path):
    """A prompts file or a corpus prefix written with a trailing slash lands under its own name (a
    .jsonl prompts file is read as chat records, not as lines); a prefix as prompts file is refused."""
    from finetune_engine.config import parse_config
    from finetune_engine.jobs.common import local_name
    from finetune_engine.jobs.train import _fetch_inputs
    from finetune_engine.recipes.common import sample_prompts
    from finetune_engine.storage import put_bytes

    assert {local_name(u, "0") for u in ("s3://b/d/novels", "s3://b/d/novels/", "s3://b/d/novels//")} == {
        "0-novels"
    }
    corpus = join(s3_env["uri"], "corpora", "novels")
    put_bytes(join(corpus, "a.txt"), b"It was a dark and stormy night.\n")
    prompts = join(s3_env["uri"], "prompts", "probe.jsonl")
    put_bytes(
        prompts,
        b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n',
    )

    def config(prompts_uri: str):
        return parse_config(
            {
                "data_conf": {
                    "training_data": {
                        "type": "TEXT_FILES",
                        "datasets": [{"path": corpus + "/"}],
                        "context_length": 32,
                    }
                },
                "training_args": {"output_dir": str(tmp_path / "out"), "max_steps": 1},
                "batchsize_conf": {"total_train_batch_size": 2},
                "run_conf": {"model": str(tmp_path / "model")},
                "tracking": {"sample_generations": {"every_n_steps": 1, "prompts_file": prompts_uri}},
            },
            source="test",
        )

    local = _fetch_inputs(config(prompts + "/"), tmp_path / "w")
    corpus_dir = Path(local.data_conf.training_data.datasets[0].path)
    assert corpus_dir.name == "0-novels" and (corpus_dir / "a.txt").is_file()
    prompts_file = Path(local.tracking.sample_generations.prompts_file)
    assert prompts_file.name == "prompts-probe.jsonl"
    assert sample_prompts(local.tracking.sample_generations, chat=True) == [
        {"messages": [{"role": "user", "content": "Hi"}]}
    ]
    with pytest.raises(
        ValueError,
        match=r"tracking.sample_generations.prompts_file s3://\S+/prompts: a prefix, not one object",
    ):
        _fetch_inputs(config(join(s3_env["uri"], "prompts") + "/"), tmp_path / "w2")
    assert not (tmp_path / "w2" / "data" / "prompts-prompts").exists()


def _complete_steps(ckpt: str) -> list[int]:
    return sorted(
        int(m.group(1)) for n in list_complete_children(ckpt) if (m := re.match(r"^checkpoint-(\d+)$", n))
    )


def _same_as_bucket(pulled: Path, bucket_uri: str, local: Path) -> None:
    """An artifact pulled back holds the bucket copy's files byte for byte, with its manifest."""
    download_dir(bucket_uri, local)
    files = sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert MANIFEST_NAME in files and len(files) > 2
    for name in files:
        if name != MANIFEST_NAME:
            assert (pulled / name).read_bytes() == (local / name).read_bytes(), name
    assert local_manifest(pulled)["files"] == read_manifest(bucket_uri)["files"]


def test_merge_job_matches_the_training_merge(
    s3_env, delivered, tmp_path, oci_registry, docker_config, monkeypatch
):
    """... and train-job / merge-job --output-oci push what they uploaded: pulled back from the registry,
    the adapter and the merged model equal their bucket copies byte for byte."""
    import torch
    from safetensors.torch import load_file

    from finetune_engine.jobs.merge import main as merge_job
    from finetune_engine.jobs.merge import run_merge_job
    from finetune_engine.storage import oci

    monkeypatch.setenv(oci.PLAIN_HTTP_ENV, "1")
    adapter_ref = oci_registry.ref("jobs/adapter", s3_env["kind"])
    merged_ref = oci_registry.ref("jobs/merged", s3_env["kind"])
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri, max_steps=2)
    ckpt = join(s3_env["uri"], "experiments", "merge", "run")
    argv = ["--config", str(config), "--checkpoint-uri", ckpt, "--workdir", str(tmp_path / "w")]
    result_file = tmp_path / "train.json"
    assert train_job([*argv, "--output-oci", adapter_ref, "--result-file", str(result_file)]) == 0
    assert json.loads(result_file.read_text())["oci_reference"] == adapter_ref
    oci.pull(adapter_ref, tmp_path / "pulled-adapter")
    _same_as_bucket(tmp_path / "pulled-adapter", join(ckpt, "checkpoint-final-adapter"), tmp_path / "ba")
    out = join(s3_env["uri"], "merged", "m")
    merge_argv = ["--base", model_uri, "--adapter", join(ckpt, "checkpoint-final-adapter"), "--output", out]
    merge_result = tmp_path / "merge.json"
    assert (
        merge_job(
            [*merge_argv, "--output-oci", merged_ref, "--workdir", str(tmp_path / "mw")]
            + ["--result-file", str(merge_result)]
        )
        == 0
    )
    merged = json.loads(merge_result.read_text())
    assert merged["status"] == "merged" and merged["oci_reference"] == merged_ref
    oci.pull(merged_ref, tmp_path / "pulled-merged")
    _same_as_bucket(tmp_path / "pulled-merged", out, tmp_path / "bm")
    again = run_merge_job(
        model_uri, join(ckpt, "checkpoint-final-adapter"), out, tmp_path / "mw2", output_oci=merged_ref
    )
    # a finished merge pushes its bucket copy: the same artifact, the tag unchanged
    assert again["status"] == "skipped" and again["oci_digest"] == merged["oci_digest"]
    download_dir(out, tmp_path / "a")
    download_dir(join(ckpt, "checkpoint-final"), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
