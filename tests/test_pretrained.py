"""ImageNet inits: torchvision's MobileNetV2 and timm's HRNet files fill the backbone, the pose head stays."""

import pytest
import torch

from odkd.errors import OdkdError
from odkd.models import build_from_checkpoint, build_model, load_checkpoint
from odkd.models.hrnet import HighResolutionModule


def _conv(sd: dict, name: str, out_c: int, in_c: int, k: int, *, groups: int = 1, bias: bool = False, device="cpu"):
    sd[f"{name}.weight"] = torch.randn(out_c, in_c // groups, k, k, device=device)
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_c, device=device)


def _bn(sd: dict, name: str, c: int, device="cpu"):
    sd[f"{name}.weight"] = torch.randn(c, device=device)
    sd[f"{name}.bias"] = torch.randn(c, device=device)
    sd[f"{name}.running_mean"] = torch.randn(c, device=device)
    sd[f"{name}.running_var"] = torch.rand(c, device=device) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(1000, device=device)


def torchvision_mobilenetv2_state_dict() -> dict:
    """The keys and shapes of torchvision's mobilenet_v2 ImageNet file (width 1.0), written out from
    torchvision/models/mobilenetv2.py, independently of odkd's model classes."""
    sd: dict = {}
    _conv(sd, "features.0.0", 32, 3, 3)
    _bn(sd, "features.0.1", 32)
    index, inp = 1, 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for _ in range(n):
            p, hidden, layer = f"features.{index}.conv", inp * t, 0
            if t != 1:
                _conv(sd, f"{p}.0.0", hidden, inp, 1)
                _bn(sd, f"{p}.0.1", hidden)
                layer = 1
            _conv(sd, f"{p}.{layer}.0", hidden, hidden, 3, groups=hidden)
            _bn(sd, f"{p}.{layer}.1", hidden)
            _conv(sd, f"{p}.{layer + 1}", c, hidden, 1)
            _bn(sd, f"{p}.{layer + 2}", c)
            index, inp = index + 1, c
    _conv(sd, f"features.{index}.0", 1280, inp, 1)
    _bn(sd, f"features.{index}.1", 1280)
    sd["classifier.1.weight"] = torch.randn(1000, 1280)
    sd["classifier.1.bias"] = torch.randn(1000)
    return sd


TIMM_HEAD_CHANNELS = (32, 64, 128, 256)  # timm HighResolutionNet._make_head, expanded 4x by its Bottlenecks
TIMM_CLASSIFICATION_EXTRAS = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def timm_hrnet_state_dict(name: str, device="cpu", **model_args) -> dict:
    """A timm ImageNet HRNet file (timm/models/hrnet.py, classification head) whose backbone is odkd's
    `name`: its pose-head-free keys, plus what the classification net has on top, with timm's names."""
    with torch.device(device):
        pose = build_model(name, **model_args)
    sd = {k: v if k.endswith("num_batches_tracked") else torch.randn(v.shape, device=device)
          for k, v in pose.state_dict().items() if not k.startswith("final_layer.")}
    widths = [pose.final_layer.in_channels * 2**i for i in range(4)]
    # timm's last stage4 module is multi-scale: it also fuses into branches 1-3
    with torch.device(device):
        multi_scale = HighResolutionModule(widths, num_blocks=1, multi_scale_output=True)
    last = len(pose.stage4) - 1
    for i in range(1, 4):
        for k, v in multi_scale.fuse_layers[i].state_dict().items():
            sd[f"stage4.{last}.fuse_layers.{i}.{k}"] = torch.randn(v.shape, device=device)
    for i, (c, hc) in enumerate(zip(widths, TIMM_HEAD_CHANNELS)):
        p = f"incre_modules.{i}.0"
        _conv(sd, f"{p}.conv1", hc, c, 1, device=device)
        _bn(sd, f"{p}.bn1", hc, device=device)
        _conv(sd, f"{p}.conv2", hc, hc, 3, device=device)
        _bn(sd, f"{p}.bn2", hc, device=device)
        _conv(sd, f"{p}.conv3", 4 * hc, hc, 1, device=device)
        _bn(sd, f"{p}.bn3", 4 * hc, device=device)
        if c != 4 * hc:
            _conv(sd, f"{p}.downsample.0", 4 * hc, c, 1, device=device)
            _bn(sd, f"{p}.downsample.1", 4 * hc, device=device)
    for i in range(3):
        _conv(sd, f"downsamp_modules.{i}.0", 4 * TIMM_HEAD_CHANNELS[i + 1], 4 * TIMM_HEAD_CHANNELS[i], 3, bias=True,
              device=device)
        _bn(sd, f"downsamp_modules.{i}.1", 4 * TIMM_HEAD_CHANNELS[i + 1], device=device)
    _conv(sd, "final_layer.0", 2048, 4 * TIMM_HEAD_CHANNELS[3], 1, bias=True, device=device)
    _bn(sd, "final_layer.1", 2048, device=device)
    sd["classifier.weight"] = torch.randn(1000, 2048, device=device)
    sd["classifier.bias"] = torch.randn(1000, device=device)
    return sd


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagenet") / "mobilenet_v2-b0353104.pth"
    torch.manual_seed(1)
    torch.save(torchvision_mobilenetv2_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_w18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagenet") / "hrnet_w18.ms_in1k.bin"
    torch.manual_seed(2)
    torch.save(timm_hrnet_state_dict("hrnet_w18"), path)
    return path


def _fresh_model(name: str, **kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_torchvision_mobilenetv2_file_fills_the_backbone(torchvision_file):
    model, fresh = _fresh_model("mobilenetv2")
    report = load_checkpoint(model, torchvision_file)
    file = torch.load(torchvision_file, weights_only=True)
    loaded = model.state_dict()

    backbone = [k for k in file if k.startswith("features.")]
    params = sum(v.numel() for k, v in file.items() if not k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked")))
    assert params == 3_504_872  # torchvision's published num_params for MobileNet_V2_Weights
    assert report.format == "torchvision-imagenet"
    assert report.loaded_keys == [f"backbone.{k}" for k in backbone]
    assert all(torch.equal(loaded[f"backbone.{k}"], file[k]) for k in backbone)
    assert report.dropped_keys == ["classifier.1.weight", "classifier.1.bias"]
    assert {k.split(".")[0] for k in report.new_keys} == {"deconv_layers", "final_layer"}
    assert set(loaded) == set(report.loaded_keys) | set(report.new_keys)
    assert all(torch.equal(loaded[k], fresh[k]) for k in report.new_keys)
    assert report.summary() == (
        f"{torchvision_file} (torchvision-imagenet checkpoint): {len(backbone)} keys loaded into backbone; "
        "2 classification-only keys dropped; newly initialized: deconv_layers, final_layer"
    )


def test_timm_hrnet_file_fills_the_backbone_of_a_seg_head_teacher(timm_w18_file):
    model, fresh = _fresh_model("hrnet_w18", seg_head=True)
    report = load_checkpoint(model, timm_w18_file)
    file = torch.load(timm_w18_file, weights_only=True)
    loaded = model.state_dict()

    assert report.format == "timm-imagenet"
    assert all(torch.equal(loaded[k], file[k]) for k in report.loaded_keys)
    assert set(report.loaded_keys) | set(report.dropped_keys) == set(file)
    assert {k.split(".")[0] for k in report.dropped_keys} == {*(p[:-1] for p in TIMM_CLASSIFICATION_EXTRAS), "stage4"}
    assert all(k.startswith(("stage4.2.fuse_layers.1.", "stage4.2.fuse_layers.2.", "stage4.2.fuse_layers.3."))
               for k in report.dropped_keys if k.startswith("stage4."))
    assert {k.split(".")[0] for k in report.new_keys} == {"final_layer", "seg_head"}
    assert set(loaded) == set(report.loaded_keys) | set(report.new_keys)
    assert all(torch.equal(loaded[k], fresh[k]) for k in report.new_keys)
    assert report.summary().endswith(
        f"{len(report.loaded_keys):,} keys loaded into conv1, bn1, conv2, bn2, layer1, transition1, stage2, "
        f"transition2, stage3, transition3, stage4; {len(report.dropped_keys):,} classification-only keys dropped; "
        "newly initialized: final_layer, seg_head"
    )


# timm variant -> the odkd model and model_args of its backbone, and timm's published parameter
# count in millions (results/results-imagenet.csv), which includes the classification head.
TIMM_HRNETS = {
    "hrnet_w18_small": ("hrnet_w16", {"num_modules": [1, 1, 1], "num_blocks": 2, "layer1_blocks": 1,
                                      "layer1_planes": 32}, 13.19),
    "hrnet_w18_small_v2": ("hrnet_w18", {"num_modules": [1, 3, 2], "num_blocks": 2, "layer1_blocks": 2}, 15.60),
    "hrnet_w18": ("hrnet_w18", {}, 21.30),
    "hrnet_w30": ("hrnet_w32", {"width": 30}, 37.71),
    "hrnet_w32": ("hrnet_w32", {}, 41.23),
    "hrnet_w40": ("hrnet_w32", {"width": 40}, 57.56),
    "hrnet_w44": ("hrnet_w32", {"width": 44}, 67.06),
    "hrnet_w48": ("hrnet_w48", {}, 77.47),
    "hrnet_w64": ("hrnet_w32", {"width": 64}, 128.06),
}


@pytest.mark.parametrize("variant", TIMM_HRNETS)
def test_timm_layout_has_the_published_parameter_count(variant):
    """The odkd backbone plus timm's classification extras, as the tests build them, is timm's network:
    so each odkd model and model_args named in odkd/models/pretrained.py matches that timm file."""
    name, model_args, millions = TIMM_HRNETS[variant]
    sd = timm_hrnet_state_dict(name, device="meta", **model_args)
    params = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                      "num_batches_tracked")))
    assert round(params / 1e6, 2) == millions


def test_timm_hrnet_w18_small_loads_into_the_matching_hrnet_w16(tmp_path):
    name, model_args, _ = TIMM_HRNETS["hrnet_w18_small"]
    path = tmp_path / "hrnet_w18_small.bin"
    torch.save(timm_hrnet_state_dict(name, **model_args), path)
    report = load_checkpoint(build_model(name, **model_args), path)
    assert report.format == "timm-imagenet" and {k.split(".")[0] for k in report.new_keys} == {"final_layer"}
    with pytest.raises(OdkdError, match=r"hrnet_w18_small\.bin: timm-imagenet checkpoint does not fit the model; "
                                        r"missing keys: layer1\.1\.conv1\.weight"):
        load_checkpoint(build_model("hrnet_w16"), path)


@pytest.mark.parametrize(
    ("file", "model", "model_args", "message"),
    [
        ("torchvision_file", "mobilenetv2", {"width_mult": 0.5},
         r"mobilenet_v2-b0353104\.pth: key 'backbone\.features\.0\.0\.weight' has shape \(32, 3, 3, 3\) in the "
         r"checkpoint but \(16, 3, 3, 3\) in the model"),
        ("timm_w18_file", "hrnet_w32", {},
         r"hrnet_w18\.ms_in1k\.bin: key 'transition1\.0\.0\.weight' has shape \(18, 256, 3, 3\) in the "
         r"checkpoint but \(32, 256, 3, 3\) in the model"),
    ],
)
def test_wrong_width_file_is_one_line_naming_the_first_mismatch(file, model, model_args, message, request):
    with pytest.raises(OdkdError, match=message) as err:
        load_checkpoint(build_model(model, **model_args), request.getfixturevalue(file))
    assert "\n" not in str(err.value)


def test_imagenet_file_is_no_trained_model(torchvision_file):
    with pytest.raises(OdkdError, match=r"mobilenet_v2-b0353104\.pth: a torchvision-imagenet checkpoint is an "
                                        r"ImageNet backbone without a pose head"):
        build_from_checkpoint(torchvision_file, "cpu", model="mobilenetv2")
