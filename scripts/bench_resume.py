"""Resume cost: steps lost to a SIGKILL at a random point, and restart time vs a cold start.

    .venv/bin/python scripts/bench_resume.py [--trials 5] [--steps 30] [--save-steps 5] [--seed 1]

Against the embedded local S3 server (``finetune-engine local-s3``: rclone serve s3 on loopback, in a
temporary directory), with the tiny model and chat set built locally. Each trial:

1. cold start: ``finetune-engine train-job`` on a new run prefix; time from launch to its first
   training step (the log line ``step 1/N``);
2. SIGKILL of the job's process group after a random step line plus a random part of a step;
   steps lost = steps done at the kill (the last step line) - the newest checkpoint complete in the
   bucket (target: <= --save-steps);
3. restart in a fresh workdir (a new pod): time from launch to its first new step
   (``step R+1/N``, R = the checkpoint it resumed from, which must be that newest complete one).

Prints each trial, the medians and the restart/cold ratio, with the machine (CPU model, cores, load).
Both starts include the interpreter's imports; the restart also downloads its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_config(path: Path, model_uri: str, data_uri: str, steps: int, save_steps: int) -> None:
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": data_uri}]},
            "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.1},
            "chat_template_name": "chat-ml",
        },
        "training_args": {
            "learning_rate": 0.003,
            "max_steps": steps,
            "save_steps": save_steps,
            "logging_steps": 1,
        },
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "target_modules": "all-linear"}},
        "run_conf": {"model": model_uri, "determinism": "half"},
        "sft_args": {"max_seq_length": 128, "packing": True, "train_on_completions_only": True},
    }
    path.write_text(yaml.safe_dump(cfg))


class Job:
    """``finetune-engine train-job`` in its own process group; its output lines with their arrival times."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "finetune-engine"), "train-job", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.log = open(log, "w")
        self.text = ""

    def until(self, pattern: str, timeout: float = 900) -> tuple[re.Match, float]:
        """Read lines until one matches; (match, seconds since launch)."""
        rx = re.compile(pattern)
        deadline = self.t0 + timeout
        for line in self.proc.stdout:
            self.log.write(line)
            self.text += line
            hit = rx.search(line)
            if hit:
                return hit, time.monotonic() - self.t0
            if time.monotonic() > deadline:
                break
        raise RuntimeError(
            f"no {pattern!r} in the job's output (exit {self.proc.poll()}); see {self.log.name}"
        )

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for line in self.proc.stdout:  # drain what was written before the kill
            self.log.write(line)
            self.text += line
        self.proc.wait()
        self.log.close()


def complete_steps(ckpt: str) -> list[int]:
    from finetune_engine.storage import list_complete_children

    return sorted(
        int(m.group(1)) for n in list_complete_children(ckpt) if (m := re.match(r"^checkpoint-(\d+)$", n))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="Planned steps of each run (max_steps).")
    parser.add_argument("--save-steps", type=int, default=5, help="Checkpoint interval (save_steps).")
    parser.add_argument("--seed", type=int, default=None, help="Kill points (default: random, printed).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (logs, bucket).")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)

    from finetune_engine.jobs.deliver_model import deliver_model
    from finetune_engine.storage import join, upload_file
    from finetune_engine.storage.local_server import ensure_running, stop
    from finetune_engine.tiny import build_tiny_model, write_chat_dataset

    root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    s3_dir = root / "s3"
    load0 = os.getloadavg()
    try:
        s3_env = ensure_running(s3_dir)
        os.environ.update(s3_env)
        env = {
            **os.environ,
            **s3_env,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
            "DISABLE_MLFLOW_INTEGRATION": "TRUE",
            # every relaunch is a retry of the same job (as Airflow's tries are): it takes over the
            # killed run's prefix lease at once
            "FINETUNE_WRITER": "bench_resume",
        }
        bucket = f"s3://{s3_env['FINETUNE_BUCKET']}"
        model_uri, data_uri = join(bucket, "models", "tiny"), join(bucket, "datasets", "chat.jsonl")
        deliver_model(str(build_tiny_model(root / "model")), model_uri)
        upload_file(write_chat_dataset(root / "chat.jsonl", examples=200, seed=1), data_uri)
        config = root / "train.yaml"
        write_config(config, model_uri, data_uri, args.steps, args.save_steps)
        n = args.steps

        print(
            f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load0[0]:.1f} at start; "
            f"Python {platform.python_version()}"
        )
        print(
            f"runs of {n} steps, a checkpoint every {args.save_steps} (uploaded in the background to the "
            f"local S3 server); {args.trials} trials, seed {seed}"
        )
        print(
            f"{'trial':>5} {'kill@':>5} {'ckpt':>4} {'lost':>4} {'cold s':>7} {'restart s':>9} {'ratio':>6}"
        )
        rows = []
        for trial in range(args.trials):
            ckpt = join(bucket, "bench-resume", f"run-{trial}")
            argv = ["--config", str(config), "--checkpoint-uri", ckpt]
            cold = Job(
                [*argv, "--workdir", str(root / f"w{trial}-cold")], env, root / f"trial{trial}-cold.log"
            )
            _, t_cold = cold.until(rf"step 1/{n} \(")
            # killed before the last checkpoint, so that the restart has a step to time (a kill after it
            # finishes from that checkpoint without a step: the kill tests cover that case)
            kill_after = rng.randint(1, max(n - args.save_steps - 1, 1))
            t_kill = cold.until(rf"step {kill_after}/{n} \(")[1] if kill_after > 1 else t_cold
            per_step = (t_kill - t_cold) / (kill_after - 1) if kill_after > 1 else 0.5
            time.sleep(rng.uniform(0, 1) * per_step)  # a random part of the next step
            cold.kill()
            done = max(int(s) for s in re.findall(rf"step (\d+)/{n} \(", cold.text))
            steps = complete_steps(ckpt)
            newest = steps[-1] if steps else 0
            lost = done - newest

            restart = Job(
                [*argv, "--workdir", str(root / f"w{trial}-restart")], env, root / f"trial{trial}-restart.log"
            )
            _, t_restart = restart.until(rf"step {newest + 1}/{n} \(")
            resumed = re.search(
                r"resuming: downloading newest complete checkpoint checkpoint-(\d+)", restart.text
            )
            restart.kill()
            if (int(resumed.group(1)) if resumed else 0) != newest:
                raise RuntimeError(
                    f"trial {trial}: the restart did not resume from "
                    f"checkpoint-{newest}; see {restart.log.name}"
                )
            rows.append((done, newest, lost, t_cold, t_restart))
            print(
                f"{trial:>5} {done:>5} {newest:>4} {lost:>4} {t_cold:>7.1f} "
                f"{t_restart:>9.1f} {t_restart / t_cold:>6.2f}"
            )

        lost = [r[2] for r in rows]
        cold_s, restart_s = statistics.median(r[3] for r in rows), statistics.median(r[4] for r in rows)
        within = sum(x <= args.save_steps for x in lost)
        print(
            f"steps lost: max {max(lost)}, mean {statistics.mean(lost):.1f}; <= save interval "
            f"({args.save_steps}) in {within}/{len(lost)} trials"
        )
        print(
            f"time to first step: cold start median {cold_s:.1f}s, restart median {restart_s:.1f}s, "
            f"restart/cold = {restart_s / cold_s:.2f}"
        )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return 0
    finally:
        stop(s3_dir)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
