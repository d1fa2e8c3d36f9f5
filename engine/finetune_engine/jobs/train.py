"""``finetune-engine train-job``: what a fine-tuning pod runs.

Downloads the model and datasets named in the config from the bucket, syncs down the newest
complete checkpoint of the run, trains (resuming), uploads each checkpoint as it is saved (manifest
last), uploads the final outputs and logs, and writes the result JSON. A run whose final output is
complete in the bucket is not retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from finetune_engine.checkpoints import CHECKPOINT_RE
from finetune_engine.config import ConfigError, schema
from finetune_engine.config.training_args import METHODS
from finetune_engine.jobs.common import add_config_args, capture_logs, local_name, read_config, write_result
from finetune_engine.storage.lease import LeaseHeldError, LeaseLostError, PrefixLease

log = logging.getLogger(__name__)
# Test hooks, inert unless set (the kill trials and the background-upload test use them):
# "K:M" = SIGKILL this job's process group once M objects of this process's K-th checkpoint upload are stored.
TEST_KILL_ENV = "FINETUNE_TEST_KILL_AT"
# Seconds to sleep after each object of a checkpoint upload (a slow bucket).
TEST_DELAY_ENV = "FINETUNE_TEST_UPLOAD_DELAY"


def is_uri(path: str) -> bool:
    return path.startswith(("s3://", "oci://"))


def _download(uri: str, local: Path) -> None:
    """A bucket prefix or an OCI artifact (verified, renamed into place) -> ``local``."""
    if uri.startswith("oci://"):
        from finetune_engine.storage.oci import pull

        pull(uri, local)
    else:
        from finetune_engine.storage import download_dir

        download_dir(uri, local)


class CheckpointUploader:
    """Uploads checkpoints in the background, one at a time.

    A save waits only for the previous checkpoint's upload. Files are hard-linked into a staging
    directory first, so the Trainer's rotation can delete the original while it uploads. After a
    checkpoint is complete remotely, remote checkpoints beyond ``keep`` are deleted (oldest first,
    manifest before data, so a reader never sees a half-deleted complete checkpoint).
    """

    def __init__(self, prefix_uri: str, staging: Path, keep: int | None, lease: PrefixLease | None = None):
        self.prefix_uri = prefix_uri.rstrip("/")
        self.lease = lease  # checked before each upload: a prefix taken over is not written
        self.staging = staging
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.uploaded: list[str] = []
        self.failures: list[str] = []
        self.started = 0  # checkpoint uploads begun by this process
        kill = os.environ.get(TEST_KILL_ENV, "")
        self._kill_at = tuple(int(x) for x in kill.split(":", 1)) if kill else None
        self._delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)

    def __call__(self, ckpt_dir: Path, step: int, node_files: list[dict] | None = None) -> None:
        """``node_files``: what the other nodes uploaded of this checkpoint (several nodes), listed
        in the manifest beside this node's files."""
        self.wait(raise_errors=False)
        stage = self.staging / ckpt_dir.name
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(ckpt_dir, stage, copy_function=os.link)
        self._pending = self._pool.submit(self._upload, stage, node_files)

    def _upload(self, stage: Path, node_files: list[dict] | None = None) -> None:
        from finetune_engine.storage import delete_prefix, join, list_complete_children, upload_dir

        uri = join(self.prefix_uri, stage.name)
        if self.lease is not None:
            self.lease.check()
        self.started += 1
        log.info("uploading %s in the background", stage.name)
        try:
            upload_dir(
                stage,
                uri,
                progress=False,
                after_file=self._test_hook(self.started, stage.name),
                other_files=node_files,
            )
            self.uploaded.append(stage.name)
            log.info("uploaded %s", uri)
            if self.keep:
                steps = sorted(
                    (int(m.group(1)), name)
                    for name in list_complete_children(self.prefix_uri)
                    if (m := CHECKPOINT_RE.match(name))
                )
                for _, name in steps[: -self.keep]:
                    delete_prefix(join(self.prefix_uri, name))
                    log.info("deleted old remote checkpoint %s", name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _test_hook(self, ordinal: int, name: str):
        if self._kill_at is None and not self._delay:
            return None
        stored = []
        lock = threading.Lock()

        def after_file(rel: str) -> None:
            with lock:
                stored.append(rel)
                count = len(stored)
            if self._kill_at == (ordinal, count):
                log.warning(
                    "%s=%d:%d: %d objects of %s stored; SIGKILL to the job's process group now",
                    TEST_KILL_ENV,
                    ordinal,
                    count,
                    count,
                    name,
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.killpg(os.getpgid(0), signal.SIGKILL)
            if self._delay:
                time.sleep(self._delay)

        return after_file

    def wait(self, raise_errors: bool = True) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as err:  # the next save retries with a newer checkpoint
            self.failures.append(str(err))
            log.warning("checkpoint upload failed (%s); training continues, the next save uploads again", err)
            if raise_errors:
                raise

    def close(self) -> None:
        self.wait(raise_errors=False)
        self._pool.shutdown(wait=True)


class NodeUploader:
    """On the leader of a node other than rank 0's (several nodes): uploads the files its node wrote
    into a checkpoint (its ranks' rng states, ZeRO shards), without a manifest, and returns their
    manifest entries; rank 0 lists them in the manifest it writes last. Synchronous: rank 0 waits for
    every node at the same save anyway."""

    node_upload = True  # how recipes.common.callbacks tells it from the after_save hooks

    def __init__(self, prefix_uri: str):
        self.prefix_uri = prefix_uri.rstrip("/")

    def __call__(self, ckpt_dir: Path, step: int) -> list[dict]:
        from finetune_engine.storage import join, upload_dir

        uri = join(self.prefix_uri, ckpt_dir.name)
        manifest = upload_dir(ckpt_dir, uri, progress=False, write_manifest=False)
        log.info("uploaded this node's %d file(s) of %s", len(manifest["files"]), ckpt_dir.name)
        return manifest["files"]


def _fetch_inputs(cfg: schema.ExperimentConfig, workdir: Path) -> schema.ExperimentConfig:
    """Download bucket inputs; return the config rewritten to the local copies.

    Processes of one pod share the workdir: a file lock serializes them, and the later ones find
    verified files in place and download nothing."""
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_inputs_locked(cfg, workdir)


def _fetch_inputs_locked(cfg: schema.ExperimentConfig, workdir: Path) -> schema.ExperimentConfig:
    data = cfg.model_dump(mode="json")
    run = data["run_conf"]
    if is_uri(run["model"]):
        local = workdir / "model"
        log.info("downloading model %s", run["model"])
        _download(run["model"], local)
        run["model"] = str(local)
    if run.get("tokenizer") and is_uri(run["tokenizer"]):
        local = workdir / "tokenizer"
        _download(run["tokenizer"], local)
        run["tokenizer"] = str(local)
    peft = data["peft_conf"]
    if peft.get("peft_type") == "PRETRAINED_PEFT" and is_uri(peft["name_or_path"]):
        local = workdir / "adapter-in"
        _download(peft["name_or_path"], local)
        peft["name_or_path"] = str(local)
    seen = 0
    for section in ("training_data", "validation_data"):
        for ds in data["data_conf"][section].get("datasets") or []:
            if is_uri(ds["path"]):
                ds["path"] = _fetch_data(ds["path"], workdir / "data" / local_name(ds["path"], str(seen)))
                seen += 1
    samples = (data.get("tracking") or {}).get("sample_generations") or {}
    if samples.get("prompts_file") and is_uri(samples["prompts_file"]):
        uri = samples["prompts_file"]
        samples["prompts_file"] = _fetch_data(
            uri,
            workdir / "data" / local_name(uri, "prompts"),
            key="tracking.sample_generations.prompts_file",
            one_file=True,
        )
    return schema.ExperimentConfig.model_validate(data)


def _fetch_data(uri: str, local: Path, key: str = "the path in data_conf", one_file: bool = False) -> str:
    """One data file, or a prefix of files (a TEXT_FILES corpus: every object under it, no manifest
    needed) -> a local path. Kept when already fetched (the pod's other processes, a relaunch).
    ``key`` names the config key in errors; ``one_file`` refuses a prefix."""
    from finetune_engine.storage import download_dir, download_file, exists, list_objects

    if uri.startswith("oci://"):  # an artifact: '#FILE' names one of its files, else its only one
        from finetune_engine.storage.oci import pull_file_or_dir

        path = pull_file_or_dir(uri, local)
        if one_file and path.is_dir():
            raise ValueError(f"{key} {uri}: the artifact has several files; name one with '#FILE'")
        return str(path)
    if local.exists():
        return str(local)
    uri = uri.rstrip("/")  # a file or a prefix, written with or without a trailing slash
    if exists(uri):
        download_file(uri, local)
    elif list_objects(uri):
        if one_file:
            raise ValueError(
                f"{key} {uri}: a prefix, not one object; give the full URI of a .txt or .jsonl file"
            )
        log.info("downloading data prefix %s", uri)
        download_dir(uri, local, require_complete=False)
    else:
        raise ValueError(
            f"{uri}: no such object or prefix in the bucket; deliver the data first (deliver-data) "
            f"or fix {key}"
        )
    return str(local)


def _sync_down_newest(prefix_uri: str, output_dir: Path) -> str | None:
    """Download the newest complete remote checkpoint unless a local complete copy exists."""
    from finetune_engine.storage import download_dir, join, list_complete_children

    steps = sorted(
        (int(m.group(1)), name)
        for name in list_complete_children(prefix_uri)
        if (m := CHECKPOINT_RE.match(name))
    )
    if not steps:
        log.info("no complete checkpoint under %s", prefix_uri)
        return None
    _, name = steps[-1]
    log.info("resuming: downloading newest complete checkpoint %s", name)
    download_dir(join(prefix_uri, name), output_dir / name)
    return name


class ConfigChangedError(ValueError):
    """A finished run's prefix was given a different experiment config."""


# Keys that do not change what a run produces: where it writes locally, whether it resumes.
_IDENTITY_EXCLUDED = (("training_args", "output_dir"), ("run_conf", "resume_from_checkpoint"))


def config_identity(cfg: schema.ExperimentConfig) -> dict[str, Any]:
    """The config as a run records it (bucket URIs as given) and its sha256."""
    data = cfg.model_dump(mode="json")
    for section, key in _IDENTITY_EXCLUDED:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return {"config": data, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: value}


def config_difference(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> list[str]:
    """``key: old -> new`` for each config key whose value differs (dotted paths)."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    diffs = [
        f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    ]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def check_same_config(finished: dict[str, Any], identity: dict[str, Any], checkpoint_uri: str) -> None:
    """ConfigChangedError when the finished run under ``checkpoint_uri`` recorded another config.
    A run recorded without one (an older engine) cannot be compared and is accepted."""
    recorded = finished.get("config_sha256")
    if recorded is None or recorded == identity["sha256"]:
        return
    diffs = config_difference(finished.get("config") or {}, identity["config"]) or [
        f"config sha256 {recorded[:12]} -> {identity['sha256'][:12]}"
    ]
    raise ConfigChangedError(
        f"{checkpoint_uri} holds a finished run of a different experiment config; "
        f"changed: {'; '.join(diffs)}. Nothing was trained or written: give the run another name "
        "(run_name / --checkpoint-uri), or delete that prefix to train it again"
    )


def run_train_job(
    cfg: schema.ExperimentConfig,
    checkpoint_uri: str,
    workdir: Path,
    method: str = "sft",
    result_file: str | None = None,
    num_preprocess_workers: int = 1,
    tracking_args: tuple[str | None, str | None, str | None] = (None, None, None),
) -> dict[str, Any]:
    if method not in METHODS:  # before any download
        raise ConfigError("--method", [f"unknown method {method!r}; expected one of {', '.join(METHODS)}"])
    from finetune_engine.recipes.common import output_layout
    from finetune_engine.storage import join

    checkpoint_uri = checkpoint_uri.rstrip("/")
    identity = config_identity(cfg)
    if "resume_from_checkpoint" not in cfg.run_conf.model_fields_set:
        # a pod job resumes: a relaunch continues from the newest checkpoint in the bucket
        cfg = cfg.model_copy(
            update={"run_conf": cfg.run_conf.model_copy(update={"resume_from_checkpoint": "auto"})}
        )
    layout = output_layout(cfg)
    done_uri = join(checkpoint_uri, layout.done.name)
    finished = _finished_run(done_uri, checkpoint_uri, identity, result_file)
    if finished is not None:
        return finished
    # One writer per prefix: rank 0 holds its lease while the job writes (other ranks and nodes
    # write only while rank 0 runs), re-checking under it that no other run finished meanwhile.
    main_process = int(os.environ.get("RANK", "0")) == 0
    lease = PrefixLease(checkpoint_uri).acquire() if main_process else None
    try:
        if lease is not None:
            finished = _finished_run(done_uri, checkpoint_uri, identity, result_file)
            if finished is not None:
                return finished
        return _train_and_upload(
            cfg,
            checkpoint_uri,
            workdir,
            method,
            result_file,
            num_preprocess_workers,
            tracking_args,
            identity,
            done_uri,
            lease,
        )
    finally:
        if lease is not None:
            lease.release()


def _finished_run(
    done_uri: str, checkpoint_uri: str, identity: dict[str, Any], result_file: str | None
) -> dict[str, Any] | None:
    """The stored result (status skipped) when the run under ``checkpoint_uri`` finished, else None;
    ConfigChangedError when it finished with another config."""
    from finetune_engine.storage import is_complete, join, read_bytes

    if not is_complete(done_uri):
        return None
    stored = read_bytes(join(checkpoint_uri, "result.json"))
    if stored is None:  # cut off between the final output and its result: not finished
        log.warning(
            "%s is complete but %s has no result.json: the run did not finish; training it again",
            done_uri,
            checkpoint_uri,
        )
        return None
    finished = json.loads(stored)
    check_same_config(finished, identity, checkpoint_uri)
    log.info("%s is complete: this run already finished, nothing to train", done_uri)
    result = {**finished, "status": "skipped"}
    result.pop("config", None)
    write_result(result, result_file)
    return result


def _train_and_upload(
    cfg: schema.ExperimentConfig,
    checkpoint_uri: str,
    workdir: Path,
    method: str,
    result_file: str | None,
    num_preprocess_workers: int,
    tracking_args: tuple[str | None, str | None, str | None],
    identity: dict[str, Any],
    done_uri: str,
    lease: PrefixLease | None,
) -> dict[str, Any]:
    from finetune_engine.recipes.common import output_layout
    from finetune_engine.storage import join, upload_dir, upload_file

    workdir.mkdir(parents=True, exist_ok=True)
    output_dir = workdir / "output"
    handler = capture_logs(workdir / "logs" / "train.log")
    try:
        cfg = _fetch_inputs(cfg, workdir)
        data = cfg.model_dump(mode="json")
        data["training_args"]["output_dir"] = str(output_dir)
        cfg = schema.ExperimentConfig.model_validate(data)
        main_process = int(os.environ.get("RANK", "0")) == 0
        import fcntl

        with open(workdir / ".fetch.lock", "w") as lock:  # ranks of one pod share the output dir
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sync_down_newest(checkpoint_uri, output_dir)

        from finetune_engine.tracking import resolve_tracking

        tracking = resolve_tracking(cfg.tracking, *tracking_args)
        uploader = CheckpointUploader(
            checkpoint_uri, workdir / "upload-staging", cfg.training_args.get("save_total_limit"), lease
        )
        after_save: list = [uploader] if main_process else []
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if (
            world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            and int(os.environ.get("LOCAL_RANK", "0")) == 0
            and not main_process
        ):  # several nodes: this node's leader uploads what its ranks write into each checkpoint
            after_save = [NodeUploader(checkpoint_uri)]
        try:
            if method == "sft":
                from finetune_engine.recipes.sft import run_sft

                result = run_sft(cfg, tracking, num_preprocess_workers, None, after_save=after_save)
            else:  # dpo, kto, orpo, cpo
                from finetune_engine.recipes.preference import run_preference

                result = run_preference(
                    cfg, tracking, method, num_preprocess_workers, None, after_save=after_save
                )
        finally:
            uploader.close()
        if not main_process:
            return result

        # Final outputs (the Silogen layout under the run's prefix): grown base, adapter or model,
        # then result and logs, then the run's last output (layout.done), whose manifest, uploaded
        # last, marks the whole run as finished. Only while the prefix is still this run's.
        if lease is not None:
            lease.check()
        layout = output_layout(cfg)
        uris = {}
        for key, local in (
            ("grown_base", result.get("grown_base")),
            ("final_adapter", result.get("final_adapter")),
            ("final_checkpoint", result.get("final_checkpoint")),
        ):
            if local:
                uris[key] = join(checkpoint_uri, Path(local).name)
                result[f"{key}_uri"] = uris[key]
        for key in ("grown_base", "final_adapter", "final_checkpoint"):
            if key in uris and Path(result[key]) != layout.done:
                upload_dir(Path(result[key]), uris[key])
        result.update(
            checkpoint_uri=checkpoint_uri,
            checkpoint_upload_failures=len(uploader.failures),
            config_sha256=identity["sha256"],
        )
        local_result = workdir / "result.json"
        stored = {**result, "config": identity["config"]}  # what a later run into this prefix compares
        local_result.write_text(json.dumps(stored, indent=1, sort_keys=True))
        upload_file(local_result, join(checkpoint_uri, "result.json"))
        handler.flush()
        upload_file(workdir / "logs" / "train.log", join(checkpoint_uri, "logs", "train.log"))
        upload_dir(layout.done, done_uri)
        write_result(result, result_file)
        return result
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def push_output_to_oci(result: dict[str, Any], workdir: Path, reference: str) -> dict[str, Any]:
    """Push the run's final adapter (or model) to a registry: the local copy when this process wrote
    it, else (a finished run) the bucket's. Pushing the same content again changes nothing."""
    from finetune_engine.jobs.merge import push_to_oci

    for key in ("final_adapter", "final_checkpoint"):
        local = result.get(key)
        if local and Path(local).is_dir():
            return push_to_oci(Path(local), reference)
    uri = result.get("final_adapter_uri") or result.get("final_checkpoint_uri")
    if not uri:
        raise ValueError(f"--output-oci {reference}: the run has no final adapter or model to push")
    from finetune_engine.storage import download_dir

    local = workdir / "oci-push" / uri.rstrip("/").rsplit("/", 1)[-1]
    download_dir(uri, local)
    return push_to_oci(local, reference)


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging

    parser = argparse.ArgumentParser(prog="finetune-engine train-job", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument(
        "--method",
        default="sft",
        choices=list(METHODS),
        help=(
            "sft, or a preference method: dpo, kto, orpo, cpo "
            "(SimPO: cpo with training_args.loss_type simpo)."
        ),
    )
    parser.add_argument(
        "--checkpoint-uri", required=True, help="s3://bucket/experiments/<experiment>/<run key>"
    )
    parser.add_argument(
        "--workdir", default=os.environ.get("FINETUNE_WORKDIR", "workdir"), help="Local scratch directory."
    )
    parser.add_argument(
        "--result-file", default=None, help="Result JSON path (default $FINETUNE_RESULT_FILE)."
    )
    parser.add_argument("--num-preprocess-workers", type=int, default=1)
    parser.add_argument(
        "--output-oci",
        default=None,
        metavar="oci://REGISTRY/REPO:TAG",
        help="Also push the final adapter (or model) there, after the bucket upload.",
    )
    parser.add_argument("--mlflow-server-uri", default=None)
    parser.add_argument("--experiment-name", default=None)
    parser.add_argument("--hf-mlflow-log-artifacts", default=None)
    parser.add_argument("--logging-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.logging_level)
    try:
        if args.output_oci:  # a malformed reference fails before any download or training
            from finetune_engine.storage.oci import parse_oci

            parse_oci(args.output_oci)
        cfg = read_config(args, args.method)
        result = run_train_job(
            cfg,
            args.checkpoint_uri,
            Path(args.workdir),
            args.method,
            args.result_file,
            args.num_preprocess_workers,
            (args.mlflow_server_uri, args.experiment_name, args.hf_mlflow_log_artifacts),
        )
        if args.output_oci and int(os.environ.get("RANK", "0")) == 0:
            result.update(push_output_to_oci(result, Path(args.workdir), args.output_oci))
            write_result(result, args.result_file)
    except (ConfigError, ValueError, LeaseHeldError, LeaseLostError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info(
        "train job %s: step %s, eval loss %s",
        result.get("status"),
        result.get("global_step"),
        result.get("final_eval_loss"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
