"""Orchestration benchmarks, each against its baseline in the same run.

    .venv/bin/python scripts/bench_orchestration.py [--sweep 64] [--repeat 3] [--pods 200]

1. DAG file parse time of every file in dags/ (a fresh interpreter per file, best of 3), next to
   an empty DAG file (Airflow's own import cost) and a one-task KubernetesPodOperator DAG (what any
   DAG of pod operators pays: the kubernetes clients).
2. Time to build and validate one fine-tune pod: config rendering with overrides + pydantic
   validation + V1Pod + restricted-PSS check + kubernetes-validate (strict), vs building the pod only.
3. Wall-time overhead per mapped task of a ``--sweep``-way sweep of no-op engine jobs through
   ``airflow dags test`` on the local runner (pod built, secrets resolved from the connection,
   subprocess, XCom read back), vs the same sweep of no-op ``@task`` functions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SWEEP_DAGS = '''
import sys
from airflow.sdk import DAG, task
from airflow_provider_finetune.operators.base import EngineJobOperator

N = {n}


class NoopEngineJob(EngineJobOperator):
    """An engine pod that does nothing: the runner's own cost (build, secrets, process, XCom)."""

    def __init__(self, *, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def engine_command(self, context):
        result = "open(os.environ['FINETUNE_RESULT_FILE'], 'w').write(json.dumps({{'ok': 1}}))"
        return [sys.executable, "-c", "import json, os; " + result]


with DAG("bench_python_sweep", schedule=None, catchup=False, max_active_tasks=N):
    @task
    def noop(index: int) -> dict:
        return {{"ok": 1}}

    noop.expand(index=list(range(N)))

with DAG("bench_engine_sweep", schedule=None, catchup=False, max_active_tasks=N):
    NoopEngineJob.partial(task_id="noop").expand(index=list(range(N)))
'''


def parse_times(files: list[Path], repeat: int = 3) -> dict[str, float]:
    code = (
        "import sys, time\nt = time.perf_counter()\n"
        "try:\n    from airflow.dag_processing.dagbag import DagBag\n"
        "except ImportError:  # Airflow 3.1\n    from airflow.models.dagbag import DagBag\n"
        "t0 = time.perf_counter()\nbag = DagBag(sys.argv[1])\nprint(time.perf_counter() - t0, len(bag.dags), "
        "len(bag.import_errors))"
    )
    out = {}
    for path in files:
        best = float("inf")
        for _ in range(repeat):
            r = subprocess.run(
                [sys.executable, "-c", code, str(path)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
            )
            seconds, dags, errors = r.stdout.split()[-3:]
            if int(errors):
                raise RuntimeError(f"{path} has import errors")
            best = min(best, float(seconds))
        out[path.name] = best
    return out


def pod_build_times(n: int = 200) -> tuple[float, float]:
    import kubernetes_validate
    from kubernetes.client import ApiClient

    from airflow_provider_finetune.operators import FinetuneKubernetesOperator
    from airflow_provider_finetune.pods.pod import build_pod
    from airflow_provider_finetune.pods.security import check_restricted

    api = ApiClient()
    config = str(ROOT / "engine" / "configs" / "tutorial-01-finetune-lora.yaml")

    class Ti:
        dag_id, task_id, map_index, try_number = "bench", "sweep", 3, 1

    context = {"ti": Ti(), "run_id": "manual__bench"}

    def once(validate: bool) -> None:
        op = FinetuneKubernetesOperator(
            task_id="sweep",
            config=config,
            lora_rank=16,
            base_model="s3://finetune/models/m",
            datasets=["s3://finetune/datasets/d.jsonl"],
            gpus=1,
        )
        if validate:
            op.validate(context)
        pod = api.sanitize_for_serialization(build_pod(op.build_spec(context)))
        if validate:
            problems = check_restricted(pod)
            if problems:
                raise RuntimeError(problems)
            kubernetes_validate.validate(pod, "1.33", strict=True)

    for flag in (False, True):  # warm imports and schema caches
        once(flag)
    timings = []
    for flag in (False, True):
        t0 = time.perf_counter()
        for _ in range(n):
            once(flag)
        timings.append((time.perf_counter() - t0) / n)
    return timings[0], timings[1]


def sweep_overhead(n: int) -> tuple[float, float]:
    from airflow_provider_finetune.hooks import bucket_connection_json
    from finetune_engine.storage.local_server import ensure_running, stop

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dags = tmp / "dags"
        dags.mkdir()
        (dags / "bench_sweeps.py").write_text(textwrap.dedent(SWEEP_DAGS.format(n=n)))
        s3 = ensure_running(tmp / "s3")
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW"))}
            env.update(
                {
                    "AIRFLOW_HOME": str(tmp / "airflow"),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__FINETUNE__RUNNER": "local",
                    "AIRFLOW__FINETUNE__LOCAL_WORKDIR": str(tmp / "work"),
                    "AIRFLOW_CONN_AWS_DEFAULT": bucket_connection_json(s3),
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                }
            )
            subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
            times = []
            for dag_id in ("bench_python_sweep", "bench_engine_sweep"):
                t0 = time.monotonic()
                r = subprocess.run(
                    [str(BIN / "airflow"), "dags", "test", dag_id], env=env, capture_output=True, text=True
                )
                times.append(time.monotonic() - t0)
                if r.returncode != 0 or "state=success" not in r.stdout + r.stderr:
                    raise RuntimeError(f"{dag_id} failed:\n{(r.stdout + r.stderr)[-3000:]}")
            return times[0], times[1]
        finally:
            stop(tmp / "s3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep", type=int, default=64, help="Mapped tasks of the sweep measurement (0: skip it)."
    )
    parser.add_argument("--repeat", type=int, default=3, help="Parses per DAG file; the best is reported.")
    parser.add_argument("--pods", type=int, default=200, help="Pods built per timing.")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text("from airflow.sdk import DAG\nwith DAG('empty', schedule=None):\n    pass\n")
        kpo = Path(tmp) / "plain_kpo_dag.py"
        kpo.write_text(
            "from airflow.sdk import DAG\n"
            "from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator\n"
            "with DAG('plain_kpo', schedule=None):\n"
            "    KubernetesPodOperator(task_id='t', image='busybox', cmds=['true'])\n"
        )
        times = parse_times([empty, kpo, *sorted((ROOT / "dags").glob("*.py"))], args.repeat)
    base, kpo_base = times.pop("empty_dag.py"), times.pop("plain_kpo_dag.py")
    print(
        f"\n1. DAG parse time (best of {args.repeat}, fresh interpreter; an empty DAG file: "
        f"{base * 1000:.0f} ms, a one-task KubernetesPodOperator DAG: {kpo_base * 1000:.0f} ms)"
    )
    for name, seconds in times.items():
        print(
            f"   {name:22s} {seconds * 1000:6.0f} ms  ({seconds / kpo_base:.2f}x the plain "
            f"KubernetesPodOperator DAG, +{(seconds - kpo_base) * 1000:.0f} ms)"
        )

    build, full = pod_build_times(args.pods)
    print("\n2. one fine-tune pod")
    print(f"   build only:                              {build * 1000:6.2f} ms")
    print(
        "   render + validate config, build, PSS, kubernetes-validate: "
        f"{full * 1000:6.2f} ms ({full / build:.1f}x)"
    )

    if args.sweep < 1:
        print("\n3. mapped sweep: skipped (--sweep 0)")
        return 0
    python_s, engine_s = sweep_overhead(args.sweep)
    print(f"\n3. {args.sweep}-way mapped sweep through `airflow dags test` (local runner)")
    print(f"   no-op @task:        {python_s:6.1f} s  ({python_s / args.sweep * 1000:.0f} ms per task)")
    print(f"   no-op engine jobs:  {engine_s:6.1f} s  ({engine_s / args.sweep * 1000:.0f} ms per task)")
    print(
        "   overhead of an engine job over a plain task: "
        f"{(engine_s - python_s) / args.sweep * 1000:.0f} ms per mapped task"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
