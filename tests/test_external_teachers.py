"""ONNX and TorchScript teachers: odkd's own tiny HRNets, exported both ways, build the PyTorch teachers' store."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from odkd.config import parse_config
from odkd.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from odkd.errors import OdkdError
from odkd.models import build_model, load_checkpoint, save_checkpoint
from odkd.models.external import load_external_teacher
from odkd.models.inference import predict_batch
from odkd.store import TeacherTargets
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache, verify_cache

SEG_HEAD = {"primary": False, "senior": True}
INPUT = (96, 128)  # (w, h); margin 1.0, so the teachers' input is the student's
MAPS = ("pt/heatmaps", "st/heatmaps", "st/mask")
CONFS = ("pt/conf", "st/conf")
SUFFIX = {"onnx": "onnx", "torchscript": "pt"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Exported(nn.Module):
    """What a foreign framework's export holds: plain tensors, the heatmaps first, then the mask."""

    def __init__(self, net, mask_probabilities: bool = False, bgr_pixels: bool = False):
        super().__init__()
        self.net, self.mask_probabilities, self.bgr_pixels = net, mask_probabilities, bgr_pixels
        self.register_buffer("mean", torch.from_numpy(IMAGENET_MEAN_RGB).view(1, 3, 1, 1))
        self.register_buffer("std", torch.from_numpy(IMAGENET_STD_RGB).view(1, 3, 1, 1))

    def forward(self, x):
        if self.bgr_pixels:  # takes BGR 0..255 and normalizes inside, as some deployed models do
            x = (x.flip(1) / 255.0 - self.mean) / self.std
        out = self.net(x)
        if out.mask_logits is None:
            return out.heatmaps
        return out.heatmaps, torch.sigmoid(out.mask_logits) if self.mask_probabilities else out.mask_logits


def make_config(root, primary: str, senior: str, cache: str = "", heatmap_size=(INPUT[0] // 4, INPUT[1] // 4)):
    return parse_config(f"""
[data]
root = "{root}"
input_size = [{INPUT[0]}, {INPUT[1]}]
heatmap_size = [{heatmap_size[0]}, {heatmap_size[1]}]
sigma = 1.0
[teachers.primary]
{primary}
[teachers.senior]
seg_head = true
{senior}
[cache]
threshold = 0.5
threshold_mode = "relative"
chunk_instances = 4
shard_instances = 8
batch_size = 8
{cache}
""")


def external_config(world, kind: str, **sections):
    return make_config(world / "data", f'model = "{kind}"\ncheckpoint = "{world / ("pt." + SUFFIX[kind])}"',
                       f'model = "{kind}"\ncheckpoint = "{world / ("st." + SUFFIX[kind])}"', **sections)


def crops(n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(n, 3, INPUT[1], INPUT[0])).astype(np.float32))


def bit_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.unpackbits(a ^ b).sum()) / (a.size * 8)



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6-image synthetic dataset, PT and ST as odkd checkpoints, and each exported to ONNX and TorchScript."""
    base = tmp_path_factory.mktemp("external_teachers")
    make_synthetic_dataset(base / "data", train_images=6, val_images=1, seed=0)
    torch.manual_seed(0)
    example = torch.zeros(2, 3, INPUT[1], INPUT[0])
    for role, seg in SEG_HEAD.items():
        net = build_model("hrnet_tiny", seg_head=seg, width=8)
        with torch.no_grad():  # away from the near-zero init, so maps and masks have structure
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            if seg:  # mask logits of spread 2 about 0, so the mask threshold cuts through the masks
                logits = net.eval()(crops()).mask_logits
                net.seg_head[3].weight.mul_(2.0 / logits.std())
                net.seg_head[3].bias.mul_(2.0 / logits.std()).sub_(net(crops()).mask_logits.mean())
        save_checkpoint(base / f"{role}.pth", net, model_name="hrnet_tiny", model_args={"width": 8}, seg_head=seg)
        exported = Exported(net.eval()).eval()
        name = "pt" if role == "primary" else "st"
        torch.onnx.export(exported, (example,), str(base / f"{name}.onnx"), input_names=["crops"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
        torch.jit.trace(exported, example).save(str(base / f"{name}.pt"))
    return base


@pytest.fixture(scope="module")
def stores(world):
    """The store of the PyTorch teachers, and of the same teachers as ONNX and as TorchScript files."""
    torch_cfg = make_config(world / "data", f'model = "hrnet_tiny"\nmodel_args = {{ width = 8 }}\ncheckpoint = '
                            f'"{world / "primary.pth"}"', f'model = "hrnet_tiny"\nmodel_args = {{ width = 8 }}\n'
                            f'checkpoint = "{world / "senior.pth"}"')
    out = {"pytorch": build_cache(torch_cfg, "train", str(world / "pytorch.zarr"), scheduler="synchronous",
                                  progress=False)}
    for kind in SUFFIX:
        out[kind] = build_cache(external_config(world, kind), "train", str(world / f"{kind}.zarr"),
                                scheduler="synchronous", progress=False)
    return out


def differences(stores, kind) -> dict[str, float]:
    """Per array: the fraction of differing bits (maps) or the largest difference (conf) against PyTorch's."""
    a, b = zarr.open_group(stores["pytorch"], mode="r"), zarr.open_group(stores[kind], mode="r")
    out = {name: bit_fraction(a[name][:], b[name][:]) for name in MAPS}
    out.update({name: float(np.abs(a[name][:].astype(np.float32) - b[name][:].astype(np.float32)).max())
                for name in CONFS})
    return out


def test_the_files_keep_the_contract(world):
    import onnx

    model = onnx.load(str(world / "st.onnx"))
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 128, 96]
    assert isinstance(model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, str)
    assert len(model.graph.output) == 2 and len(onnx.load(str(world / "pt.onnx")).graph.output) == 1


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_external_stores_match_the_pytorch_teachers(stores, kind, capsys):
    found = differences(stores, kind)
    with capsys.disabled():
        print(f"\n{kind} vs PyTorch: " + ", ".join(
            f"{name} {v:.2e} of bits" if name in MAPS else f"{name} max |diff| {v:.1e}" for name, v in found.items()))
    a, b = zarr.open_group(stores["pytorch"], mode="r"), zarr.open_group(stores[kind], mode="r")
    for name in ("meta/ok", "meta/center", "meta/scale", "meta/ann_id"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    assert a["st/heatmaps"][:].any() and a["st/mask"][:].any()
    if kind == "torchscript":  # the traced graph runs the very same kernels on the very same input
        assert all(v == 0 for v in found.values()), found
    else:  # onnxruntime's kernels round differently: a pixel right at the threshold may flip
        assert all(found[name] <= 1e-3 for name in MAPS), found
        assert all(found[name] <= 1e-3 for name in CONFS), found


def test_provenance_holds_the_files_sha256_and_verify_replays(world, stores):
    attrs = TeacherTargets.open(stores["onnx"]).attrs
    for key in ("pt", "st"):
        path = world / f"{key}.onnx"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert attrs["teachers"][key] == {"role": {"pt": "primary", "st": "senior"}[key], "model": "onnx",
                                          "checkpoint": str(path), "fingerprint": sha, "val_ap": None}
        assert attrs["settings"]["teachers"][key]["fingerprint"] == sha
    st = attrs["settings"]["teachers"]["st"]
    assert (st["input_order"], st["mask_output"], st["input_std"]) == ("rgb", "logits", [0.229, 0.224, 0.225])
    assert attrs["settings"]["teachers"]["pt"]["mask_output"] is None
    report = verify_cache(stores["onnx"], external_config(world, "onnx"), sample=6)
    assert report.ok, str(report)
    assert any(line.startswith("ok    st/mask: ") for line in report.lines)


def test_a_changed_contract_is_not_resumed(world, stores):
    bgr = make_config(world / "data", f'model = "onnx"\ncheckpoint = "{world / "pt.onnx"}"\ninput_order = "bgr"',
                      f'model = "onnx"\ncheckpoint = "{world / "st.onnx"}"')
    with pytest.raises(OdkdError, match=r"settings.teachers.pt.input_order 'rgb' != 'bgr'.*--overwrite"):
        build_cache(bgr, "train", stores["onnx"], scheduler="synchronous", progress=False)


def torch_teacher(world, role):
    net = build_model("hrnet_tiny", seg_head=SEG_HEAD[role], width=8)
    load_checkpoint(net, world / f"{role}.pth")
    return net.eval()


def test_other_normalizations_and_mask_probabilities(world, tmp_path):
    """A file taking BGR pixels in 0..255 and giving mask probabilities gives PyTorch's maps and masks."""
    path = tmp_path / "st_bgr_prob.pt"
    torch.jit.trace(Exported(torch_teacher(world, "senior"), mask_probabilities=True, bgr_pixels=True),
                    torch.zeros(2, 3, INPUT[1], INPUT[0])).save(str(path))
    external = load_external_teacher("torchscript", str(path), "cpu", input_mean=(0, 0, 0),
                                     input_std=(1 / 255,) * 3, input_order="bgr", mask_output="probabilities")
    images = crops()
    want_maps, want_mask = predict_batch(torch_teacher(world, "senior"), images)
    maps, mask = predict_batch(external, images)
    torch.testing.assert_close(maps, want_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=1e-5)
    assert ((mask >= 0.5) != (want_mask >= 0.5)).float().mean() <= 1e-3
    saturated = load_external_teacher("torchscript", str(path), "cpu", input_mean=(0, 0, 0), input_std=(1e-6,) * 3,
                                      input_order="bgr", mask_output="probabilities")
    assert torch.isfinite(saturated(images).mask_logits).all()  # probabilities of exactly 0 or 1 stay finite


def test_shape_mismatch_is_one_line_before_any_work(world, tmp_path):
    out = tmp_path / "s.zarr"
    stride8 = external_config(world, "torchscript", heatmap_size=(12, 16))
    with pytest.raises(OdkdError) as err:
        build_cache(stride8, "train", str(out), scheduler="synchronous", progress=False)
    assert str(err.value) == (f"teachers.primary: {world / 'pt.pt'} gives heatmaps of shape (2, 17, 32, 24) for "
                              f"input (2, 3, 128, 96); the cache needs (2, 17, 16, 12)")
    wider = external_config(world, "onnx", cache="margin = 1.25")  # the file's spatial size is fixed
    with pytest.raises(OdkdError) as err:
        build_cache(wider, "train", str(out), scheduler="synchronous", progress=False)
    assert str(err.value).startswith(f"teachers.primary: {world / 'pt.onnx'}: cannot run a batch of shape "
                                     f"(2, 3, 160, 128): ")
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_config_mistakes_are_one_line(world, tmp_path):
    def fails(cfg, match):
        with pytest.raises(OdkdError, match=match):
            build_cache(cfg, "train", str(tmp_path / "s.zarr"), scheduler="synchronous", progress=False)
        assert not (tmp_path / "s.zarr").exists()

    pt_onnx = f'model = "onnx"\ncheckpoint = "{world / "pt.onnx"}"'
    st_onnx = f'model = "onnx"\ncheckpoint = "{world / "st.onnx"}"'
    with pytest.raises(OdkdError, match="teachers.primary.input_order: 'rgba' is not one of rgb, bgr"):
        make_config(world / "data", 'input_order = "rgba"', "")
    fails(make_config(world / "data", f'model = "hrnet_tiny"\ncheckpoint = "{world / "primary.pth"}"\n'
                      'input_order = "bgr"', st_onnx),
          'teachers.primary.input_order: only for model = "onnx" or "torchscript"')
    fails(make_config(world / "data", f"{pt_onnx}\nmodel_args = {{ width = 8 }}", st_onnx),
          "teachers.primary.model_args: the onnx file fixes its own architecture")
    fails(make_config(world / "data", pt_onnx, pt_onnx),  # PT's file has no mask output
          f"teachers.senior: {world / 'pt.onnx'}: gives 1 output; a teacher with a mask gives the heatmaps first")
    fails(make_config(world / "data", f'model = "torchscript"\ncheckpoint = "{world / "pt.onnx"}"', st_onnx),
          f"{world / 'pt.onnx'}: torch.jit.load cannot load it")


def test_missing_onnxruntime_says_what_to_install(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is absent
    with pytest.raises(OdkdError, match=r"pt.onnx: ONNX teachers need onnxruntime: pip install odkd\[export\]$"):
        load_external_teacher("onnx", str(world / "pt.onnx"))
