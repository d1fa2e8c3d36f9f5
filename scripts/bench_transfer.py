"""Transfer benchmark: our directory upload/download vs `cp -r`, a naive one-file-at-a-time boto3 loop,
and the server's own ceiling, all measured in the same run against the embedded rclone S3 server.

    .venv/bin/python scripts/bench_transfer.py [--size-mib 1024] [--repeat 3]

Builds a model-like directory (four random safetensors-sized shards and small JSON files), starts the
embedded rclone S3 server (``rclone serve s3`` on loopback, the one the demo and local runs use) and
prints, per method, the best of ``--repeat`` runs in MB/s (1 MB = 10^6 bytes) with the CPU seconds the
client (this process) and the rclone server spent, then the ratios. The server ceiling is many
parallel raw ``put_object`` / ``get_object`` calls from and into memory: no files, no hashing, no
manifest - what the server itself can take on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_model_dir(root: Path, size_mib: int) -> int:
    root.mkdir(parents=True)
    shards = 4
    per = size_mib // shards
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for _ in range(per):
                f.write(os.urandom(2**20))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / name).write_text('{"bench": true}\n' * 50)
    (root / "tokenizer.json").write_bytes(os.urandom(2 * 2**20))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _pmap(threads: int, fn, items) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Bench:
    def __init__(self, nbytes: int, server_pid: int | None, repeat: int):
        self.nbytes, self.server_pid, self.repeat = nbytes, server_pid, repeat
        self.rows: dict[str, tuple[float, float, float]] = {}  # name: (best MB/s, client cpu s, server cpu s)

    def run(self, name: str, fn, before=None, nbytes: int | None = None) -> float:
        best = None
        for i in range(self.repeat):
            if before is not None:
                before(i)
            c0, s0 = _self_cpu(), _proc_cpu(self.server_pid) if self.server_pid else float("nan")
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            c1, s1 = _self_cpu(), _proc_cpu(self.server_pid) if self.server_pid else float("nan")
            rate = (nbytes or self.nbytes) / 1e6 / dt
            if best is None or rate > best[0]:
                best = (rate, c1 - c0, s1 - s0)
        self.rows[name] = best
        print(
            f"  {name:<46} {best[0]:8.1f} MB/s   client cpu {best[1]:5.2f} s   server cpu {best[2]:5.2f} s",
            flush=True,
        )
        return best[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--repeat", type=int, default=3, help="Runs per method; the best is reported (shared CPUs)."
    )
    args = parser.parse_args()
    from finetune_engine.storage import download_dir, make_client, upload_dir
    from finetune_engine.storage.local_server import ensure_running, stop

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        total = make_model_dir(src, args.size_mib)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        env = ensure_running(tmp / "s3")
        os.environ.update(env)
        pid_file = tmp / "s3" / "server.pid"
        server_pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        client = make_client()
        bucket = env["FINETUNE_BUCKET"]
        load = os.getloadavg()
        print(
            f"{total / 2**20:.0f} MiB in {len(files)} files; rclone serve s3 on 127.0.0.1; {os.cpu_count()} "
            f"CPUs ({platform.processor() or platform.machine()}); load average {load[0]:.1f} at start; "
            f"best of {args.repeat} runs each"
        )
        bench = Bench(total, server_pid, args.repeat)

        def rm(*paths: Path):
            def clean(_i):
                for p in paths:
                    shutil.rmtree(p, ignore_errors=True)
                subprocess.run(["sync"], check=False)

            return clean

        def wipe_bucket(prefix: str):
            def clean(_i):
                shutil.rmtree(
                    tmp / "s3" / "data" / bucket / prefix, ignore_errors=True
                )  # rclone stores plain files
                subprocess.run(["sync"], check=False)

            return clean

        try:
            print("local copies")
            cp = bench.run(
                "cp -r (page cache, no sync)",
                lambda i: subprocess.run(["cp", "-r", str(src), str(tmp / "cp-copy")], check=True),
                rm(tmp / "cp-copy"),
            )
            cp_sync = bench.run(
                "cp -r + sync",
                lambda i: subprocess.run(
                    f"cp -r '{src}' '{tmp / 'cp-copy'}' && sync", shell=True, check=True
                ),
                rm(tmp / "cp-copy"),
            )

            print("server ceiling: parallel raw calls, 16 MiB objects from/into memory")
            blob = os.urandom(16 * 2**20)
            n_obj = max(8, total // len(blob))
            for threads in (4, 16):
                bench.run(
                    f"put_object x{n_obj}, {threads} threads",
                    lambda i, t=threads: _pmap(
                        t,
                        lambda k: client.put_object(Bucket=bucket, Key=f"ceiling/{k}", Body=blob),
                        range(n_obj),
                    ),
                    wipe_bucket("ceiling"),
                    nbytes=n_obj * len(blob),
                )
            bench.run(
                f"put_object x{n_obj}, 1 thread",
                lambda i: [
                    client.put_object(Bucket=bucket, Key=f"ceiling/{k}", Body=blob) for k in range(n_obj)
                ],
                wipe_bucket("ceiling"),
                nbytes=n_obj * len(blob),
            )

            def get_all(threads: int):
                def one(k):
                    body = client.get_object(Bucket=bucket, Key=f"ceiling/{k}")["Body"]
                    while body.read(2**20):
                        pass

                _pmap(threads, one, range(n_obj))

            for threads in (4, 16):
                bench.run(
                    f"get_object x{n_obj}, {threads} threads",
                    lambda i, t=threads: get_all(t),
                    nbytes=n_obj * len(blob),
                )

            print("naive: one file at a time, whole file in memory")

            def naive_up(_i):
                for p in files:
                    with open(p, "rb") as f:
                        client.put_object(Bucket=bucket, Key=f"naive/{p.relative_to(src)}", Body=f.read())

            def naive_down(_i):
                out = tmp / "naive-down"
                out.mkdir()
                for p in files:
                    body = client.get_object(Bucket=bucket, Key=f"naive/{p.relative_to(src)}")["Body"].read()
                    (out / p.name).write_bytes(body)

            naive_u = bench.run("naive boto3 loop, upload", naive_up, wipe_bucket("naive"))
            naive_d = bench.run("naive boto3 loop, download", naive_down, rm(tmp / "naive-down"))

            print("ours: verified directory transfers (sha256 manifest, completion marker last)")
            uri = f"s3://{bucket}/ours/model"
            up = bench.run(
                "upload_dir (hashes the dir, then uploads)",
                lambda i: upload_dir(src, uri, progress=False),
                wipe_bucket("ours"),
            )
            down = bench.run(
                "download_dir (sha256 verified)",
                lambda i: download_dir(uri, tmp / "ours-down", progress=False),
                rm(tmp / "ours-down"),
            )
            bench.run(
                "download_dir (sizes only)",
                lambda i: download_dir(uri, tmp / "ours-down", progress=False, verify_hashes=False),
                rm(tmp / "ours-down"),
            )
        finally:
            stop(tmp / "s3")
        ceiling_up = max(v[0] for k, v in bench.rows.items() if k.startswith("put_object"))
        ceiling_down = max(v[0] for k, v in bench.rows.items() if k.startswith("get_object"))
        print("ratios (same run)")
        print(
            f"  upload:   ours/cp {up / cp:.2f}   ours/(cp+sync) {up / cp_sync:.2f}   ours/naive "
            f"{up / naive_u:.2f}   ours/server ceiling {up / ceiling_up:.2f}"
        )
        print(
            f"  download: ours/cp {down / cp:.2f}   ours/(cp+sync) {down / cp_sync:.2f}   ours/naive "
            f"{down / naive_d:.2f}   ours/server ceiling {down / ceiling_down:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
