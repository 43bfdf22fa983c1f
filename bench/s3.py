"""A store on S3 against the same store on a local disk, in one run: the build's and the first local copy's throughput.

    .venv/bin/python bench/s3.py [--instances 32768] [--workers 1 2] [--record]

The S3 side is moto's S3 server, started here as its own process on 127.0.0.1: every byte goes over HTTP
through s3fs, as to MinIO or AWS, but the loopback has no network latency and moto keeps objects in
memory, so the S3 figures are an upper bound on what a real endpoint gives (a lower bound on its latency).
The rows are COCO's geometry (64x80 stored maps, margin 1.25), drawn from a pool of distinct synthetic
rows as bench/scale.py does, in shards of 1024; the producer costs nothing, so the build's rate is the
store's own: encode, write, markers. "copy" is the first train-student's local copy of every array:
each shard read, checked against its digests and written to a local folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cache import record, table  # bench/cache.py, beside this script
from scale import COCO, MAP_SIZE, POOL, PooledTargets  # bench/scale.py
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.local import LocalRows
from odkd.store.synthetic import SyntheticTargets

SECTION = "## A store on S3 against a local disk (bench/s3.py)"


def moto_endpoint() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, once it accepts connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto's server did not start")


def timed_build(url: str, layout: StoreLayout, pool: dict, workers: int) -> float:
    t0 = time.perf_counter()
    build_store(url, layout, {"dataset_fingerprint": "s3-bench"}, PooledTargets(pool),
                scheduler="synchronous" if workers == 1 else None, workers=workers, progress=False)
    return time.perf_counter() - t0


def timed_copy(url: str, copies: Path) -> float:
    targets = TeacherTargets.open(url)
    t0 = time.perf_counter()
    LocalRows.fetch(targets, list(targets.names), root=copies)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=32768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="build processes: 1 writes from this process, more from a dask LocalCluster")
    parser.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md, {SECTION!r}")
    args = parser.parse_args(argv)

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[key] = value
    server, endpoint = moto_endpoint()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    tmp = Path(tempfile.mkdtemp(prefix="odkd-s3-bench-"))
    try:
        import fsspec

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3").mkdir(bucket)
        layout = StoreLayout(args.instances, 17, MAP_SIZE, chunk_instances=64, shard_instances=1024)
        pool_layout = StoreLayout(POOL, 17, MAP_SIZE, chunk_instances=64, shard_instances=POOL)
        pool = SyntheticTargets(pool_layout, sigma=COCO.data.sigma)(0, POOL).arrays
        rows = []
        for workers in args.workers:
            seconds = {}
            for where, url in (("disk", str(tmp / f"w{workers}.zarr")), ("s3", f"s3://{bucket}/w{workers}.zarr")):
                build_s = timed_build(url, layout, pool, workers)
                copy_s = timed_copy(url, tmp / f"copies-{where}-{workers}")
                seconds[where] = (build_s, copy_s)
            (disk_build, disk_copy), (s3_build, s3_copy) = seconds["disk"], seconds["s3"]
            n = args.instances
            rows.append([workers, f"{n / disk_build:,.0f}", f"{n / s3_build:,.0f}", f"{disk_build / s3_build:.2f}",
                         f"{n / disk_copy:,.0f}", f"{n / s3_copy:,.0f}", f"{disk_copy / s3_copy:.2f}"])
        text = table(["build processes", "build, disk (inst/s)", "build, S3 (inst/s)", "S3 / disk",
                      "first copy, disk (inst/s)", "first copy, S3 (inst/s)", "S3 / disk"], rows)
        print(text)
        if args.record:
            record(f"{args.instances:,} instances at 64x80, shards of 1024, moto's server on 127.0.0.1, "
                   f"{os.cpu_count()} CPU cores.\n\n```sh\n.venv/bin/python bench/s3.py "
                   f"--instances {args.instances} --workers {' '.join(map(str, args.workers))} --record\n```\n\n"
                   + text, SECTION)
    finally:
        server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
