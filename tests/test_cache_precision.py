"""Teacher precision in the cache: the default tf32 is fp32 bit for bit on a CPU, bf16 stays within the
tolerance of `cache verify`, and the precision is a store setting that resume and verify honour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from odkd.config import parse_config
from odkd.data.image import read_image
from odkd.data.instances import load_instances
from odkd.data.targets import gaussian_heatmaps, mask_target
from odkd.data.transforms import CropFrame, affine_transform, crop_image, normalize_image
from odkd.errors import OdkdError
from odkd.models import build_model, save_checkpoint
from odkd.store import TeacherTargets, cache_info
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache, verify_cache
from odkd.teachers.producer import set_precision_layout, teacher_forward
from odkd.teachers.verify import BIT_TOLERANCE, REPLAYED_MAPS, differing_bits
from conftest import TINY_TEACHERS_TOML

INPUT, HEATMAP = (96, 128), (24, 32)
TRAIN_STEPS, TRAIN_BATCH = 60, 8
# keypoints whose argmax may move by more than one heatmap pixel between fp32 and bf16: where two
# far-apart, near-equal maxima of a flat map swap (measured here: 2-3%, on a briefly trained teacher)
ARGMAX_TOLERANCE = 0.05


def make_config(root, runs, precision="fp32"):
    # relative threshold: every map keeps a region even where a briefly trained teacher is unsure,
    # which is where low precision flips the most bits
    return parse_config(f"""
runs = "{runs}"
[data]
root = "{root}"
input_size = {list(INPUT)}
heatmap_size = {list(HEATMAP)}
{TINY_TEACHERS_TOML}
[cache]
threshold_mode = "relative"
mask_threshold = 0.3  # a mask head trained for a few steps stays below 0.5
chunk_instances = 8
shard_instances = 16
batch_size = 8
precision = "{precision}"
""")


def canonical_crops(cfg):
    """Every train instance's crop, Gaussian targets, joint weights and mask."""
    instances = load_instances(cfg.data, "train")
    crops, heatmaps, weights, masks = [], [], [], []
    for inst in instances.instances:
        frame = CropFrame(center=tuple(map(float, inst.center)), scale=tuple(map(float, inst.scale)))
        crops.append(normalize_image(crop_image(read_image(instances.image_path(inst)), frame, INPUT)))
        xy = affine_transform(inst.joints[:, :2], frame.matrix(INPUT))
        h, w = gaussian_heatmaps(xy, inst.joints[:, 2] > 0, INPUT, HEATMAP, 2.0)
        heatmaps.append(h)
        weights.append(w)
        masks.append(mask_target(instances.mask(inst), frame, HEATMAP))
    return [torch.from_numpy(np.stack(a)) for a in (crops, heatmaps, weights, masks)]


def train_teacher(crops, heatmaps, weights, masks, seg_head: bool, seed: int):
    """A tiny HRNet fitted to these crops for a few steps, so that its maps peak near the joints."""
    torch.manual_seed(seed)
    net = build_model("hrnet_tiny", seg_head=seg_head, width=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for step in range(TRAIN_STEPS):
        batch = torch.arange(step * TRAIN_BATCH, (step + 1) * TRAIN_BATCH) % len(crops)
        out = net(crops[batch])
        loss = ((out.heatmaps - heatmaps[batch]) ** 2 * weights[batch, ..., None]).mean()
        if seg_head:
            loss = loss + 0.1 * F.binary_cross_entropy_with_logits(out.mask_logits, masks[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic dataset and two teachers trained on its train split, at runs/teacher_*/best.pth."""
    base = tmp_path_factory.mktemp("cache_precision")
    make_synthetic_dataset(base / "data", train_images=12, val_images=1, seed=1)
    cfg = make_config(base / "data", base / "runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # other processes share the cores
    try:
        data = canonical_crops(cfg)
        nets = {role: train_teacher(*data, seg_head=role == "senior", seed=seed)
                for seed, role in enumerate(("primary", "senior"))}
    finally:
        torch.set_num_threads(before)
    for role, net in nets.items():
        save_checkpoint(base / "runs" / f"teacher_{role}" / "best.pth", net, model_name="hrnet_tiny",
                        model_args={"width": 8}, seg_head=role == "senior")
    return base, nets, data[0]


@pytest.fixture(scope="module")
def stores(world):
    base, _, _ = world
    return {precision: build_cache(make_config(base / "data", base / "runs", precision), "train",
                                   str(base / f"{precision}.zarr"), scheduler="synchronous", progress=False,
                                   torch_threads=1)
            for precision in ("fp32", "bf16", "tf32")}


def test_bf16_agrees_with_fp32_within_the_verify_tolerance(world, stores):
    """The measurement behind the bf16 option: the bits a bf16 store flips against fp32 stay within what
    `cache verify` accepts, and few keypoints change their argmax."""
    _, nets, crops = world
    fp32, bf16 = (TeacherTargets.open(stores[p]).get_batch(np.arange(len(crops))) for p in ("fp32", "bf16"))
    for name in REPLAYED_MAPS:
        assert 0.02 < np.unpackbits(fp32[name]).mean() < 0.9, name  # maps with real regions in them
        assert differing_bits(fp32[name], bf16[name]) <= BIT_TOLERANCE * fp32[name].size * 8, name
    moved = []
    for net in nets.values():
        peaks = {}
        for precision in ("fp32", "bf16"):
            set_precision_layout(net, precision)
            heatmaps, _ = teacher_forward(net, crops, precision, flip_test=True, shift_heatmap=True)
            peaks[precision] = heatmaps.flatten(2).argmax(-1)
        w, a, b = HEATMAP[0], peaks["fp32"], peaks["bf16"]
        step = torch.maximum((a % w - b % w).abs(), (a // w - b // w).abs())
        moved.append((step > 1).float().mean().item())
    assert max(moved) <= ARGMAX_TOLERANCE, moved


def test_tf32_is_fp32_on_a_cpu_even_after_a_bf16_build(stores):
    """The default precision is the fp32 store itself on a CPU, even with the teachers still loaded in this
    process from a bf16 build (its channels-last layout is undone)."""
    fp32, tf32 = zarr.open_group(stores["fp32"], mode="r"), zarr.open_group(stores["tf32"], mode="r")
    for name in TeacherTargets.open(stores["fp32"]).layout.arrays():
        assert fp32[name][:].tobytes() == tf32[name][:].tobytes(), name


def test_precision_is_a_store_setting(world, stores):
    base, _, _ = world
    assert TeacherTargets.open(stores["bf16"]).attrs["settings"]["precision"] == "bf16"
    with pytest.raises(OdkdError, match="settings.precision 'fp32' != 'bf16'.*--overwrite"):
        build_cache(make_config(base / "data", base / "runs", "bf16"), "train", stores["fp32"],
                    scheduler="synchronous", progress=False)


def test_verify_reruns_at_the_stores_precision(world, stores):
    """With an fp32 pipeline config, a bf16 store is re-run in bf16: exactly its bits and peaks again."""
    base, _, crops = world
    rows = np.arange(len(crops))
    fp32_conf, bf16_conf = (TeacherTargets.open(stores[p]).get_batch(rows, ["st/conf"])["st/conf"]
                            for p in ("fp32", "bf16"))
    assert (fp32_conf != bf16_conf).any()  # so a re-run in fp32 could not match exactly
    report = verify_cache(stores["bf16"], make_config(base / "data", base / "runs", "fp32"), sample=12)
    assert report.ok, str(report)
    assert any(line.startswith("ok    st/heatmaps: 0 of") and line.endswith("re-run at bf16") for line in report.lines)
    assert "ok    st/conf: re-run differs by at most 0.0000" in report.lines


def test_the_precision_that_ran_is_recorded_and_verified_against(world, stores):
    """tf32 asked for on a CPU runs fp32: every shard records so, `cache info` says so, and verify re-runs at
    fp32 without claiming tf32; bf16 runs as asked."""
    base, _, _ = world
    shards = TeacherTargets.open(stores["tf32"]).layout.num_shards
    assert f"precision    tf32 requested; ran fp32 on cpu ({shards} shards)" in cache_info(stores["tf32"]).splitlines()
    assert f"precision    bf16 requested; ran bf16 on cpu ({shards} shards)" in cache_info(stores["bf16"]).splitlines()
    report = verify_cache(stores["tf32"], make_config(base / "data", base / "runs", "tf32"), sample=12)
    assert report.ok, str(report)
    replayed = [line for line in report.lines if "bits differ" in line]
    assert len(replayed) == len(REPLAYED_MAPS) and all(line.endswith("re-run at fp32") for line in replayed), replayed
