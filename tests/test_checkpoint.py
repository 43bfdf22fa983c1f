"""Checkpoints: the official HRNet layout, mmpose names, odkd round trips, and clear errors."""

import numpy as np
import pytest
import torch

from odkd.errors import OdkdError
from odkd.models import build_from_checkpoint, build_model, load_checkpoint, model_fingerprint, save_checkpoint


def _conv(keys: dict, name: str, out_c: int, in_c: int, k: int) -> None:
    keys[f"{name}.weight"] = (out_c, in_c, k, k)


def _bn(keys: dict, name: str, c: int) -> None:
    for stat in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{stat}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def official_pose_hrnet_keys(c: int, num_joints: int = 17) -> dict[str, tuple]:
    """Key -> shape of the official PoseHighResolutionNet (leoxiaobin/deep-high-resolution-net.pytorch,
    lib/models/pose_hrnet.py) for experiments/coco/hrnet/w{c}_256x192_adam_lr1e-3.yaml.

    Written out from the official construction rules, independently of odkd's model classes, so
    comparing the two is not circular.
    """
    keys: dict[str, tuple] = {}
    _conv(keys, "conv1", 64, 3, 3)
    _bn(keys, "bn1", 64)
    _conv(keys, "conv2", 64, 64, 3)
    _bn(keys, "bn2", 64)
    for b in range(4):  # layer1: 4 Bottlenecks, 64 planes, expansion 4
        p = f"layer1.{b}"
        _conv(keys, f"{p}.conv1", 64, 64 if b == 0 else 256, 1)
        _bn(keys, f"{p}.bn1", 64)
        _conv(keys, f"{p}.conv2", 64, 64, 3)
        _bn(keys, f"{p}.bn2", 64)
        _conv(keys, f"{p}.conv3", 256, 64, 1)
        _bn(keys, f"{p}.bn3", 256)
    _conv(keys, "layer1.0.downsample.0", 256, 64, 1)
    _bn(keys, "layer1.0.downsample.1", 256)
    w = [c, 2 * c, 4 * c, 8 * c]
    # transitions: branch 0 of stage2 adapts 256 -> c; every new branch is one stride-2 conv from the last
    _conv(keys, "transition1.0.0", w[0], 256, 3)
    _bn(keys, "transition1.0.1", w[0])
    for t, (src, dst) in enumerate([(256, w[1]), (w[1], w[2]), (w[2], w[3])], start=1):
        _conv(keys, f"transition{t}.{t}.0.0", dst, src, 3)
        _bn(keys, f"transition{t}.{t}.0.1", dst)
    for stage, branches, modules in (("stage2", 2, 1), ("stage3", 3, 4), ("stage4", 4, 3)):
        for m in range(modules):
            p = f"{stage}.{m}"
            for br in range(branches):
                for blk in range(4):
                    q = f"{p}.branches.{br}.{blk}"
                    _conv(keys, f"{q}.conv1", w[br], w[br], 3)
                    _bn(keys, f"{q}.bn1", w[br])
                    _conv(keys, f"{q}.conv2", w[br], w[br], 3)
                    _bn(keys, f"{q}.bn2", w[br])
            outputs = 1 if (stage == "stage4" and m == modules - 1) else branches
            for i in range(outputs):
                for j in range(branches):
                    q = f"{p}.fuse_layers.{i}.{j}"
                    if j > i:  # 1x1 conv + BN, then nearest upsampling
                        _conv(keys, f"{q}.0", w[i], w[j], 1)
                        _bn(keys, f"{q}.1", w[i])
                    for s in range(i - j):  # stride-2 3x3 convs; only the last changes width
                        out_c = w[i] if s == i - j - 1 else w[j]
                        _conv(keys, f"{q}.{s}.0", out_c, w[j], 3)
                        _bn(keys, f"{q}.{s}.1", out_c)
    _conv(keys, "final_layer", num_joints, c, 1)
    keys["final_layer.bias"] = (num_joints,)
    return keys


def constant_state_dict(layout: dict[str, tuple], offset: int = 0) -> dict[str, torch.Tensor]:
    """Tensor i holds i + offset everywhere; each is a stride-0 view of one number, so files stay tiny."""
    state = {}
    for i, (key, shape) in enumerate(layout.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(i + offset)
        else:
            state[key] = torch.full((1,) * len(shape), float(i + offset)).expand(shape)
    return state


def assert_holds_constants(model, layout: dict[str, tuple], offset: int = 0) -> None:
    # every tensor was one constant, so a wrongly mapped key shows at both ends of the tensor
    state = model.state_dict()
    for i, key in enumerate(layout):
        ends = state[key].reshape(-1)[[0, -1]]
        assert torch.all(ends == i + offset), key


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def w32_layout():
    return official_pose_hrnet_keys(32)


@pytest.mark.parametrize("width, params_m", [(32, 28.5), (48, 63.6)])
def test_official_layout_is_ours_key_for_key(width, params_m):
    official = official_pose_hrnet_keys(width)
    with torch.device("meta"):
        model = build_model(f"hrnet_w{width}")
    assert shapes(model) == official
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    total = sum(int(np.prod(s)) for k, s in official.items() if not k.endswith(buffers))
    assert round(total / 1e6, 1) == params_m  # the published parameter count


def test_official_key_spot_checks(w32_layout):
    assert w32_layout["final_layer.weight"] == (17, 32, 1, 1)
    assert w32_layout["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert w32_layout["transition3.3.0.0.weight"] == (256, 128, 3, 3)
    assert w32_layout["stage4.2.fuse_layers.0.3.0.weight"] == (32, 256, 1, 1)
    assert w32_layout["stage4.1.fuse_layers.3.0.2.0.weight"] == (256, 32, 3, 3)
    assert w32_layout["stage4.1.fuse_layers.3.0.0.0.weight"] == (32, 32, 3, 3)
    assert "stage4.2.fuse_layers.1.0.0.0.weight" not in w32_layout  # the last module fuses one output


def test_official_w32_file_loads_strictly(tmp_path, w32_layout):
    path = tmp_path / "pose_hrnet_w32_256x192.pth"
    torch.save(constant_state_dict(w32_layout), path)
    model = build_model("hrnet_w32")
    report = load_checkpoint(model, path)
    assert report.format == "official" and report.new_keys == []
    assert_holds_constants(model, w32_layout)
    # DataParallel's prefix inside the official training checkpoint's {"state_dict": ...}
    wrapped = tmp_path / "checkpoint.pth"
    parallel = {f"module.{k}": v for k, v in constant_state_dict(w32_layout, offset=1).items()}
    torch.save({"epoch": 3, "state_dict": parallel}, wrapped)
    assert load_checkpoint(model, wrapped).format == "official"
    assert_holds_constants(model, w32_layout, offset=1)


def test_mmpose_w32_file_loads(tmp_path, w32_layout):
    # mmpose 1.x td-hm_hrnet-w32: backbone keys as official under "backbone.", HeatmapHead's 1x1 conv
    # as "head.final_layer"; mmengine's meta holds numpy arrays from the dataset metainfo
    state = {("head." if k.startswith("final_layer") else "backbone.") + k: v
             for k, v in constant_state_dict(w32_layout).items()}
    meta = {"dataset_meta": {"dataset_name": "coco", "sigmas": np.full(17, 0.05, np.float32),
                             "flip_indices": [0, 2, 1]}, "epoch": np.int64(210)}
    path = tmp_path / "td-hm_hrnet-w32_8xb64-210e_coco-256x192.pth"
    torch.save({"meta": meta, "state_dict": state}, path)
    model = build_model("hrnet_w32")
    report = load_checkpoint(model, path)
    assert report.format == "mmpose"
    assert_holds_constants(model, w32_layout)


def test_seg_head_model_reports_its_new_keys(tmp_path, w32_layout):
    path = tmp_path / "w32.pth"
    torch.save(constant_state_dict(w32_layout), path)
    model = build_model("hrnet_w32", seg_head=True)
    report = load_checkpoint(model, path)
    seg_keys = [k for k in model.state_dict() if k.startswith("seg_head.")]
    assert report.new_keys == seg_keys and len(seg_keys) == 8
    assert_holds_constants(model, w32_layout)
    with pytest.raises(OdkdError, match="missing keys: seg_head.0.weight"):
        load_checkpoint(model, path, allow_new_seg_head=False)


def test_w32_file_into_w48_names_key_and_shapes(tmp_path, w32_layout):
    path = tmp_path / "w32.pth"
    torch.save(constant_state_dict(w32_layout), path)
    with torch.device("meta"):
        model = build_model("hrnet_w48")
    with pytest.raises(OdkdError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg and "'conv1.weight'" not in msg
    assert "'transition1.0.0.weight' has shape (32, 256, 3, 3)" in msg and "(48, 256, 3, 3)" in msg
    assert "\n" not in msg


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "student.pth"
    student = build_model("mobilenetv2_tiny")
    torch.save(student.state_dict(), path)
    with pytest.raises(OdkdError, match=r"student\.pth.*missing keys: conv1\.weight.*unexpected keys: backbone\."):
        load_checkpoint(build_model("hrnet_tiny"), path)
    # its own "backbone." keys do not make a plain student state_dict look like an mmpose file
    assert load_checkpoint(build_model("mobilenetv2_tiny"), path).format == "official"


def test_odkd_round_trip_rebuilds_identical_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("hrnet_tiny", num_joints=5, seg_head=True, width=4)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move the BN running statistics off their initial values
    model.eval()
    path = tmp_path / "runs" / "teacher.pt"
    save_checkpoint(path, model, model_name="hrnet_tiny", model_args={"width": 4}, seg_head=True,
                    extra={"epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}})
    assert not (tmp_path / "runs" / "teacher.pt.tmp").exists()
    rebuilt, meta = build_from_checkpoint(path, "cpu")
    assert meta["model"] == "hrnet_tiny" and meta["model_args"] == {"width": 4} and meta["seg_head"] is True
    assert meta["num_joints"] == 5 and meta["fingerprint"] == model_fingerprint(model.state_dict())
    assert not rebuilt.training
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    assert torch.equal(a.heatmaps, b.heatmaps) and torch.equal(a.mask_logits, b.mask_logits)
    report = load_checkpoint(build_model("hrnet_tiny", 5, True, width=4), path)
    assert report.format == "odkd" and report.new_keys == [] and report.meta["model"] == "hrnet_tiny"


def test_fingerprint_sees_values_dtypes_and_names():
    state = build_model("mobilenetv2_tiny").state_dict()
    base = model_fingerprint(state)
    assert base == model_fingerprint({k: v.clone() for k, v in reversed(state.items())})
    key = "final_layer.bias"
    assert model_fingerprint({**state, key: state[key] + 1e-3}) != base
    assert model_fingerprint({**state, key: state[key].double()}) != base
    renamed = {("x" + k if k == key else k): v for k, v in state.items()}
    assert model_fingerprint(renamed) != base


def test_build_from_official_file_needs_the_model_name(tmp_path, w32_layout):
    path = tmp_path / "w32.pth"
    state = constant_state_dict(w32_layout)
    torch.save(state, path)
    with pytest.raises(OdkdError, match="the official format does not record its model; name it with --model"):
        build_from_checkpoint(path, "cpu")
    model, meta = build_from_checkpoint(path, "cpu", model="hrnet_w32")
    assert meta["model"] == "hrnet_w32" and not model.training
    assert torch.equal(model.state_dict()["final_layer.weight"], state["final_layer.weight"])
    with pytest.raises(OdkdError, match="shape"):
        build_from_checkpoint(path, "cpu", model="hrnet_w48")


def test_odkd_file_naming_an_unknown_model_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, build_model("hrnet_tiny"), model_name="hrnet_w64", model_args={}, seg_head=False)
    with pytest.raises(OdkdError, match=r"future\.pt: unknown model 'hrnet_w64'"):
        build_from_checkpoint(path, "cpu")


class NotWeights:
    """A class object in a pickle: the kind of payload weights_only loading exists to refuse."""


def test_pickle_with_objects_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": NotWeights()}, path)
    with pytest.raises(OdkdError) as err:
        load_checkpoint(build_model("hrnet_tiny"), path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a weights-only checkpoint") and "NotWeights" in msg
    assert "\n" not in msg


def test_missing_and_corrupt_files(tmp_path):
    model = build_model("hrnet_tiny")
    with pytest.raises(OdkdError, match=r"nowhere\.pth: checkpoint file not found"):
        load_checkpoint(model, tmp_path / "nowhere.pth")
    for content in (b"PK\x03\x04 a truncated zip archive", b"plain garbage"):
        corrupt = tmp_path / "corrupt.pth"
        corrupt.write_bytes(content)
        with pytest.raises(OdkdError, match=r"corrupt\.pth: cannot read checkpoint") as err:
            load_checkpoint(model, corrupt)
        assert "\n" not in str(err.value)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(OdkdError, match=r"tensor\.pth: not a checkpoint: holds a Tensor"):
        load_checkpoint(model, tensor_file)


def test_legacy_file_without_batch_counters_loads(tmp_path):
    # the official weights were written by torch 1.0: legacy (non-zip) format, and files from
    # before torch 0.4.1 have no BatchNorm num_batches_tracked
    source = build_model("hrnet_tiny", num_joints=4)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    model = build_model("hrnet_tiny", num_joints=4)
    assert load_checkpoint(model, path).format == "official"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
