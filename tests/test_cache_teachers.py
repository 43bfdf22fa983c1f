"""build_cache with real (tiny) teachers on a synthetic COCO dataset: the stored targets are the teachers'."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
import zarr

from odkd.config import parse_config
from odkd.data.image import read_image
from odkd.data.instances import load_instances
from odkd.data.transforms import CropFrame, affine_transform, crop_image, normalize_image
from odkd.errors import OdkdError
from odkd.models import build_model, load_checkpoint, model_fingerprint, save_checkpoint
from odkd.models.inference import predict_batch
from odkd.store import TeacherTargets, cache_info, unpack_maps
from odkd.store.binarize import binarize, gate_by_mask
from odkd.store.geometry import cache_geometry, stored_frame_scale
from odkd.teachers import build_cache, verify_cache
from conftest import TINY_TEACHERS, make_tiny_world

TEACHERS = TINY_TEACHERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(root, runs, margin=1.25, primary="", senior="seg_head = true", cache=""):
    """The demo geometry, two tiny teachers, small chunks and shards; extra TOML lines per section."""
    return parse_config(f"""
runs = "{runs}"
[data]
root = "{root}"
input_size = [96, 128]
heatmap_size = [24, 32]
sigma = 1.0
[teachers.primary]
model = "hrnet_tiny"
model_args = {{ width = 8 }}
{primary}
[teachers.senior]
model = "hrnet_tiny"
model_args = {{ width = 8 }}
{senior}
[cache]
threshold = 0.5
threshold_mode = "relative"
margin = {margin}
chunk_instances = 4
shard_instances = 8
batch_size = 5
{cache}
""")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6-image synthetic dataset (16 train instances) and two tiny teachers at runs/teacher_*/best.pth."""
    base = make_tiny_world(tmp_path_factory.mktemp("cache_teachers"), val_images=2, val_aps={"primary": -1.0, "senior": 0.25})
    return base


@pytest.fixture(scope="module")
def built(world):
    cfg = make_config(world / "data", world / "runs")
    url = build_cache(cfg, "train", str(world / "train.zarr"), scheduler="synchronous", progress=False,
                      device="auto")
    return cfg, url


def teacher(world, role):
    args, seg = TEACHERS[role]
    model = build_model("hrnet_tiny", seg_head=seg, **args)
    load_checkpoint(model, world / "runs" / f"teacher_{role}" / "best.pth")
    return model.eval()


def test_geometry_keeps_the_pixel_scale_and_the_center():
    assert cache_geometry((24, 32), (96, 128), 1.0) == ((24, 32), (96, 128))
    assert cache_geometry((24, 32), (96, 128), 1.25) == ((32, 40), (128, 160))
    assert cache_geometry((48, 64), (192, 256), 1.25) == ((64, 80), (256, 320))
    with pytest.raises(OdkdError, match="cache.margin"):
        cache_geometry((24, 32), (96, 128), 0.9)
    center, scale = np.array([150.0, 120.0]), np.array([0.6, 0.8], np.float32)
    student = CropFrame(center=tuple(center), scale=tuple(scale)).matrix((24, 32))
    wide_scale = stored_frame_scale(scale, (24, 32), (32, 40))
    stored = CropFrame(center=tuple(center), scale=tuple(wide_scale)).matrix((32, 40))
    points = np.array([[10.0, 20.0], [150.0, 120.0], [300.0, 5.0]])
    # the same image point lands (4, 4) map pixels further in the wider crop: same scale, same center
    np.testing.assert_allclose(affine_transform(points, stored) - affine_transform(points, student),
                               [[4.0, 4.0]] * 3, atol=1e-4)


def test_binarize_and_mask_gate():
    maps = torch.tensor([[[[0.2, 0.6], [0.4, 0.1]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert binarize(maps, 0.5, "absolute")[0, 0].tolist() == [[False, True], [False, False]]
    assert binarize(maps, 0.5, "relative")[0, 0].tolist() == [[False, True], [True, False]]
    assert not binarize(maps, 0.5, "relative")[0, 1].any()  # no positive peak, no response
    binary = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2, 2] = True
    assert gate_by_mask(binary, mask, 0).sum() == 1
    assert gate_by_mask(binary, mask, 1)[0, 0].int().tolist() == [
        [0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]


def test_stored_targets_are_the_teachers_outputs(world, built):
    cfg, url = built
    instances = load_instances(cfg.data, "train")
    targets = TeacherTargets.open(url, dataset_fingerprint=instances.fingerprint)
    assert len(targets) == len(instances) == 16
    idx = np.array([0, 7, 8, 15])
    batch = targets.get_batch(idx)
    assert batch["meta/ok"].all()
    np.testing.assert_array_equal(batch["meta/ann_id"], [instances[i].ann_id for i in idx])

    frames = [CropFrame(center=tuple(map(float, instances[i].center)),
                        scale=tuple(map(float, stored_frame_scale(instances[i].scale, (24, 32), (32, 40)))))
              for i in idx]
    np.testing.assert_allclose(batch["meta/scale"], [f.scale for f in frames], rtol=1e-6)
    images = torch.from_numpy(np.stack([
        normalize_image(crop_image(read_image(instances.image_path(instances[i])), f, (128, 160)))
        for i, f in zip(idx, frames)]))
    for key, role in (("pt", "primary"), ("st", "senior")):
        heatmaps, mask = predict_batch(teacher(world, role), images, flip_test=True, shift_heatmap=True)
        assert heatmaps.shape == (4, 17, 40, 32)
        peak = heatmaps.amax(dim=(2, 3), keepdim=True)
        want = ((heatmaps >= 0.5 * peak) & (peak > 0)).numpy()
        got = unpack_maps(batch[f"{key}/heatmaps"], 32)
        np.testing.assert_array_equal(got, want)
        assert 0 < got.mean() < 0.9
        np.testing.assert_allclose(batch[f"{key}/conf"].astype(np.float32), peak[..., 0, 0].numpy(), rtol=1e-3)
        if key == "st":
            np.testing.assert_array_equal(unpack_maps(batch["st/mask"], 32), (mask >= 0.5).numpy())


def test_provenance_info_and_verify(world, built):
    cfg, url = built
    attrs = TeacherTargets.open(url).attrs
    s = attrs["settings"]
    assert (s["margin"], s["map_size"], s["teacher_input_size"]) == (1.25, [32, 40], [128, 160])
    assert s["threshold_mode"] == "relative"
    assert s["dataset_fingerprint"] == load_instances(cfg.data, "train").fingerprint
    ckpt = world / "runs" / "teacher_senior" / "best.pth"
    assert s["teachers"]["st"]["fingerprint"] == model_fingerprint(teacher(world, "senior").state_dict())
    assert attrs["teachers"]["st"] == {"role": "senior", "model": "hrnet_tiny", "checkpoint": str(ckpt),
                                       "fingerprint": s["teachers"]["st"]["fingerprint"], "val_ap": 0.25}
    assert attrs["teachers"]["pt"]["val_ap"] is None
    assert attrs["pipeline"]["cache"]["shard_instances"] == 8 and attrs["odkd_version"]

    text = cache_info(url)
    assert "2/2 shards, 16/16 instances (100.0%)" in text
    assert "val AP 0.2500" in text and "margin 1.25 -> maps 32x40 from teacher input 128x160" in text

    report = verify_cache(url, cfg, sample=6)
    assert report.ok, str(report)
    assert any("pt/heatmaps: 0 of" in line for line in report.lines)
    assert any("dataset fingerprint" in line and line.startswith("ok") for line in report.lines)


def test_rerun_resumes_and_other_settings_are_refused(world, built):
    cfg, url = built
    before = zarr.open_group(url, mode="r")["st/heatmaps"][:]
    assert build_cache(cfg, "train", url, scheduler="synchronous", progress=False) == url
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["st/heatmaps"][:], before)
    other = make_config(world / "data", world / "runs", cache="mask_gate = true")
    with pytest.raises(OdkdError, match="settings.mask_gate False != True.*--overwrite"):
        build_cache(other, "train", url, scheduler="synchronous", progress=False)


def test_unreadable_image_is_skipped_and_listed(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    cfg = make_config(data, world / "runs", margin=1.0)
    instances = load_instances(cfg.data, "train")
    broken = instances.image_path(instances[8])
    broken.write_bytes(b"not a jpeg")
    hit = [i.index for i in instances.instances if instances.image_path(i) == broken]
    url = build_cache(cfg, "train", str(tmp_path / "s.zarr"), scheduler="synchronous", progress=False)

    targets = TeacherTargets.open(url)
    assert [f["index"] for f in targets.attrs["failed"]] == hit
    assert all("cannot decode image" in f["reason"] and f["file"] == str(broken) for f in targets.attrs["failed"])
    batch = targets.get_batch(np.arange(16))
    assert np.flatnonzero(batch["meta/ok"] == 0).tolist() == hit
    assert not batch["pt/heatmaps"][hit].any()
    assert batch["pt/heatmaps"][[i for i in range(16) if i not in hit]].any(axis=(1, 2, 3)).all()
    assert f"{16 - len(hit)} with targets, {len(hit)} failed" in cache_info(url)


def test_teacher_problems_fail_before_any_work(world, tmp_path):
    wrong = tmp_path / "wrong.pth"
    save_checkpoint(wrong, build_model("hrnet_tiny", width=16), model_name="hrnet_tiny", model_args={"width": 16},
                    seg_head=False)
    out = tmp_path / "s.zarr"
    bad = make_config(world / "data", world / "runs", primary=f'checkpoint = "{wrong}"')
    with pytest.raises(OdkdError, match=f"{wrong}: .*does not fit the model|{wrong}: key"):
        build_cache(bad, "train", str(out), scheduler="synchronous", progress=False)
    assert not out.exists()
    no_seg = make_config(world / "data", world / "runs", senior="")
    with pytest.raises(OdkdError, match="teachers.senior.seg_head must be true"):
        build_cache(no_seg, "train", str(out), scheduler="synchronous", progress=False)
    missing = make_config(world / "data", world / "runs", senior=f'seg_head = true\ncheckpoint = "{tmp_path}/no.pth"')
    with pytest.raises(OdkdError, match="no.pth: teacher checkpoint not found"):
        build_cache(missing, "train", str(out), scheduler="synchronous", progress=False)
    assert not out.exists()

def test_dask_workers_build_the_same_store(world, built):
    """Two LocalCluster worker processes, each loading the teachers once, write what one process writes."""
    from distributed import LocalCluster

    cfg, url = built
    out = str(world / "dask.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        assert build_cache(cfg, "train", out, scheduler=cluster.scheduler_address, progress=False) == out
    a, b = zarr.open_group(url, mode="r"), zarr.open_group(out, mode="r")
    for name in ("pt/heatmaps", "pt/conf", "st/heatmaps", "st/conf", "st/mask", "meta/scale", "meta/ok"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name


def test_mask_gate_keeps_st_responses_inside_the_dilated_mask(world, built):
    cfg, url = built
    gated_cfg = make_config(world / "data", world / "runs", cache="mask_gate = true\nmask_gate_dilation = 1")
    gated = build_cache(gated_cfg, "train", str(world / "gated.zarr"), scheduler="synchronous", progress=False)
    plain, gate = TeacherTargets.open(url).get_maps(np.arange(16)), TeacherTargets.open(gated).get_maps(np.arange(16))
    np.testing.assert_array_equal(gate["pt/heatmaps"], plain["pt/heatmaps"])
    np.testing.assert_array_equal(gate["st/mask"], plain["st/mask"])
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(plain["st/mask"]).float(), 3, 1, 1).numpy() > 0
    np.testing.assert_array_equal(gate["st/heatmaps"], plain["st/heatmaps"] & grown)
    assert gate["st/heatmaps"].sum() < plain["st/heatmaps"].sum()
