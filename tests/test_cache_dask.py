"""Writing a store from several dask worker processes: complete, exact, and resumable after a crash."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from odkd.errors import OdkdError
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.synthetic import SyntheticTargets

# many small shards so that both workers interleave their writes in the same arrays
LAYOUT = StoreLayout(num_instances=300, num_joints=17, map_size=(24, 32), chunk_instances=8, shard_instances=32)
SETTINGS = {"dataset_fingerprint": "sha256:cccc"}


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


class DiesInShard:
    """Breaks in one shard, the way a worker dying mid-build does."""

    def __init__(self, shard: int):
        self.inner = SyntheticTargets(LAYOUT)
        self.shard = shard

    def __call__(self, start, stop):
        if start == self.shard * LAYOUT.shard_instances:
            raise RuntimeError(f"worker lost in shard {self.shard}")
        return self.inner(start, stop)


def test_two_workers_write_a_complete_exact_store(tmp_path, scheduler):
    """Every instance written by two worker processes reads back exactly as produced.

    Each task owns one whole shard (32 rows) and writes all of it in one go. Had tasks been
    given ranges that split a shard (say 20 rows each), two workers would read-modify-write the
    same shard object concurrently, and zarr 3 keeps whichever object is written last: the
    other task's rows come back as the fill value 0. The comparison below would then fail on
    meta/index (row i must hold i, while lost rows hold 0), on meta/ok (1 for every row) and on
    the maps themselves, row by row, for all 300 instances.
    """
    url = str(tmp_path / "s.zarr")
    summary = build_store(url, LAYOUT, SETTINGS, SyntheticTargets(LAYOUT), scheduler=scheduler, progress=False)
    assert summary.complete and summary.written == LAYOUT.num_shards == 10

    produce = SyntheticTargets(LAYOUT)
    targets = TeacherTargets.open(url, dataset_fingerprint="sha256:cccc")
    got = targets.get_batch(np.arange(len(targets)))
    np.testing.assert_array_equal(got["meta/index"], np.arange(300))
    assert got["meta/ok"].all()
    for shard in range(LAYOUT.num_shards):
        start, stop = LAYOUT.shard_range(shard)
        want = produce(start, stop).arrays
        for name, values in want.items():
            np.testing.assert_array_equal(got[name][start:stop], values, err_msg=f"{name} rows {start}..{stop}")


def test_crash_on_workers_then_resume_equals_uninterrupted(tmp_path, scheduler):
    clean, crashed = str(tmp_path / "clean.zarr"), str(tmp_path / "crashed.zarr")
    build_store(clean, LAYOUT, SETTINGS, SyntheticTargets(LAYOUT), scheduler=scheduler, progress=False)
    with pytest.raises(RuntimeError, match="worker lost in shard 4"):
        build_store(crashed, LAYOUT, SETTINGS, DiesInShard(4), scheduler=scheduler, progress=False)
    with pytest.raises(OdkdError, match="not finished"):
        TeacherTargets.open(crashed)

    summary = build_store(crashed, LAYOUT, SETTINGS, SyntheticTargets(LAYOUT), scheduler=scheduler, progress=False)
    assert summary.complete and summary.written >= 1 and summary.written + summary.skipped == LAYOUT.num_shards
    a, b = zarr.open_group(clean, mode="r"), zarr.open_group(crashed, mode="r")
    for name in LAYOUT.arrays():
        assert a[name][:].tobytes() == b[name][:].tobytes(), name

