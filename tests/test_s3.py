"""A team's store on S3, over the real protocol: moto's S3 server runs as a separate process on 127.0.0.1 and
every byte goes over HTTP through s3fs. Build (one process and a dask LocalCluster), kill + resume, two
builds at once, info, verify with a flipped byte, train-student through the local copy, a resume refused
after a rebuild, and each failure to reach the store as one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest
import zarr

from odkd.config import parse_config
from odkd.data.instances import load_instances
from odkd.errors import OdkdError
from odkd.store import StoreLayout, TeacherTargets, build_store, cache_info
from odkd.store.store import marker_path, shard_paths, store_fs
from odkd.store.synthetic import SyntheticTargets
from odkd.teachers import verify_cache
from conftest import make_tiny_world
from test_student import read_log, run_cli, student_toml

LAYOUT = StoreLayout(num_instances=120, num_joints=17, map_size=(24, 32), chunk_instances=8, shard_instances=16)
SETTINGS = {"dataset_fingerprint": "sha256:5353", "threshold": 0.5}
# what the tests give as credentials: moto takes any; none of it may reach a store, a run or a log
SECRET = "odkd-test-secret-7f3a9c"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "odkdtestkey", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 API server in its own process on a free loopback port; returns it and its endpoint."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("moto's server exited at start")
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto's server did not answer in 60 s")


@pytest.fixture(scope="module")
def s3_endpoint():
    server, endpoint = start_moto()
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch, tmp_path):
    """The environment an S3 user sets (credentials, region, endpoint), no ~/.aws, and a fresh bucket;
    returns the bucket's URL."""
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint,
                       "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"team-{uuid.uuid4().hex[:12]}"
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    return f"s3://{bucket}"


def odkd_process(*args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The odkd CLI in a process of its own: a new s3fs with the environment given, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "odkd", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


# one build_store in its own process, to kill or to run beside another: argv is the URL, the row from
# which each shard's production stalls (a process killed there leaves the earlier shards done), a pause
# before every shard, the layout and the settings
BUILD_SCRIPT = """
import json, sys, time
from odkd.store import StoreLayout, build_store
from odkd.store.synthetic import SyntheticTargets
layout = StoreLayout.from_dict(json.loads(sys.argv[4]))
inner = SyntheticTargets(layout)
stall_from, pause = int(sys.argv[2]), float(sys.argv[3])
def produce(start, stop):
    time.sleep(600 if start >= stall_from else pause)
    return inner(start, stop)
build_store(sys.argv[1], layout, json.loads(sys.argv[5]), produce, scheduler="synchronous", progress=False)
"""


def build_process(url: str, stall_from: int = 10**9, pause: float = 0.0, layout: StoreLayout = LAYOUT,
                  settings: dict = SETTINGS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, url, str(stall_from), str(pause),
                             json.dumps(layout.to_dict()), json.dumps(settings)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_shards(proc: subprocess.Popen, url: str, shards: int) -> None:
    """SIGKILL `proc` once the first `shards` shards of its build are marked done."""
    fs, root = store_fs(url)
    deadline = time.monotonic() + 120
    while not fs.exists(marker_path(root, shards - 1)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{shards} shards were not written in 120 s"
        time.sleep(0.2)
        fs.invalidate_cache()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def build(url: str, **kwargs):
    return build_store(url, LAYOUT, SETTINGS, SyntheticTargets(LAYOUT), scheduler="synchronous", progress=False,
                       **kwargs)


def arrays(url: str) -> dict[str, bytes]:
    group = zarr.open_group(url, mode="r")
    return {name: group[name][:].tobytes() for name in LAYOUT.arrays()}


def test_build_info_verify_and_read_over_s3_equal_a_disk(s3_env, tmp_path):
    url = f"{s3_env}/stores/team.zarr"
    summary = build(url)
    assert summary.complete and summary.written == LAYOUT.num_shards == 8
    local = str(tmp_path / "team.zarr")
    build(local)
    assert arrays(url) == arrays(local)

    fs, root = store_fs(url)
    assert fs.exists(marker_path(root, 7)) and not fs.exists(f"{root}/creating.json")
    text = cache_info(url)
    assert f"store        {url}" in text and "8/8 shards, 120/120 instances (100.0%)" in text
    report = verify_cache(url)
    assert report.ok, str(report)
    idx = np.array([119, 0, 16, 17, 64])
    remote, disk = TeacherTargets.open(url).get_batch(idx), TeacherTargets.open(local).get_batch(idx)
    for name in LAYOUT.arrays():
        np.testing.assert_array_equal(remote[name], disk[name])
    assert TeacherTargets.open(url).identity()["content_digest"] == TeacherTargets.open(local).identity()["content_digest"]


def test_a_build_killed_half_way_resumes_from_the_shards_done(s3_env):
    url = f"{s3_env}/killed.zarr"
    kill_after_shards(build_process(url, stall_from=3 * LAYOUT.shard_instances), url, 3)

    code, out = run_cli("cache", "info", url)
    assert code == 0 and "3/8 shards" in out and "not finished" in out, out
    with pytest.raises(OdkdError, match="the build is not finished; run odkd cache-teachers again to resume it"):
        TeacherTargets.open(url)
    summary = build(url)
    assert summary.complete and (summary.skipped, summary.written) == (3, 5) and not summary.redone
    clean = f"{s3_env}/clean.zarr"
    build(clean)
    assert arrays(url) == arrays(clean)


def test_two_builds_into_one_store_at_once_end_as_one_build(s3_env):
    url, clean = f"{s3_env}/shared.zarr", f"{s3_env}/clean.zarr"
    procs = [build_process(url, pause=0.2) for _ in range(2)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    build(clean)
    assert arrays(url) == arrays(clean)
    targets = TeacherTargets.open(url)
    assert targets.attrs["complete"]
    assert targets.identity()["content_digest"] == TeacherTargets.open(clean).identity()["content_digest"]
    assert verify_cache(url).ok


def test_verify_names_the_object_with_a_flipped_byte(s3_env):
    url = f"{s3_env}/flipped.zarr"
    build(url)
    fs, root = store_fs(url)
    obj = shard_paths(root, zarr.open_group(url, mode="r"), LAYOUT, 5)["st/heatmaps"]
    data = bytearray(fs.cat_file(obj))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(obj, bytes(data))
    report = verify_cache(url)
    assert not report.ok
    assert any("shard 5" in line and "st/heatmaps" in line for line in report.lines if line.startswith("FAIL")), str(report)
    code, out = run_cli("cache", "verify", url)
    assert code == 1 and "shard 5" in out


@pytest.fixture
def s3_world(s3_env, tmp_path):
    """The tiny world's data and teachers on disk, its store built into the bucket by `odkd cache-teachers`
    on a dask LocalCluster of two processes, and a pipeline whose student reads it."""
    base = make_tiny_world(tmp_path / "world", val_images=2)
    url = f"{s3_env}/tiny/store.zarr"
    config = base / "p.toml"
    config.write_text(student_toml(base, store=url))
    code, out = run_cli("cache-teachers", "--config", config, "--out", url, "--workers", "2")
    assert code == 0 and f"teacher targets in {url}" in out, out
    return base, config, url


def test_train_student_reads_the_s3_store_through_its_local_copy_and_keeps_no_secret(s3_world, tmp_path, monkeypatch):
    base, config, url = s3_world
    copies = tmp_path / "copies"
    monkeypatch.setenv("ODKD_LOCAL_COPIES", str(copies))
    code, out = run_cli("train-student", "--config", config, "--out", base / "student")
    assert code == 0, out
    assert [entry["epoch"] for entry in read_log(base / "student")] == [1, 2, 3]
    [copy] = [path for path in copies.iterdir() if path.is_dir()]
    assert json.loads((copy / "store.json").read_text())["url"] == url
    info = run_cli("cache", "info", url)[1]
    assert TeacherTargets.open(url).identity()["content_digest"] in info

    # the secret of the environment is in no object of the bucket, no file of the run, no output
    fs, root = store_fs(url)
    for path in fs.find(root):
        assert SECRET.encode() not in fs.cat_file(path), path
    for path in (base / "student").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out and SECRET not in info


def test_a_resume_is_refused_after_the_s3_store_is_rebuilt(s3_world):
    base, config, url = s3_world
    code, out = run_cli("train-student", "--config", config, "--out", base / "student",
                        "--set", "student.stages[1].epochs=1")
    assert code == 0, out
    code, out = run_cli("cache-teachers", "--config", config, "--out", url, "--workers", "1", "--overwrite",
                        "--set", "cache.threshold=0.4")
    assert code == 0, out
    code, out = run_cli("train-student", "--config", config, "--out", base / "student", "--resume",
                        "--set", "student.stages[1].epochs=1")
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert "the teacher store changed since this run started" in out, out


def test_storage_options_from_the_pipeline_reach_the_store(s3_env, tmp_path, monkeypatch):
    url = f"{s3_env}/options.zarr"
    build(url)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    env = {key: value for key, value in os.environ.items() if key != "AWS_ENDPOINT_URL"}
    config = tmp_path / "p.toml"
    config.write_text(f'[cache]\nstorage_options = {{ endpoint_url = "{endpoint}" }}\n')
    done = odkd_process("cache", "info", url, "--config", config, env=env)
    assert done.returncode == 0 and "8/8 shards" in done.stdout, done.stderr
    config.write_text('[cache]\nstorage_options = { key = "AKIA", secret = "s" }\n')
    done = odkd_process("cache", "info", url, "--config", config, env=env)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{config}: cache.storage_options.key: credentials never go in a pipeline file" in done.stderr


@pytest.fixture(scope="module")
def auth_endpoint():
    """A second S3 server that checks credentials against its own IAM, where the tests' keys do not exist."""
    server, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.parametrize("problem", ["no credentials", "access denied", "no bucket", "no answer", "half-written"])
def test_each_failure_to_reach_an_s3_store_is_one_line_naming_it(problem, s3_env, auth_endpoint, tmp_path):
    """cache info, train-student and cache-teachers, each in a process of its own as a user runs them."""
    url = f"{s3_env}/store.zarr"
    base = make_tiny_world(tmp_path / "world", val_images=2)
    config = base / "p.toml"
    config.write_text(student_toml(base, store=url))
    env = dict(os.environ)
    commands = [("cache", "info", url), ("train-student", "--config", config),
                ("cache-teachers", "--config", config, "--out", url, "--workers", "1")]
    if problem == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        want = "no credentials to reach it"
    elif problem == "access denied":
        env["AWS_ENDPOINT_URL"] = auth_endpoint
        want = "access denied"
    elif problem == "no bucket":
        url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store.zarr"
        config.write_text(student_toml(base, store=url))
        commands = [tuple(url if arg == f"{s3_env}/store.zarr" else arg for arg in c) for c in commands]
        want = "does not exist"
    elif problem == "no answer":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        want = "the storage does not answer"
    else:  # a build of the student's own store, killed after its first shard
        fingerprint = load_instances(parse_config(config.read_text()).data, "train").fingerprint
        layout = StoreLayout(16, 17, (24, 32), chunk_instances=4, shard_instances=8)
        kill_after_shards(build_process(url, stall_from=8, layout=layout,
                                        settings={"dataset_fingerprint": fingerprint, "split": "train"}), url, 1)
        commands = [("train-student", "--config", config)]
        want = "the build is not finished; run odkd cache-teachers again to resume it"
    for command in commands:
        done = odkd_process(*command, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, (command, done.stderr)
        assert url in lines[0] and want in lines[0], (command, lines[0])
        assert SECRET not in done.stderr + done.stdout
