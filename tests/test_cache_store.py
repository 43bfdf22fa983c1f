"""The teacher-target store without teachers: bit packing, layout, writing, resuming, reading, HTTP, info, verify."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from odkd.errors import OdkdError
from odkd.store import SCHEMA_VERSION, StoreLayout, TeacherTargets, bitpack_maps, build_store, cache_info, unpack_maps
from odkd.store.store import marker_path, read_markers, store_fs
from odkd.store.synthetic import SyntheticTargets
from odkd.teachers import verify_cache

LAYOUT = StoreLayout(num_instances=200, num_joints=17, map_size=(24, 32), chunk_instances=16, shard_instances=64)
SETTINGS = {"dataset_fingerprint": "sha256:aaaa", "threshold": 0.5}


def build(url, produce=None, settings=SETTINGS, **kwargs):
    return build_store(str(url), LAYOUT, settings, produce or SyntheticTargets(LAYOUT), scheduler="synchronous",
                       progress=False, **kwargs)


def expected_rows(produce, layout=LAYOUT) -> dict[str, np.ndarray]:
    """What the producer makes, shard by shard, computed independently of any store."""
    parts = [produce(*layout.shard_range(s)).arrays for s in range(layout.num_shards)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def read_all(url) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(url), mode="r")
    return {name: group[name][:] for name in LAYOUT.arrays()}


class FailAfter:
    """A producer that breaks on the shards in `broken`, as a crash mid-build would."""

    def __init__(self, broken: set[int]):
        self.inner = SyntheticTargets(LAYOUT)
        self.broken = broken

    def __call__(self, start, stop):
        if start // LAYOUT.shard_instances in self.broken:
            raise RuntimeError(f"worker died in shard at {start}")
        return self.inner(start, stop)


@pytest.mark.parametrize("width", [1, 7, 8, 13, 24, 48])
def test_bitpack_round_trip_any_width(width):
    rng = np.random.default_rng(width)
    binary = rng.random((3, 17, 5, width)) < 0.3
    packed = bitpack_maps(binary)
    assert packed.dtype == np.uint8 and packed.shape == (3, 17, 5, (width + 7) // 8)
    np.testing.assert_array_equal(unpack_maps(packed, width), binary)
    assert unpack_maps(packed, width).dtype == np.bool_


def test_bitpack_rejects_wrong_dtype_and_width():
    with pytest.raises(TypeError):
        bitpack_maps(np.zeros((1, 1, 2, 8), np.float32))
    with pytest.raises(ValueError):
        unpack_maps(np.zeros((1, 1, 2, 1), np.uint8), 9)


def test_layout_shards_cover_every_row_once():
    ranges = [LAYOUT.shard_range(s) for s in range(LAYOUT.num_shards)]
    assert ranges == [(0, 64), (64, 128), (128, 192), (192, 200)]
    with pytest.raises(OdkdError, match="cache.shard_instances"):
        StoreLayout(10, 17, (24, 32), chunk_instances=16, shard_instances=40)


def test_round_trip_is_bit_identical_with_zarr_layout(tmp_path):
    url = tmp_path / "s.zarr"
    summary = build(url)
    assert summary.complete and summary.written == 4 and summary.failed == []

    produce = SyntheticTargets(LAYOUT)
    want = expected_rows(produce)
    targets = TeacherTargets.open(str(url), dataset_fingerprint="sha256:aaaa")
    assert len(targets) == 200
    idx = np.random.default_rng(1).permutation(200)[:64]
    batch = targets.get_batch(idx)
    for name in LAYOUT.arrays():
        np.testing.assert_array_equal(batch[name], want[name][idx])
    maps = targets.unpack(batch)
    pt, st, mask, _ = produce.binary_maps(0, 64)
    first = idx < 64
    np.testing.assert_array_equal(maps["pt/heatmaps"][first], pt[idx[first]])
    np.testing.assert_array_equal(maps["st/heatmaps"][first], st[idx[first]])
    np.testing.assert_array_equal(maps["st/mask"][first], mask[idx[first]])
    assert maps["pt/heatmaps"].dtype == np.bool_ and maps["pt/heatmaps"].shape == (64, 17, 32, 24)

    meta = json.loads((url / "pt" / "heatmaps" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [16, 17, 32, 3]
    assert [c["name"] for c in sharding["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [64, 17, 32, 3]
    # one object per shard per array, not one per instance
    files = sorted(str(p.relative_to(url)) for p in (url / "pt" / "heatmaps").rglob("*") if p.is_file())
    assert files == ["pt/heatmaps/c/0/0/0/0", "pt/heatmaps/c/1/0/0/0", "pt/heatmaps/c/2/0/0/0",
                     "pt/heatmaps/c/3/0/0/0", "pt/heatmaps/zarr.json"]
    assert targets.attrs["schema_version"] == SCHEMA_VERSION


def test_memory_store_needs_in_process_writer():
    url = f"memory://odkd-test-{uuid.uuid4().hex}/s.zarr"
    with pytest.raises(OdkdError, match="synchronous"):
        build_store(url, LAYOUT, SETTINGS, SyntheticTargets(LAYOUT), workers=2, progress=False)
    build(url)
    batch = TeacherTargets.open(url).get_batch(np.arange(200))
    np.testing.assert_array_equal(batch["st/mask"], expected_rows(SyntheticTargets(LAYOUT))["st/mask"])


def test_interrupted_build_resumes_to_the_uninterrupted_store(tmp_path):
    clean, broken = tmp_path / "clean.zarr", tmp_path / "broken.zarr"
    build(clean)
    with pytest.raises(RuntimeError, match="worker died"):
        build(broken, FailAfter({2, 3}))
    fs, root = store_fs(str(broken))
    assert sorted(read_markers(fs, root, LAYOUT.num_shards)) == [0, 1]
    with pytest.raises(OdkdError, match="not finished"):
        TeacherTargets.open(str(broken))

    summary = build(broken)
    assert (summary.skipped, summary.written, summary.complete) == (2, 2, True)
    a, b = read_all(clean), read_all(broken)
    for name in LAYOUT.arrays():
        assert a[name].tobytes() == b[name].tobytes(), name


def test_resume_redoes_a_shard_whose_data_is_damaged_or_unmarked(tmp_path):
    url = tmp_path / "s.zarr"
    build(url)
    clean = read_all(url)
    # a crash after the data but before the marker, and a shard file cut short by a full disk
    (url / "done" / "000001.json").unlink()
    shard_file = url / "st" / "heatmaps" / "c" / "2" / "0" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:50])
    report = verify_cache(str(url))
    assert not report.ok
    assert any("never finished (1)" in line for line in report.lines)
    assert any("shard 2: st/heatmaps does not decode" in line for line in report.lines)

    summary = build(url)
    assert summary.written == 2 and summary.skipped == 2
    assert summary.redone == [summary.redone[0]] and "shard 2" in summary.redone[0]
    again = read_all(url)
    for name in LAYOUT.arrays():
        assert again[name].tobytes() == clean[name].tobytes(), name
    assert verify_cache(str(url)).ok


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    url = tmp_path / "s.zarr"
    build(url)
    other = {**SETTINGS, "threshold": 0.6}
    with pytest.raises(OdkdError, match=r"settings\.threshold 0\.5 != 0\.6.*--overwrite"):
        build(url, settings=other)
    summary = build(url, settings=other, overwrite=True)
    assert summary.written == LAYOUT.num_shards
    assert TeacherTargets.open(str(url)).attrs["settings"]["threshold"] == 0.6

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"x")
    with pytest.raises(OdkdError, match="not a teacher-target store"):
        build(precious, overwrite=True)
    assert (precious / "a.jpg").read_bytes() == b"x"


def test_fingerprint_mismatch_is_refused_naming_both(tmp_path):
    url = tmp_path / "s.zarr"
    build(url)
    with pytest.raises(OdkdError, match=r"sha256:aaaa.*sha256:bbbb"):
        TeacherTargets.open(str(url), dataset_fingerprint="sha256:bbbb")
    with pytest.raises(OdkdError, match="no teacher-target store"):
        TeacherTargets.open(str(tmp_path / "nothing.zarr"))


def test_failed_instances_are_listed_and_shown(tmp_path):
    class Skips(SyntheticTargets):
        def __call__(self, start, stop):
            out = super().__call__(start, stop)
            if start == 64:
                out.arrays["meta/ok"][3] = 0
                out.failed.append({"index": 67, "image_id": 22, "ann_id": 1067, "file": "x.jpg",
                                   "reason": "x.jpg: cannot decode image (corrupt or not an image)"})
            return out

    url = tmp_path / "s.zarr"
    summary = build(url, Skips(LAYOUT))
    assert [f["index"] for f in summary.failed] == [67]
    targets = TeacherTargets.open(str(url))
    assert targets.attrs["failed"][0]["reason"].endswith("cannot decode image (corrupt or not an image)")
    assert targets.get_batch(np.array([66, 67]), ["meta/ok"])["meta/ok"].tolist() == [1, 0]
    text = cache_info(str(url))
    assert "199 with targets, 1 failed" in text
    assert "#67 image 22 ann 1067: x.jpg: cannot decode image" in text


def test_info_reports_counts_sizes_and_progress(tmp_path):
    url = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        build(url, FailAfter({1, 2, 3}))
    text = cache_info(str(url))
    assert "1/4 shards, 64/200 instances (32.0%), not finished" in text
    assert "instances    200 (64 with targets, 0 failed, 136 not built yet)" in text  # what is built, not planned
    build(url)
    text = cache_info(str(url))
    assert "4/4 shards, 200/200 instances (100.0%)" in text and "not finished" not in text
    assert "instances    200 (200 with targets, 0 failed)" in text
    stored = sum(p.stat().st_size for name in ("pt/heatmaps", "st/heatmaps", "st/mask")
                 for p in (url / name / "c").rglob("*") if p.is_file())
    assert f"maps {stored / 200:.1f} B/instance" in text
    assert "x smaller" in text


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_store_reads_by_url_from_a_real_http_server(http_root):
    root, base = http_root
    build(root / "team.zarr")
    url = f"{base}/team.zarr"
    targets = TeacherTargets.open(url, dataset_fingerprint="sha256:aaaa")
    idx = np.array([199, 0, 64, 65, 130])
    local = TeacherTargets.open(str(root / "team.zarr")).get_batch(idx)
    remote = targets.get_batch(idx)
    for name in LAYOUT.arrays():
        np.testing.assert_array_equal(remote[name], local[name])
    assert "4/4 shards" in cache_info(url)
    assert verify_cache(url).ok
    assert Path(marker_path(str(root / "team.zarr"), 0)).is_file()
