"""Engine operators whose pod runs a small shell or Python program instead of the engine, for the
local runner's process tests (kill, deadline, worker death). Also runnable as the "worker":

    python -m tests.provider.local_jobs WORKDIR_ROOT TRY_NUMBER   # runs one try of CheckpointingJob
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace
from typing import Any
from unittest import mock

from airflow_provider_finetune.operators.base import EngineJobOperator

# A job that checkpoints each step into its scratch volume and resumes from it; it also starts a
# grandchild (sleep) so a test can see the whole process group go, not just the leader.
CHECKPOINTING = r"""
import json, os, subprocess, sys, time
scratch = os.environ["FINETUNE_WORKDIR"]
state = os.path.join(scratch, "progress.json")
done = json.load(open(state))["step"] if os.path.exists(state) else 0
start = done
helper = subprocess.Popen(["sleep", "300"])
with open(os.path.join(scratch, f"pids-{os.getpid()}.json"), "w") as f:
    json.dump({"engine": os.getpid(), "helper": helper.pid}, f)
print(f"resuming at step {start}" if start else "starting at step 0", flush=True)
while done < int(os.environ["STEPS"]):
    time.sleep(float(os.environ.get("STEP_SECONDS", "0.05")))
    done += 1
    with open(state + ".tmp", "w") as f:
        json.dump({"step": done}, f)
    os.replace(state + ".tmp", state)
helper.kill()
with open(os.environ["FINETUNE_RESULT_FILE"], "w") as f:
    json.dump({"status": "completed", "resumed_from": start, "steps": done}, f)
"""


class CommandJob(EngineJobOperator):
    """Runs ``command`` as the pod's main container command."""

    def __init__(self, *, command: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("runner", "local")
        super().__init__(**kwargs)
        self.command = command

    def engine_command(self, context: Any) -> list[str]:
        return list(self.command)


def checkpointing_job(steps: int = 60, step_seconds: float = 0.05, **kwargs: Any) -> CommandJob:
    return CommandJob(
        task_id="resumable",
        command=[sys.executable, "-c", CHECKPOINTING],
        extra_env={"STEPS": str(steps), "STEP_SECONDS": str(step_seconds)},
        **kwargs,
    )


def context(task_id: str, try_number: int = 1) -> dict[str, Any]:
    run_id = "manual__2026-12-01T00:00:00+00:00"
    ti = SimpleNamespace(
        dag_id="local_jobs",
        task_id=task_id,
        map_index=-1,
        try_number=try_number,
        run_id=run_id,
        xcom_push=mock.Mock(),
    )
    return {"ti": ti, "run_id": run_id, "dag": SimpleNamespace(dag_id="local_jobs")}


def main() -> int:
    """One try of the checkpointing job, as an Airflow task process would run it."""
    try_number = int(sys.argv[1])
    op = checkpointing_job(steps=int(sys.argv[2]), step_seconds=float(sys.argv[3]))
    result = op.execute(context(op.task_id, try_number))
    print("RESULT=" + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
