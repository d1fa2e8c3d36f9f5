"""Transfer benchmark: our directory upload/download vs `cp -r` and a naive one-file-at-a-time loop.

    .venv/bin/python scripts/bench_transfer.py [--size-mib 1024]

Builds a model-like directory (a few large safetensors-sized files and small JSON files), starts the
embedded rclone S3 server, and prints MB/s for each method measured in the same run, with ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    from finetune_engine.storage import download_dir, make_client, upload_dir
    from finetune_engine.storage.local_server import ensure_running, stop

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        total = make_model_dir(src, args.size_mib)
        mb = total / 1e6
        env = ensure_running(tmp / "s3")
        os.environ.update(env)
        client = make_client()
        bucket = env["FINETUNE_BUCKET"]
        try:
            subprocess.run(["sync"], check=False)
            t_cp = timed(lambda: subprocess.run(["cp", "-r", str(src), str(tmp / "cp-copy")], check=True))
            files = sorted(p for p in src.rglob("*") if p.is_file())

            def naive_up():
                for p in files:
                    with open(p, "rb") as f:
                        client.put_object(Bucket=bucket, Key=f"naive/{p.relative_to(src)}", Body=f.read())

            def naive_down():
                out = tmp / "naive-down"
                out.mkdir()
                for p in files:
                    body = client.get_object(Bucket=bucket, Key=f"naive/{p.relative_to(src)}")["Body"].read()
                    (out / p.name).write_bytes(body)

            t_naive_up = timed(naive_up)
            t_naive_down = timed(naive_down)
            uri = f"s3://{bucket}/ours/model"
            t_up = timed(lambda: upload_dir(src, uri, progress=False))
            t_down = timed(lambda: download_dir(uri, tmp / "ours-down", progress=False))
            t_down_nohash = timed(lambda: download_dir(uri, tmp / "ours-down-nohash", progress=False,
                                                       verify_hashes=False))
        finally:
            stop(tmp / "s3")
        rows = [
            ("cp -r (local disk)", mb / t_cp),
            ("naive boto3 loop, upload", mb / t_naive_up),
            ("naive boto3 loop, download", mb / t_naive_down),
            ("upload_dir (ours)", mb / t_up),
            ("download_dir (ours, sha256 verified)", mb / t_down),
            ("download_dir (ours, sizes only)", mb / t_down_nohash),
        ]
        print(f"{total / 2**20:.0f} MiB in {len(files)} files, rclone serve s3 on loopback, {os.cpu_count()} CPUs")
        for name, rate in rows:
            print(f"  {name:<40} {rate:8.1f} MB/s")
        print(f"  upload:   ours/cp {mb / t_up / (mb / t_cp):.2f}  ours/naive {t_naive_up / t_up:.2f}")
        print(f"  download: ours/cp {mb / t_down / (mb / t_cp):.2f}  ours/naive {t_naive_down / t_down:.2f}")
        shutil.rmtree(tmp / "cp-copy", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
