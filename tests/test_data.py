"""The top-down data path: instances, crops, augmentation frames, targets, decoding, map warping."""

import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from odkd.config import DataConfig
from odkd.data.dataset import TopDownDataset, frame_from_batch
from odkd.data.decode import decode_heatmaps
from odkd.models.inference import flip_back
from odkd.data.image import read_image
from odkd.data.instances import PersonInstances
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.targets import gaussian_heatmaps
from odkd.data.transforms import (
    CropFrame, affine_transform, box_to_center_scale, crop_image, get_affine_transform, invert_affine, warp_maps,
)
from odkd.errors import OdkdError

INPUT = (192, 256)
HEATMAP = (48, 64)


def test_box_to_center_scale_matches_official_rule():
    center, scale = box_to_center_scale((10, 20, 30, 100), aspect_ratio=0.75)
    np.testing.assert_allclose(center, [25, 70])
    # w < 0.75 h, so w grows to 75; both divided by pixel_std 200 and padded by 1.25
    np.testing.assert_allclose(scale, [75 / 200 * 1.25, 100 / 200 * 1.25], rtol=1e-6)


def test_affine_maps_box_center_to_crop_center_and_inverts():
    center, scale = np.array([100.0, 80.0]), np.array([1.0, 4 / 3])
    t = get_affine_transform(center, scale, 30.0, INPUT)
    np.testing.assert_allclose(affine_transform(center, t), [96, 128], atol=1e-4)
    t_inv = get_affine_transform(center, scale, 30.0, INPUT, inv=True)
    np.testing.assert_allclose(t_inv, invert_affine(t), atol=1e-4)
    # 200 px of box width span the whole 192 px crop
    a = affine_transform(np.array([0.0, 0.0]), t)
    b = affine_transform(np.array([200.0, 0.0]), t)
    assert np.linalg.norm(a - b) == pytest.approx(192.0, rel=1e-5)


def test_flipped_frame_equals_flipping_the_image_first():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    frame = CropFrame(center=(70.0, 60.0), scale=(0.5, 2 / 3), rotation=20.0, flip=True, image_width=160)
    official = cv2.warpAffine(image[:, ::-1].copy(), get_affine_transform((160 - 1 - 70.0, 60.0), frame.scale, 20.0, INPUT),
                              INPUT, flags=cv2.INTER_LINEAR)
    ours = crop_image(image, frame, INPUT)
    assert np.abs(ours.astype(int) - official.astype(int)).max() <= 1


@pytest.mark.parametrize("rotation,flip", [(0.0, False), (35.0, False), (0.0, True), (-60.0, True)])
def test_encode_then_decode_round_trip(rotation, flip):
    """Keypoints on the heatmap grid come back within 0.5 input pixels; any keypoint within half a heatmap cell."""
    rng = np.random.default_rng(1)
    frame = CropFrame(center=(300.0, 200.0), scale=(1.2, 1.6), rotation=rotation, flip=flip, image_width=640)
    stride = INPUT[0] / HEATMAP[0]
    for on_grid in (True, False):
        grid = rng.integers(4, [HEATMAP[0] - 4, HEATMAP[1] - 4], size=(17, 2)).astype(np.float64)
        crop_xy = grid * stride if on_grid else grid * stride + rng.uniform(-1.9, 1.9, size=(17, 2))
        # the keypoints in the image, as labelled (channel k = keypoint k of the person)
        image_xy = affine_transform(crop_xy, invert_affine(frame.matrix(INPUT)))
        if flip:
            image_xy = image_xy[FLIP_INDEX]
        enc = affine_transform(image_xy, frame.matrix(INPUT))
        vis = np.ones(17)
        if flip:
            enc = enc[FLIP_INDEX]
        heatmaps, weight = gaussian_heatmaps(enc, vis, INPUT, HEATMAP, sigma=2.0)
        assert weight.min() == 1 and heatmaps.max() == pytest.approx(1.0)
        preds, maxvals = decode_heatmaps(heatmaps[None], [frame])
        err = affine_transform(preds[0], frame.matrix(INPUT)) - affine_transform(image_xy, frame.matrix(INPUT))
        if on_grid:
            assert np.linalg.norm(err, axis=1).max() <= 0.5
        else:  # argmax quantization: at most half a heatmap cell per axis
            assert np.abs(err).max() <= 0.5 * stride + 1e-6
        assert maxvals.min() > 0.5


def test_decode_quarter_pixel_shift_towards_higher_neighbour():
    hm = np.zeros((1, 1, 10, 10), np.float32)
    hm[0, 0, 5, 5] = 1.0
    hm[0, 0, 5, 6] = 0.6
    hm[0, 0, 5, 4] = 0.2
    frame = CropFrame(center=(0.0, 0.0), scale=(10 * 4 / 200, 10 * 4 / 200))
    preds, _ = decode_heatmaps(hm, [frame])
    # heatmap (5.25, 5) -> input px *4 -> image: crop center (5,5) maps to (0,0), 1 hm px = 4 image px
    np.testing.assert_allclose(preds[0, 0], [1.0, 0.0], atol=1e-4)


def test_flip_back_restores_channels_and_shifts_one_pixel():
    x = torch.rand(2, 17, 8, 6)
    mirrored = x.flip(3)[:, torch.tensor(FLIP_INDEX.tolist())]
    back = flip_back(mirrored, shift=False)
    assert torch.equal(back, x)
    shifted = flip_back(mirrored, shift=True)
    assert torch.equal(shifted[..., 1:], x[..., :-1]) and torch.equal(shifted[..., 0], x[..., 0])


def test_warp_maps_agrees_with_recropping():
    """Maps cropped in one frame, warped into another, equal the maps cropped directly in the other frame."""
    h, w = 300, 400
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # smooth per-channel fields whose channel identity matters (for the flip swap)
    fields = np.stack([np.sin(xx / (20 + 3 * k)) * np.cos(yy / (25 + k)) + k / 17 for k in range(17)])
    src = CropFrame(center=(200.0, 150.0), scale=(2.4, 2.4 / 0.75), image_width=w)
    dst = CropFrame(center=(190.0, 160.0), scale=(1.1, 1.1 / 0.75), rotation=25.0, flip=True, image_width=w)
    hm_src, hm_dst = (96, 128), HEATMAP

    def crop_maps(frame, size):
        out = np.stack([cv2.warpAffine(f, frame.matrix(size), size, flags=cv2.INTER_LINEAR) for f in fields])
        return out[FLIP_INDEX] if frame.flip else out

    warped = warp_maps(crop_maps(src, hm_src), src, hm_src, dst, hm_dst)
    direct = crop_maps(dst, hm_dst)
    # compare away from the image border, where the fields jump to the zero padding
    inside = np.zeros((h, w), np.float32)
    inside[12:-12, 12:-12] = 1
    valid = cv2.warpAffine(inside, dst.matrix(hm_dst), hm_dst, flags=cv2.INTER_NEAREST) > 0
    assert warped.shape == (17, HEATMAP[1], HEATMAP[0]) and valid.mean() > 0.5
    diff = np.abs(warped - direct)[:, valid]
    assert diff.mean() < 0.01 and diff.max() < 0.1
    # without the channel swap the flipped result would be wrong
    assert np.abs(warped[FLIP_INDEX] - direct)[:, valid].mean() > 0.05


def test_instances_follow_official_rules(tiny_coco):
    ann_file, image_dir = tiny_coco
    inst = PersonInstances(ann_file, image_dir)
    data = json.loads(ann_file.read_text())
    persons = [a for a in data["annotations"] if not a["iscrowd"]]
    assert len(inst) == len(persons)  # crowd regions skipped
    assert [i.index for i in inst.instances] == list(range(len(inst)))
    keys = [(i.image_id, i.ann_id) for i in inst.instances]
    assert keys == sorted(keys)
    assert PersonInstances(ann_file, image_dir).fingerprint == inst.fingerprint
    data["annotations"][0]["keypoints"][0] += 1
    ann_file.write_text(json.dumps(data))
    assert PersonInstances(ann_file, image_dir).fingerprint != inst.fingerprint


def test_polygon_and_rle_masks_match_pycocotools(tiny_coco):
    ann_file, image_dir = tiny_coco
    inst = PersonInstances(ann_file, image_dir)
    kinds = set()
    for i in inst.instances:
        ann = inst.coco.anns[i.ann_id]
        seg = ann["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, i.image_height, i.image_width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, i.image_height, i.image_width)
        else:
            rle = seg
        expected = mask_utils.decode(rle)
        got = inst.mask(i)
        assert got.shape == (i.image_height, i.image_width)
        np.testing.assert_array_equal(got, expected)
        assert got.sum() > 0.8 * ann["area"]
    assert kinds == {"polygon", "str", "list"}


def test_dataset_sample_shapes_and_determinism(tiny_coco):
    ann_file, image_dir = tiny_coco
    cfg = DataConfig(input_size=(96, 128), heatmap_size=(24, 32), sigma=1.0)
    inst = PersonInstances(ann_file, image_dir)
    ds = TopDownDataset(inst, cfg, train=True, with_mask=True, seed=3)
    a, b = ds[0], ds[0]
    assert a["image"].shape == (3, 128, 96) and a["heatmaps"].shape == (17, 32, 24)
    assert a["mask"].shape == (1, 32, 24) and 0 <= a["mask"].min() and a["mask"].max() <= 1
    assert torch.equal(a["image"], b["image"])
    # the collated sample rebuilds its exact frame; another epoch draws other frames
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    epoch0 = [ds.frame(i) for i in range(len(ds))]
    assert [frame_from_batch(batch, i) for i in range(len(ds))] == epoch0
    assert [ds.frame(i, epoch=1) for i in range(len(ds))] != epoch0
    assert torch.equal(ds[(1, 0)]["image"], ds[(1, 0)]["image"]) and not torch.equal(ds[(1, 0)]["image"], a["image"])
    # the mask target lies under the person: the canonical crop's mask covers its center
    val = TopDownDataset(inst, cfg, train=False, with_mask=True)
    s = val[0]
    assert s["mask"][0, 16, 12] > 0.9 and s["mask"].mean() < 0.9


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(OdkdError, match="missing.jpg: image not found"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(OdkdError, match="bad.jpg: cannot decode image"):
        read_image(bad)


def test_broken_annotation_file_is_one_line_error(tiny_coco):
    ann_file, image_dir = tiny_coco
    ann_file.write_text('{"images": [')
    with pytest.raises(OdkdError) as exc:
        PersonInstances(ann_file, image_dir)
    assert "person_keypoints_val.json: not valid JSON" in str(exc.value) and "\n" not in str(exc.value)


def test_zero_area_box_names_the_annotation_when_strict(tiny_coco):
    ann_file, image_dir = tiny_coco
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["bbox"][2] = 0
    ann_file.write_text(json.dumps(data))
    with pytest.raises(OdkdError, match=r"annotation 100: 'bbox' .* zero area"):
        PersonInstances(ann_file, image_dir, strict=True)


def test_missing_image_folder_is_one_line_error(tiny_coco, tmp_path):
    ann_file, _ = tiny_coco
    with pytest.raises(OdkdError, match="nowhere: image folder not found"):
        PersonInstances(ann_file, tmp_path / "nowhere")
