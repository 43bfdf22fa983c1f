"""The target forms of odkd.distill.targets on hand-made discs, through the device path the trainer runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odkd.data.keypoints import FLIP_INDEX, NUM_JOINTS
from odkd.distill.targets import (TARGET_FORMS, WarpInputs, blob_centroids, gaussian_target, points_into_crop,
                                  render_gaussians)
from odkd.store.bitpack import bitpack_maps

STORED = (24, 32)  # width, height of the stored maps
CROP = (20, 28)  # the sample's heatmap, another size than the stored one
RADIUS = 2.35  # a unit Gaussian of sigma 2 binarized at 0.5


def disc_maps(centres: np.ndarray, radius: float = RADIUS) -> np.ndarray:
    """(K, h, w) bool discs at `centres` (K, 2); each centre on a pixel or half-pixel, so the disc's pixel
    centroid is exactly its centre."""
    ys, xs = np.mgrid[0:STORED[1], 0:STORED[0]]
    d2 = (xs[None] - centres[:, 0, None, None]) ** 2 + (ys[None] - centres[:, 1, None, None]) ** 2
    return d2 <= radius ** 2


def normalized_to_pixels(size) -> np.ndarray:
    """affine_grid's normalized coordinates (align_corners=True) -> pixels of a map of `size` (w, h)."""
    return np.array([[(size[0] - 1) / 2, 0, (size[0] - 1) / 2], [0, (size[1] - 1) / 2, (size[1] - 1) / 2], [0, 0, 1]])


def theta_of(crop_to_stored: np.ndarray) -> np.ndarray:
    """The 2x3 affine_grid matrix of a pixel affine (3x3) from the sample's crop to the stored maps."""
    return (np.linalg.inv(normalized_to_pixels(STORED)) @ crop_to_stored @ normalized_to_pixels(CROP))[:2]


def pixel_affine(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), shift[0]],
                     [scale * np.sin(a), scale * np.cos(a), shift[1]], [0, 0, 1]])


def centres() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(8, 16, NUM_JOINTS) + 0.5 * rng.integers(0, 2, NUM_JOINTS),
                     rng.integers(8, 24, NUM_JOINTS) + 0.5 * rng.integers(0, 2, NUM_JOINTS)], 1)


def warp_inputs(crop_to_stored: np.ndarray, flip: bool) -> WarpInputs:
    return WarpInputs(theta=torch.tensor(theta_of(crop_to_stored), dtype=torch.float32)[None],
                      zoom=torch.ones(1), flip=torch.tensor([flip]), out_size=CROP, stored_width=STORED[0],
                      blob_radius=RADIUS, keep_blob_size=True, sigma=2.0)


def mirrored_if(crop_to_stored: np.ndarray, flip: bool, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The crop's affine (mirrored, as the loader's frames are, when `flip`) and where it puts each stored
    joint `truth` in the crop, in the sample's channel order (a mirrored sample's channels swapped)."""
    if flip:
        crop_to_stored = crop_to_stored @ np.array([[-1, 0, CROP[0] - 1], [0, 1, 0], [0, 0, 1]])
    stored_to_crop = np.linalg.inv(crop_to_stored)
    expected = (stored_to_crop[:2, :2] @ truth.T).T + stored_to_crop[:2, 2]
    return crop_to_stored, expected[FLIP_INDEX] if flip else expected


def test_blob_centroids_are_exact_and_ignore_a_second_blob():
    truth = centres()
    maps = disc_maps(truth)
    maps[0] |= disc_maps(np.array([[3.0, 3.0]]), radius=1.0)[0]  # a small stray blob far from joint 0's
    found, count = blob_centroids(torch.from_numpy(maps[None]).float(), window=4)
    assert np.abs(found[0].numpy() - truth).max() < 1e-5
    assert (count[0] >= 13).all()
    empty, none = blob_centroids(torch.zeros(1, 2, 8, 8), window=4)
    assert none.tolist() == [[0, 0]]


@pytest.mark.parametrize("flip", [False, True])
def test_gaussian_target_centres_the_teachers_blob_in_the_augmented_crop(flip):
    """Rotated, scaled, shifted and mirrored: each channel's Gaussian peaks within 0.05 px of where the
    crop's affine puts its disc's centre, a mirrored sample's channels swapped."""
    truth = centres()
    crop_to_stored, expected = mirrored_if(pixel_affine(30.0, 1.1, (3.2, -1.7)), flip, truth)
    packed = torch.from_numpy(bitpack_maps(disc_maps(truth)))[None]
    target = gaussian_target(packed, torch.ones(1, NUM_JOINTS), warp_inputs(crop_to_stored, flip))[0]
    assert target.shape == (NUM_JOINTS, CROP[1], CROP[0])
    ys, xs = np.mgrid[0:CROP[1], 0:CROP[0]]
    for k in range(NUM_JOINTS):
        x, y = expected[k]
        want = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8.0)
        # moved by 0.05 px, a unit Gaussian of sigma 2 changes no value by more than 0.05 times its steepest
        # slope, exp(-1/2) / sigma = 0.30 a pixel
        assert np.abs(target[k].numpy() - want).max() < 0.05 * 0.31, k


def test_points_into_crop_inverts_affine_grid_theta():
    crop_to_stored = pixel_affine(-20.0, 0.7, (5.0, 2.0))
    crop_points = np.array([[[4.0, 6.0], [10.25, 3.5]]])
    stored_points = (crop_to_stored[:2, :2] @ crop_points[0].T).T + crop_to_stored[:2, 2]
    moved = points_into_crop(torch.tensor(stored_points[None], dtype=torch.float32),
                             torch.tensor(theta_of(crop_to_stored), dtype=torch.float32)[None], STORED, CROP)
    assert np.abs(moved.numpy() - crop_points).max() < 1e-4


def test_render_gaussians_exact_values_and_absent_points():
    points = torch.tensor([[[3.0, 4.0], [1.5, 2.0]]])
    maps = render_gaussians(points, torch.tensor([[1.0, 0.0]]), (8, 6), sigma=2.0)
    assert maps[0, 0, 4, 3] == 1.0 and maps[0, 0, 4, 5] == pytest.approx(np.exp(-4 / 8))
    assert maps[0, 0, 1, 0] == pytest.approx(np.exp(-(9 + 9) / 8))
    assert maps[0, 1].abs().max() == 0  # absent: no joint here


def test_an_empty_stored_map_teaches_no_joint_in_every_binary_form():
    packed = torch.from_numpy(bitpack_maps(np.zeros((NUM_JOINTS, *STORED[::-1]), bool)))[None]
    warp = warp_inputs(np.eye(3), flip=False)
    for name in ("gaussian", "gaussian_conf", "disc", "disc_conf"):
        assert TARGET_FORMS[name].make(packed, torch.ones(1, NUM_JOINTS), warp).abs().max() == 0, name


def test_disc_and_soft_forms_keep_the_maps_under_an_identity_warp():
    truth = centres()
    maps = disc_maps(truth)
    warp = WarpInputs(theta=torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]), zoom=torch.ones(1), flip=torch.tensor([False]),
                      out_size=STORED, stored_width=STORED[0], blob_radius=RADIUS, keep_blob_size=True, sigma=2.0)
    disc = TARGET_FORMS["disc"].make(torch.from_numpy(bitpack_maps(maps))[None], None, warp)
    assert torch.equal(disc[0].bool(), torch.from_numpy(maps))
    soft = torch.from_numpy(maps.astype(np.float16))[None] * 0.8
    assert torch.allclose(TARGET_FORMS["soft"].make(soft, None, warp), soft.float(), atol=1e-4)
    assert {name: form.array for name, form in TARGET_FORMS.items()} == {
        "disc": "heatmaps", "disc_conf": "heatmaps", "gaussian": "heatmaps", "gaussian_conf": "heatmaps",
        "soft": "soft_heatmaps"}


def test_gaussian_conf_peaks_at_the_teachers_stored_peak_in_the_samples_channel_order():
    truth = np.stack([np.full(NUM_JOINTS, 10.0), np.arange(NUM_JOINTS) + 6.0], 1)  # on pixels: peaks of exactly 1
    packed = torch.from_numpy(bitpack_maps(disc_maps(truth)))[None]
    conf = torch.linspace(0.5, 0.98, NUM_JOINTS)[None]
    warp = WarpInputs(theta=torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]), zoom=torch.ones(1), flip=torch.tensor([False]),
                      out_size=STORED, stored_width=STORED[0], blob_radius=RADIUS, keep_blob_size=True, sigma=2.0)
    peaks = TARGET_FORMS["gaussian_conf"].make(packed, conf, warp).amax((-2, -1))
    assert torch.allclose(peaks, conf, atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_disc_conf_is_the_disc_at_the_teachers_stored_peak_in_the_samples_channel_order(flip):
    """Each channel is a disc where the crop's affine puts its joint's disc, flat at that joint's stored
    peak: a mirrored sample's channel k shows the stored joint FLIP_INDEX[k], with that joint's peak (the
    objective hands the forms conf in the sample's channel order)."""
    truth = centres()
    crop_to_stored, expected = mirrored_if(pixel_affine(15.0, 1.1, (1.0, 1.0)), flip, truth)
    stored_conf = torch.linspace(0.5, 0.98, NUM_JOINTS)[None]
    conf = stored_conf[:, list(FLIP_INDEX)] if flip else stored_conf
    packed = torch.from_numpy(bitpack_maps(disc_maps(truth)))[None]
    target = TARGET_FORMS["disc_conf"].make(packed, conf, warp_inputs(crop_to_stored, flip))[0]
    ys, xs = np.mgrid[0:CROP[1], 0:CROP[0]]
    whole = [k for k in range(NUM_JOINTS) if RADIUS + 1 <= expected[k, 0] <= CROP[0] - 2 - RADIUS
             and RADIUS + 1 <= expected[k, 1] <= CROP[1] - 2 - RADIUS]  # discs the crop does not cut
    assert len(whole) >= 14
    for k in whole:
        inside = target[k].numpy() > 0
        assert inside.sum() >= 9, k
        # warped bits, binarized again: the disc's centre moves by a fraction of a pixel, not to a neighbour's
        assert np.hypot(xs[inside].mean() - expected[k, 0], ys[inside].mean() - expected[k, 1]) < 0.5, k
        assert np.allclose(target[k].numpy()[inside], conf[0, k].item()), k
