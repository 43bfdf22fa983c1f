"""Export as a user ships it: one heatmap output, dynamic batch, the same numbers as PyTorch."""

import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from odkd.cli import main
from odkd.models import build_from_checkpoint, build_model, save_checkpoint
from odkd.models.export import export_model

WIDTH, HEIGHT = 64, 96  # not square, so a swapped width and height shows


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def save_seg_model(path, name: str):
    """A seg-head model whose heatmaps peak near 1, as a trained model's do: the official init's
    std 0.001 gives ~1e-14, where any exporter matches PyTorch."""
    torch.manual_seed(0)
    model = build_model(name, 17, seg_head=True)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
    images = torch.randn(4, 3, HEIGHT, WIDTH)
    model(images)  # move the BN running statistics off 0 and 1
    with torch.no_grad():
        model.final_layer.weight /= model.eval()(images).heatmaps.abs().max()
    save_checkpoint(path, model, model_name=name, model_args={}, seg_head=True)
    return path


@pytest.fixture(scope="module", params=["mobilenetv2_tiny", "hrnet_tiny"])
def checkpoint(request, tmp_path_factory):
    return save_seg_model(tmp_path_factory.mktemp("export") / f"{request.param}.pth", request.param)


def pytorch_heatmaps(checkpoint, images: torch.Tensor) -> np.ndarray:
    model, _ = build_from_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        return model(images).heatmaps.numpy()


def test_onnx_has_one_heatmap_output_a_dynamic_batch_and_matches_pytorch(checkpoint, tmp_path):
    import onnx
    import onnxruntime

    report = export_model(checkpoint, tmp_path / "student.onnx", input_size=(WIDTH, HEIGHT),
                          config_input_size=(192, 256))
    assert (report.format, report.input_size, report.dropped_heads) == ("onnx", (WIDTH, HEIGHT), ("seg_head",))
    assert report.max_abs_diff < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # no external weights, no leftovers

    graph = onnx.load(tmp_path / "student.onnx")
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["image"]
    (output,) = graph.graph.output
    dims = output.type.tensor_type.shape.dim
    assert output.name == "heatmaps"
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [17, HEIGHT // 4, WIDTH // 4]
    assert not any(init.name.startswith("seg_head") for init in graph.graph.initializer)

    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, HEIGHT, WIDTH)
        (heatmaps,) = session.run(None, {"image": images.numpy()})
        expected = pytorch_heatmaps(checkpoint, images)
        assert heatmaps.shape == (batch, 17, HEIGHT // 4, WIDTH // 4)
        assert np.abs(expected).max() > 0.1
        np.testing.assert_allclose(heatmaps, expected, rtol=0, atol=1e-4)


def test_torchscript_loads_and_matches_pytorch(checkpoint, tmp_path):
    report = export_model(checkpoint, tmp_path / "student.pt", input_size=(WIDTH, HEIGHT),
                          config_input_size=(192, 256))
    assert (report.format, report.dropped_heads) == ("torchscript", ("seg_head",)) and report.max_abs_diff < 1e-4
    loaded = torch.jit.load(str(tmp_path / "student.pt"))
    images = torch.randn(1, 3, HEIGHT, WIDTH)  # traced at batch 2
    with torch.no_grad():
        heatmaps = loaded(images)
    assert isinstance(heatmaps, torch.Tensor) and heatmaps.shape == (1, 17, HEIGHT // 4, WIDTH // 4)
    np.testing.assert_allclose(heatmaps.numpy(), pytorch_heatmaps(checkpoint, images), rtol=0, atol=1e-4)


def test_cli_exports_at_the_demo_input_size_and_prints_the_max_difference(tmp_path):
    ckpt = save_seg_model(tmp_path / "student.pth", "mobilenetv2_tiny")
    result = run("export", "--checkpoint", ckpt, "--out", tmp_path / "student.pt")
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    # the demo pipeline's [data] input_size, 96x128, since the checkpoint records none
    assert "N x 3 x 128 x 96" in line and "dropped seg_head" in line
    assert float(line.split("= ")[1].split()[0]) < 1e-4
    assert (tmp_path / "student.pt").is_file()


def test_an_unknown_suffix_is_one_line(tmp_path):
    line = one_line_error(run("export", "--checkpoint", tmp_path / "a.pth", "--out", tmp_path / "student.tflite"))
    assert "student.tflite: unknown export format '.tflite'; use .onnx (ONNX) or .pt (TorchScript)" in line


def test_a_missing_onnx_extra_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when not installed
    line = one_line_error(run("export", "--checkpoint", tmp_path / "a.pth", "--out", tmp_path / "student.onnx"))
    assert "onnxruntime is missing" in line and "pip install 'odkd[export]'" in line


def test_a_bad_input_size_names_the_option_and_writes_nothing(tmp_path):
    ckpt = save_seg_model(tmp_path / "student.pth", "mobilenetv2_tiny")
    out = tmp_path / "student.pt"
    line = one_line_error(run("export", "--checkpoint", ckpt, "--out", out, "--input-size", 100, 64))
    assert "--input-size: input size 100x64 (WxH): width and height must be multiples of 32" in line
    assert not out.exists()


def test_an_official_checkpoint_needs_model(tmp_path):
    ckpt = tmp_path / "pose_hrnet.pth"
    torch.save(build_model("hrnet_tiny").state_dict(), ckpt)
    line = one_line_error(run("export", "--checkpoint", ckpt, "--out", tmp_path / "student.pt"))
    assert "does not record its model; name it with --model" in line


def test_an_exported_file_given_as_a_checkpoint_is_one_line_naming_the_key_that_takes_it(tmp_path):
    """A TorchScript or ONNX file is a program, not weights: evaluate, predict and export say so in one line
    and name the teacher key that runs such a file, with no torch warning and no advice about
    torch.load's weights_only, which an odkd user cannot pass."""
    scripted = tmp_path / "student.pt"
    export_model(save_seg_model(tmp_path / "student.pth", "mobilenetv2_tiny"), scripted,
                 input_size=(WIDTH, HEIGHT), config_input_size=(192, 256))
    onnx_file = tmp_path / "student.onnx"
    onnx_file.write_bytes(b"\x08\x08\x12\x07pytorch")  # what a protobuf ModelProto starts with
    boxes = tmp_path / "boxes.json"
    boxes.write_text("[[0, 0, 10, 20]]")
    for path, kind, teacher_model in ((scripted, "a TorchScript archive", "torchscript"),
                                      (onnx_file, "an ONNX file", "onnx")):
        expected = (f'Error: {path}: {kind} (e.g. from odkd export), not a checkpoint of weights; it runs as a '
                    f'teacher: [teachers.ROLE] model = "{teacher_model}", checkpoint = that file '
                    f'(docs/commands.md, Teachers from other frameworks)')
        for args in (["evaluate", "--checkpoint", path, "--device", "cpu"],
                     ["predict", tmp_path / "image.jpg", "--checkpoint", path, "--boxes", boxes,
                      "--out", tmp_path / "out.png", "--device", "cpu"],
                     ["export", "--checkpoint", path, "--out", tmp_path / "again.pt"]):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                line = one_line_error(run(*args))
            assert line == expected, (args, line)
            assert not [str(w.message) for w in caught if "torch" in str(w.message)], args
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "again.pt").exists()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_export_runs_and_checks_the_model_on_the_device_asked_for(tmp_path, device):
    ckpt = save_seg_model(tmp_path / "student.pth", "mobilenetv2_tiny")
    out = tmp_path / "student.pt"
    result = run("export", "--checkpoint", ckpt, "--out", out, "--input-size", WIDTH, HEIGHT, "--device", device)
    if device == "cuda" and not torch.cuda.is_available():
        assert one_line_error(result) == "Error: device 'cuda' requested but CUDA is not available"
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    on = "" if device == "cpu" else " on cuda"
    assert f"max |torch.jit.load - PyTorch{on}| = " in line
    assert float(line.split("= ")[1].split()[0]) < 1e-4
    # traced on the device: the file's weights are where the model ran
    loaded = torch.jit.load(str(out))
    assert {p.device.type for p in loaded.parameters()} == {device}
    images = torch.randn(1, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        heatmaps = torch.jit.load(str(out), map_location="cpu")(images)
    np.testing.assert_allclose(heatmaps.numpy(), pytorch_heatmaps(ckpt, images), rtol=0, atol=1e-4)
