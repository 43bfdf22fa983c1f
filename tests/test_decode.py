"""Heatmap decoders on maps with a known sub-pixel keypoint: argmax, plateau centroid, DARK."""

import numpy as np
import pytest

from odkd.config import parse_config
from odkd.data.decode import DECODERS, decode_heatmaps, heatmap_coords
from odkd.data.transforms import CropFrame
from odkd.errors import OdkdError

H, W = 64, 48
SIGMA = 2.0
YY, XX = np.mgrid[0:H, 0:W]


def gaussian(center, peak=1.0):
    return (peak * np.exp(-((XX - center[0]) ** 2 + (YY - center[1]) ** 2) / (2 * SIGMA ** 2))).astype(np.float32)


def plateau(center, peak=1.0):
    """What a student trained on binarized targets learns: the target Gaussian thresholded at 0.5."""
    return (gaussian(center) >= 0.5).astype(np.float32) * peak


def errors(maps, centers, method):
    coords, _ = heatmap_coords(maps, method, SIGMA)
    return np.linalg.norm(coords - centers, axis=-1)


CENTERS = np.array([[[20.3, 30.7], [11.6, 17.2], [33.4, 45.9]],
                    [[24.8, 9.35], [7.7, 52.1], [38.2, 22.6]]])


def test_dark_finds_a_subpixel_gaussian_peak_better_than_argmax():
    maps = np.stack([[gaussian(c) for c in person] for person in CENTERS])
    dark, argmax = errors(maps, CENTERS, "dark"), errors(maps, CENTERS, "argmax")
    assert dark.max() < 0.1
    assert (dark < argmax).all()
    assert dark.mean() < argmax.mean() / 10


def test_centroid_finds_the_center_of_a_binary_plateau():
    maps = np.stack([[plateau(c) for c in person] for person in CENTERS])
    centroid, argmax = errors(maps, CENTERS, "centroid"), errors(maps, CENTERS, "argmax")
    # on a flat top argmax sits on the rim, about the disc's radius (1.18 sigma) from the center
    assert argmax.min() > 1.0
    assert centroid.max() < 0.3


def test_a_distant_second_blob_does_not_move_the_centroid():
    center = np.array([20.3, 30.7])
    alone = plateau(center)
    # another person's same joint, further down so that argmax still picks the first blob
    crowded = alone + plateau(center + [3.0, 14.0])
    coords, _ = heatmap_coords(np.stack([alone, crowded])[:, None], "centroid", SIGMA)
    np.testing.assert_array_equal(coords[0], coords[1])
    assert np.linalg.norm(coords[1, 0] - center) < 0.3


def test_all_decoders_agree_on_an_integer_centered_gaussian():
    center = np.array([[[21.0, 33.0]]])
    maps = gaussian(center[0, 0], peak=0.7)[None, None]
    coords = np.stack([heatmap_coords(maps, m, SIGMA)[0][0, 0] for m in DECODERS])
    assert np.abs(coords[:, None] - coords[None]).max() <= 0.5
    np.testing.assert_allclose(coords[2], center[0, 0], atol=1e-3)


def test_decoders_keep_empty_maps_at_the_origin_and_border_peaks_finite():
    maps = np.stack([np.zeros((H, W), np.float32) - 0.1, gaussian((0.4, 1.2))])[None]
    for method in DECODERS:
        coords, maxvals = heatmap_coords(maps, method, SIGMA)
        assert np.isfinite(coords).all()
        np.testing.assert_array_equal(coords[0, 0], [0.0, 0.0])
        assert maxvals[0, 0, 0] == pytest.approx(-0.1)
    # too close to the border for DARK's derivatives: the argmax stays
    np.testing.assert_array_equal(heatmap_coords(maps, "dark", SIGMA)[0][0, 1], [0.0, 1.0])


def test_decode_heatmaps_applies_the_method_before_the_inverse_affine():
    # crop center (W/2, H/2) heatmap px lands on image (0, 0); 1 heatmap px = 4 image px
    frame = CropFrame(center=(0.0, 0.0), scale=(W * 4 / 200, H * 4 / 200))
    center = np.array([20.3, 30.7])
    preds, maxvals = decode_heatmaps(gaussian(center)[None, None], [frame], method="dark", sigma=SIGMA)
    np.testing.assert_allclose(preds[0, 0], (center - [W / 2, H / 2]) * 4, atol=0.4)
    assert maxvals[0, 0, 0] == pytest.approx(gaussian(center).max())


def test_eval_decode_key_takes_a_decoder_and_rejects_anything_else():
    assert parse_config('[eval]\ndecode = "dark"\n').eval.decode == "dark"
    with pytest.raises(OdkdError) as err:
        parse_config('[eval]\ndecode = "soft-argmax"\n', "p.toml")
    assert str(err.value) == "p.toml: eval.decode: 'soft-argmax' is not one of argmax, centroid, dark"
