"""The per-machine local copy of a store's rows: one copy shared by processes, read rather than mapped, never
half-written, never stale, never from a damaged shard, and rows that travel with their samples through the loader."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from odkd.errors import OdkdError
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.local import LocalRows
from odkd.store.store import shard_paths, store_fs
from odkd.store.synthetic import SyntheticTargets

LAYOUT = StoreLayout(num_instances=200, num_joints=17, map_size=(24, 32), chunk_instances=16, shard_instances=64)
SETTINGS = {"dataset_fingerprint": "sha256:aaaa", "threshold": 0.5}
MAPS = ["pt/heatmaps", "st/heatmaps", "st/mask"]
ALL = sorted(LAYOUT.arrays())


def build(url: Path, seed: int = 0, layout: StoreLayout = LAYOUT, **kwargs) -> TeacherTargets:
    build_store(str(url), layout, SETTINGS, SyntheticTargets(layout, seed=seed), scheduler="synchronous",
                progress=False, **kwargs)
    return TeacherTargets.open(str(url))


def rows_of(rows: LocalRows, indices) -> dict[str, np.ndarray]:
    per = [rows.row(i) for i in indices]
    return {name: np.stack([r[name] for r in per]) for name in rows.names}


def test_rows_equal_the_store_rows(tmp_path):
    targets = build(tmp_path / "s.zarr")
    rows = LocalRows.fetch(targets, ALL, root=tmp_path / "copies")
    idx = np.array([0, 5, 63, 64, 130, 199])
    got, want = rows_of(rows, idx), targets.get_batch(idx)
    assert set(got) == set(ALL)
    for name in ALL:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name])
    # maps are stored compressed row by row; the small arrays as they are
    folder = rows.folder
    raw_row = int(np.prod(LAYOUT.arrays()["pt/heatmaps"].tail))
    assert (folder / "pt-heatmaps" / "rows.zst").stat().st_size < 200 * raw_row / 4
    records = np.load(folder / "meta-center" / "rows.npy")  # each row beside the CRC32 of its bytes
    assert records.shape == (200,) and records["row"].shape == (200, 2)
    np.testing.assert_array_equal(records["row"], targets.get_batch(np.arange(200))["meta/center"])
    assert records["crc32"][7] == zlib.crc32(records["row"][7].tobytes())


def test_only_the_named_arrays_are_copied_and_more_are_added_later(tmp_path):
    targets = build(tmp_path / "s.zarr")
    rows = LocalRows.fetch(targets, ["pt/heatmaps", "meta/ok"], root=tmp_path / "copies")
    assert sorted(p.name for p in rows.folder.iterdir() if p.is_dir()) == ["meta-ok", "pt-heatmaps"]
    more = LocalRows.fetch(targets, ["st/mask", "pt/heatmaps"], root=tmp_path / "copies")
    assert more.folder == rows.folder
    assert sorted(p.name for p in rows.folder.iterdir() if p.is_dir()) == ["meta-ok", "pt-heatmaps", "st-mask"]
    with pytest.raises(OdkdError, match="no arrays"):
        LocalRows.fetch(targets, ["pt/nothing"], root=tmp_path / "copies")


def _mapped_from(folder: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]


def _read_every_row_in_process(rows: LocalRows, queue) -> None:
    queue.put((rows_of(rows, range(LAYOUT.num_instances)), _mapped_from(rows.folder)))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_every_row_is_read_not_mapped_in_the_process_and_in_its_workers(tmp_path, start):
    targets = build(tmp_path / "s.zarr")
    rows = LocalRows.fetch(targets, ALL, root=tmp_path / "copies")
    want = targets.get_batch(np.arange(LAYOUT.num_instances))
    # read here first, so a forked worker inherits open files (a DataLoader forks); a spawned one unpickles
    here = rows_of(rows, range(LAYOUT.num_instances))
    ctx = multiprocessing.get_context(start)
    queue = ctx.Queue()
    worker = ctx.Process(target=_read_every_row_in_process, args=(rows, queue))
    worker.start()
    there, mapped_there = queue.get(timeout=120)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    for got in (here, there):
        for name in ALL:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            np.testing.assert_array_equal(got[name], want[name])
    # the copy stays in the page cache, in no process's mappings (so in no process's PSS)
    assert _mapped_from(rows.folder) == [] and mapped_there == []
    for outside in (LAYOUT.num_instances, -1):
        with pytest.raises(IndexError):
            rows.row(outside)


def test_a_local_copy_cut_short_later_is_one_line_naming_the_file(tmp_path):
    targets = build(tmp_path / "s.zarr")
    rows = LocalRows.fetch(targets, MAPS, root=tmp_path / "copies")
    blob = rows.folder / "st-heatmaps" / "rows.zst"
    blob.write_bytes(blob.read_bytes()[:-1])
    np.testing.assert_array_equal(rows.row(0)["st/heatmaps"], targets.get_batch(np.array([0]))["st/heatmaps"][0])
    with pytest.raises(OdkdError) as err:
        rows.row(LAYOUT.num_instances - 1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{blob.parent}: ") and "rows.zst" in message


def _fetch_in_process(url: str, root: str, queue) -> None:
    rows = LocalRows.fetch(TeacherTargets.open(url), MAPS, root=Path(root))
    blob = rows.folder / "st-heatmaps" / "rows.zst"
    queue.put((str(rows.folder), os.stat(blob).st_ino, rows.row(7)["st/heatmaps"].tobytes()))


def test_two_processes_share_one_copy(tmp_path):
    url = str(tmp_path / "s.zarr")
    build(Path(url))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(url, str(tmp_path / "copies"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (folder_a, inode_a, row_a), (folder_b, inode_b, row_b) = got
    assert folder_a == folder_b and inode_a == inode_b and row_a == row_b
    assert [p.name for p in (tmp_path / "copies").iterdir() if p.is_dir()] == [Path(folder_a).name]
    assert not list(Path(folder_a).glob("*.partial-*"))


def test_a_copy_killed_half_way_is_never_used(tmp_path):
    big = StoreLayout(num_instances=6000, num_joints=17, map_size=(24, 32), chunk_instances=64, shard_instances=256)
    url = tmp_path / "big.zarr"
    targets = build(url, layout=big)
    root = tmp_path / "copies"
    code = ("import sys; from pathlib import Path; from odkd.store.local import LocalRows; "
            "from odkd.store.reader import TeacherTargets; "
            "LocalRows.fetch(TeacherTargets.open(sys.argv[1]), ['pt/heatmaps', 'st/heatmaps'], root=Path(sys.argv[2]))")
    child = subprocess.Popen([sys.executable, "-c", code, str(url), str(root)])
    deadline = time.monotonic() + 120
    while not list(root.glob("*/*.partial-*")):
        assert child.poll() is None and time.monotonic() < deadline, "the copy ended before it could be killed"
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    folder = next(p for p in root.iterdir() if p.is_dir())
    assert list(folder.glob("*.partial-*")) and not (folder / "pt-heatmaps").exists()
    rows = LocalRows.fetch(targets, ["pt/heatmaps", "st/heatmaps"], root=root)
    assert rows.folder == folder and not list(folder.glob("*.partial-*"))
    idx = np.array([0, 2999, 5999])
    np.testing.assert_array_equal(rows_of(rows, idx)["pt/heatmaps"], targets.get_batch(idx)["pt/heatmaps"])


def test_another_store_and_a_rebuilt_store_get_their_own_copies(tmp_path):
    root = tmp_path / "copies"
    first = build(tmp_path / "s.zarr", seed=0)
    other = build(tmp_path / "t.zarr", seed=1)
    a = LocalRows.fetch(first, MAPS, root=root)
    b = LocalRows.fetch(other, MAPS, root=root)
    assert a.folder != b.folder
    assert not np.array_equal(a.row(3)["pt/heatmaps"], b.row(3)["pt/heatmaps"])
    # rebuilt under the same path with other contents (same settings, same second): never the old rows
    rebuilt = build(tmp_path / "s.zarr", seed=2, overwrite=True)
    c = LocalRows.fetch(rebuilt, MAPS, root=root)
    assert c.folder != a.folder
    np.testing.assert_array_equal(c.row(3)["pt/heatmaps"], rebuilt.get_batch(np.array([3]))["pt/heatmaps"][0])
    assert c.identity["content_digest"] != a.identity["content_digest"]
    assert c.identity["settings_digest"] == a.identity["settings_digest"] and c.identity["url"] == a.identity["url"]


def _damage(url: Path, name: str, shard: int, how: str) -> Path:
    targets = TeacherTargets.open(str(url))
    fs, root = store_fs(str(url))
    path = Path(shard_paths(root, zarr.open_group(str(url), mode="r"), targets.layout, shard)[name])
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, how):
    url = tmp_path / "s.zarr"
    build(url)
    path = _damage(url, "st/heatmaps", 2, how)
    root = tmp_path / "copies"
    with pytest.raises(OdkdError) as err:
        LocalRows.fetch(TeacherTargets.open(str(url)), MAPS, root=root)
    message = str(err.value)
    assert "\n" not in message and "st/heatmaps shard 2" in message and str(path) in message
    assert f"odkd cache verify {url}" in message
    folder = next(p for p in root.iterdir() if p.is_dir())
    assert not [p for p in folder.iterdir() if p.is_dir()]  # nothing half-made is left to be used


def test_samples_carry_their_rows_through_loader_workers(tmp_path):
    from odkd.config import DataConfig
    from odkd.data.dataset import EpochSampler, TopDownDataset, make_loader
    from odkd.data.instances import load_instances
    from odkd.synth import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", train_images=4, val_images=1, seed=0)
    data = DataConfig(root=str(tmp_path / "data"), input_size=(96, 128), heatmap_size=(24, 32))
    instances = load_instances(data, "train")
    layout = StoreLayout(num_instances=len(instances), num_joints=17, map_size=(24, 32), chunk_instances=4,
                         shard_instances=8)
    targets = build(tmp_path / "s.zarr", layout=layout)
    rows = LocalRows.fetch(targets, MAPS + ["meta/center", "meta/scale", "meta/ok", "pt/conf"], root=tmp_path / "c")
    dataset = TopDownDataset(instances, data, train=True, seed=0, stored_rows=rows)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=0)
    loader = make_loader(dataset, batch_size=3, workers=2, sampler=sampler)
    seen = 0
    for batch in loader:
        want = targets.get_batch(batch["index"].numpy())
        for name in rows.names:
            assert torch.is_tensor(batch[name])
            np.testing.assert_array_equal(batch[name].numpy(), want[name])
        assert batch["teacher_theta"].shape == (len(batch["index"]), 2, 3)
        seen += len(batch["index"])
    assert seen == len(instances)
