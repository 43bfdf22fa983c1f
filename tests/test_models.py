"""Model zoo: output shapes and stride, seg head, build_model errors, published complexity numbers."""

import pytest
import torch

from odkd.errors import OdkdError
from odkd.models import MODELS, PoseOutput, build_model, list_models, model_complexity

TINY = ("hrnet_tiny", "mobilenetv2_tiny")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_stride_4_at_256x192(name):
    # the meta device gives the real output shapes without allocating or computing anything
    with torch.device("meta"):
        model = build_model(name, num_joints=17, seg_head=True)
        out = model(torch.zeros(1, 3, 256, 192))
    assert isinstance(out, PoseOutput)
    assert out.heatmaps.shape == (1, 17, 64, 48)
    assert out.mask_logits.shape == (1, 1, 64, 48)
    assert model.num_joints == 17 and model.has_seg_head


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_compute_at_128x96(name):
    torch.manual_seed(0)
    model = build_model(name, num_joints=5).eval()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        out = model(x)
    assert out.heatmaps.shape == (2, 5, 32, 24)
    assert out.mask_logits is None and not model.has_seg_head
    assert torch.isfinite(out.heatmaps).all()
    # different images give different heatmaps: the whole path is connected
    assert not torch.equal(out.heatmaps[0], out.heatmaps[1])


@pytest.mark.parametrize("name", TINY)
def test_seg_head_trains_with_the_pose_head(name):
    torch.manual_seed(0)
    model = build_model(name, num_joints=3, seg_head=True).train()
    out = model(torch.randn(2, 3, 128, 96))
    assert out.mask_logits.shape == (2, 1, 32, 24)
    (out.heatmaps.sum() + out.mask_logits.sum()).backward()
    assert model.seg_head[0].weight.grad.abs().sum() > 0
    assert model.final_layer.weight.grad.abs().sum() > 0
    assert all(k.startswith("seg_head.") for k in set(model.state_dict()) - set(build_model(name, 3).state_dict()))


def test_hrnet_init_is_the_official_one():
    torch.manual_seed(0)
    model = build_model("hrnet_tiny", seg_head=True)
    conv = model.stage2[0].branches[0][0].conv1.weight
    assert abs(conv.std().item() - 0.001) < 2e-4
    assert torch.equal(model.bn1.weight, torch.ones_like(model.bn1.weight))
    assert torch.equal(model.final_layer.bias, torch.zeros(17))
    assert model.bn1.momentum == 0.1


def test_hrnet_last_module_fuses_only_the_high_resolution_output():
    model = build_model("hrnet_tiny")
    assert len(model.stage4[-1].fuse_layers) == 1
    assert len(model.stage3[-1].fuse_layers) == 3
    assert model.final_layer.kernel_size == (1, 1)


def test_overrides_change_the_network():
    model = build_model("hrnet_tiny", width=4, num_modules=[1, 2, 1])
    assert model.final_layer.weight.shape == (17, 4, 1, 1)
    assert len(model.stage3) == 2
    student = build_model("mobilenetv2_tiny", deconv_channels=16)
    assert student.final_layer.weight.shape == (17, 16, 1, 1)


def test_build_model_errors_name_the_fault():
    with pytest.raises(OdkdError, match="unknown model 'hrnet_w64'.*hrnet_w32"):
        build_model("hrnet_w64")
    with pytest.raises(OdkdError, match="no argument 'widht'.*width"):
        build_model("hrnet_tiny", widht=8)
    with pytest.raises(OdkdError, match="num_modules needs 3 entries"):
        build_model("hrnet_tiny", num_modules=[1, 1])


@pytest.mark.parametrize("name", TINY)
def test_input_off_the_stride_grid_is_a_clear_error(name):
    with pytest.raises(OdkdError, match="input size 48x64 .* multiples of 32"):
        build_model(name)(torch.zeros(1, 3, 64, 48))


@pytest.mark.parametrize(
    "name, params_m, gflops",
    # HRNet paper / official README, COCO 256x192
    [("hrnet_w32", 28.5, 7.1), ("hrnet_w48", 63.6, 14.6)],
)
def test_complexity_matches_the_published_table(name, params_m, gflops):
    with torch.device("meta"):
        model = build_model(name)
    params, measured = model_complexity(model, (192, 256))
    assert round(params / 1e6, 1) == params_m
    assert measured == pytest.approx(gflops, rel=0.02)


def test_complexity_scales_with_input_and_keeps_train_mode():
    model = build_model("hrnet_tiny").train()
    _, small = model_complexity(model, (96, 128))
    params, large = model_complexity(model, (192, 256))
    assert large == pytest.approx(4 * small, rel=1e-6)
    assert params == sum(p.numel() for p in model.parameters())
    assert model.training


def test_list_models_covers_the_registry():
    rows = list_models((96, 128))
    assert [r["name"] for r in rows] == list(MODELS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["hrnet_tiny"]["params"] < by_name["hrnet_w16"]["params"] < by_name["hrnet_w32"]["params"]
    assert all(r["gflops"] > 0 for r in rows)
