"""[data] joint_weights: each point's GT target weight, the weight JointsMSE gives it for teachers and students,
times the set's joint_weights (mmpose's use_dataset_keypoint_weights); off by default, where the weights stay
the 0/1 they always were."""

import json
import re

import numpy as np
import pytest
import torch

from odkd.config import AugmentConfig, DataConfig, parse_config
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import PersonInstances
from odkd.data.keypoints import PRESETS_DIR, keypoint_set
from odkd.errors import OdkdError

# no two alike and left unlike right, so a weight on the wrong channel, or one that follows a flip, shows
WEIGHTS = [round(1.0 + k / 10, 1) for k in range(17)]
LEFT_WRIST, RIGHT_WRIST = 9, 10
# the crop as it is, mirrored for a train sample
MIRROR_ONLY = AugmentConfig(scale_factor=0.0, rotation_prob=0.0, flip_prob=1.0, half_body_prob=0.0)


@pytest.fixture
def unlabelled_left_wrist(tiny_coco, tmp_path):
    """The tiny set's instances under COCO's points with WEIGHTS as joint weights, the first person's left
    wrist unlabelled; and the set file's path."""
    ann_file, image_dir = tiny_coco
    dataset = json.loads(ann_file.read_text())
    first = min((a for a in dataset["annotations"] if not a["iscrowd"]), key=lambda a: (a["image_id"], a["id"]))
    first["keypoints"][3 * LEFT_WRIST:3 * LEFT_WRIST + 3] = [0, 0, 0]
    first["num_keypoints"] -= 1
    ann_file.write_text(json.dumps(dataset))
    set_file = tmp_path / "ramp.toml"
    set_file.write_text(re.sub(r"^joint_weights = \[.*\]$", f"joint_weights = {WEIGHTS}",
                               (PRESETS_DIR / "coco.toml").read_text(), flags=re.MULTILINE))
    return PersonInstances(ann_file, image_dir, keypoints=keypoint_set(str(set_file))), str(set_file)


def target_weights(instances, keypoints: str, joint_weights: bool, train: bool) -> torch.Tensor:
    cfg = DataConfig(keypoints=keypoints, joint_weights=joint_weights, augment=MIRROR_ONLY)
    return TopDownDataset(instances, cfg, train=train)[0]["target_weight"]


def labelled_but(channel: int) -> np.ndarray:
    """(17, 1) of 1, 0 at `channel`."""
    out = np.ones((17, 1), np.float32)
    out[channel] = 0.0
    return out


def test_joint_weights_scale_each_labelled_channel_by_its_point_weight(unlabelled_left_wrist):
    instances, set_file = unlabelled_left_wrist
    assert keypoint_set(set_file).joint_weights == tuple(WEIGHTS)
    want = np.float32(WEIGHTS).reshape(17, 1) * labelled_but(LEFT_WRIST)
    assert torch.equal(target_weights(instances, set_file, True, train=False), torch.from_numpy(want))
    # mirrored, channel 9 holds the right wrist (labelled) and 10 the left one: each channel keeps its weight
    mirrored = np.float32(WEIGHTS).reshape(17, 1) * labelled_but(RIGHT_WRIST)
    assert torch.equal(target_weights(instances, set_file, True, train=True), torch.from_numpy(mirrored))


def test_without_the_option_the_weights_are_the_0_1_they_were(unlabelled_left_wrist):
    instances, set_file = unlabelled_left_wrist
    for keypoints in (set_file, "coco"):
        assert torch.equal(target_weights(instances, keypoints, False, train=False),
                           torch.from_numpy(labelled_but(LEFT_WRIST)))
        assert torch.equal(target_weights(instances, keypoints, False, train=True),
                           torch.from_numpy(labelled_but(RIGHT_WRIST)))


def test_the_key_is_off_by_default_and_a_boolean():
    assert parse_config("").data.joint_weights is False
    assert parse_config("[data]\njoint_weights = true").data.joint_weights is True
    with pytest.raises(OdkdError, match=r"^<string>: data.joint_weights: expected true or false, got 1$"):
        parse_config("[data]\njoint_weights = 1")
