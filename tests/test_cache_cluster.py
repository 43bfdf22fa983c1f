"""The cache build spread out: an external dask cluster started from the CLI, workers pinned to their
GPU, and parallel decode threads, each giving exactly the store that one process gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from odkd.config import parse_config
from odkd.data.instances import load_instances
from odkd.data.transforms import normalize_image
from odkd.store import TeacherTargets
from odkd.store.writer import dask_client
from odkd.teachers import build_cache
from odkd.teachers.build import gpu_worker_envs
from odkd.teachers.producer import normalization_table, normalize_on_device
from conftest import TINY_TEACHERS_TOML, make_tiny_world

TEACHERS = {"primary": ({"width": 8}, False), "senior": ({"width": 8}, True)}
START_TIMEOUT = 120.0  # seconds for a CLI scheduler or worker to come up on a loaded machine


def make_config(root, runs):
    return parse_config(f"""
runs = "{runs}"
[data]
root = "{root}"
input_size = [96, 128]
heatmap_size = [24, 32]
{TINY_TEACHERS_TOML}
[cache]
chunk_instances = 4
shard_instances = 8
batch_size = 3
""")


def same_stores(a_url: str, b_url: str) -> None:
    a, b = zarr.open_group(a_url, mode="r"), zarr.open_group(b_url, mode="r")
    for name in TeacherTargets.open(a_url).layout.arrays():
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    assert a.attrs["settings"] == b.attrs["settings"] and a.attrs["failed"] == b.attrs["failed"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic dataset of 16 train instances and two seeded tiny teachers at runs/teacher_*/best.pth."""
    base = make_tiny_world(tmp_path_factory.mktemp("cache_cluster"), val_images=1)
    return base


@pytest.fixture(scope="module")
def local_store(world):
    """The reference: a LocalCluster of two workers."""
    cfg = make_config(world / "data", world / "runs")
    return build_cache(cfg, "train", str(world / "local.zarr"), workers=2, progress=False, torch_threads=1)


def _wait_for(path, procs, deadline: float) -> None:
    while not path.exists():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written in {START_TIMEOUT:.0f} s")
        time.sleep(0.2)


@pytest.fixture
def cli_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, started the way a user starts them."""
    from distributed import Client

    address_file = tmp_path / "scheduler.json"  # the scheduler picks a free port and writes it here
    dask_cli = [sys.executable, "-m", "dask"]  # the tests' own interpreter: workers import this odkd
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    procs = []
    try:
        procs.append(subprocess.Popen(
            [*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(address_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w")))
        deadline = time.monotonic() + START_TIMEOUT
        _wait_for(address_file, procs, deadline)
        for i in range(2):
            procs.append(subprocess.Popen(
                [*dask_cli, "worker", "--scheduler-file", str(address_file), "--host", "127.0.0.1",
                 "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", f"cli-worker-{i}"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker{i}.log", "w")))
        address = json.loads(address_file.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def test_cli_started_cluster_builds_the_local_clusters_store(world, local_store, cli_cluster):
    cfg = make_config(world / "data", world / "runs")
    out = str(world / "external.zarr")
    assert build_cache(cfg, "train", out, scheduler=cli_cluster, progress=False, torch_threads=1) == out
    assert TeacherTargets.open(out).attrs["complete"]
    same_stores(local_store, out)


def test_decode_threads_do_not_change_the_store(world, local_store, tmp_path):
    """Crops made by three threads, one job per image, in batches that split an image's people, with an
    unreadable image among them: the store and its failure list are those of one thread."""
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    cfg = make_config(data, world / "runs")
    instances = load_instances(cfg.data, "train")
    instances.image_path(instances[5]).write_bytes(b"not a jpeg")
    one = build_cache(cfg, "train", str(tmp_path / "one.zarr"), scheduler="synchronous", progress=False,
                      decode_threads=1)
    three = build_cache(cfg, "train", str(tmp_path / "three.zarr"), scheduler="synchronous", progress=False,
                        decode_threads=3)
    same_stores(one, three)
    failed = TeacherTargets.open(three).attrs["failed"]
    assert failed and {f["index"] for f in failed} >= {5}
    ok = TeacherTargets.open(three).get_batch(np.arange(16), ["meta/ok"])["meta/ok"]
    assert ok.sum() == 16 - len(failed)


def test_crops_travel_as_bytes_and_normalize_to_normalize_images_bits():
    crops = np.random.default_rng(0).integers(0, 256, (3, 32, 24, 3), dtype=np.uint8)
    crops[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [7, 128, 250]]
    got = normalize_on_device(torch.from_numpy(crops), torch.from_numpy(normalization_table()))
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert got.numpy().tobytes() == np.stack([normalize_image(c) for c in crops]).tobytes()


def test_each_local_worker_sees_its_own_gpu():
    assert gpu_worker_envs(3, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "1", "0")]
    with dask_client(None, 2, gpu_worker_envs(2, ["0", "GPU-5c1a"])) as client:
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("MALLOC_TRIM_THRESHOLD_")))
    assert sorted(seen.values()) == [("0", None), ("GPU-5c1a", None)]
