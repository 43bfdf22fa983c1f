"""Exporting a pose model for deployment: ONNX or TorchScript, heatmaps only, checked against PyTorch.

The shipped graph maps ``image`` (N, 3, H, W) to ``heatmaps`` (N, K, H/4, W/4): the person-mask head
serves distillation (the senior teacher's mask) and is left out. The batch axis is dynamic; H and W
are fixed at the export's input size. ONNX goes through the torch.export-based exporter (torch's
default since 2.9; the TorchScript-based one is deprecated) and is checked with onnxruntime;
TorchScript is traced and checked with torch.jit.load. The model runs on the device asked for (the
CPU by default): it is traced there, and PyTorch's heatmaps that the file is checked against are
that device's, computed in IEEE fp32 (TF32 off on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from odkd.errors import OdkdError
from odkd.models.checkpoint import build_from_checkpoint
from odkd.models.heads import check_input_size
from odkd.models.inference import cuda_tf32
from odkd.models.registry import build_model

FORMATS = {".onnx": "onnx", ".pt": "torchscript"}
# The lowest opset the torch.export-based exporter writes natively; asking it for 17 goes through
# onnx's version converter.
ONNX_OPSET = 18
# The largest |exported - PyTorch| allowed, as a fraction of the largest |heatmap| PyTorch gives.
RELATIVE_TOLERANCE = 1e-4
# Batch 2 to trace with and 3 to check with: a graph that kept the traced batch fails the check.
EXAMPLE_BATCH, CHECK_BATCH = 2, 3
EXTRA_HINT = "pip install 'odkd[export]'"


@dataclass(frozen=True)
class ExportReport:
    """What export_model wrote and how closely it reproduces PyTorch."""

    path: str
    format: str  # "onnx" | "torchscript"
    input_size: tuple[int, int]  # (width, height)
    max_abs_diff: float
    max_abs_heatmap: float  # PyTorch's largest |heatmap| on the same batch: the scale of max_abs_diff
    dropped_heads: tuple[str, ...]
    device: str = "cpu"  # where the model was traced and PyTorch's reference ran

    def summary(self) -> str:
        width, height = self.input_size
        runtime = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        kind = f"ONNX opset {ONNX_OPSET}" if self.format == "onnx" else "TorchScript"
        dropped = f", dropped {', '.join(self.dropped_heads)}" if self.dropped_heads else ""
        on = "" if self.device == "cpu" else f" on {self.device}"
        return (f"wrote {self.path} ({kind}, image N x 3 x {height} x {width} -> heatmaps{dropped}); "
                f"max |{runtime} - PyTorch{on}| = {self.max_abs_diff:.3g} (largest |heatmap| "
                f"{self.max_abs_heatmap:.3g}) on a random batch of {CHECK_BATCH}")


class HeatmapNet(nn.Module):
    """A pose model's keypoint output alone, the one tensor a deployed pose network returns."""

    def __init__(self, pose_model: nn.Module):
        super().__init__()
        self.pose_model = pose_model

    def forward(self, image: Tensor) -> Tensor:
        return self.pose_model(image).heatmaps


def _without_seg_head(model: nn.Module, meta: dict, device: torch.device) -> nn.Module:
    """The same network rebuilt without its seg head, so the head's layers are not in the file at all."""
    bare = build_model(meta["model"], meta["num_joints"], False, **meta["model_args"])
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("seg_head.")})
    return bare.to(device).eval()


def _require_onnx_extra() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OdkdError(f"ONNX export needs the export extra ({e.name} is missing): {EXTRA_HINT}") from None


@contextlib.contextmanager
def _quiet_exporters():
    """Silence what the exporters say about themselves rather than about this model: torch.jit's
    deprecation notice, the tracer's note that H and W become constants (intended), pytree
    deprecations inside torch.export, and the ONNX exporter's log of torchvision ops it skips.
    Whether the file is right is decided by the numeric check, not by these."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def _export_onnx(net: nn.Module, example: Tensor, path: Path, check_input: Tensor) -> Tensor:
    """Exported from the model on its device; run by onnxruntime on the CPU, as a deployment runs it."""
    import onnxruntime

    with _quiet_exporters():
        # external_data=False: one self-contained file; the exporter otherwise puts weights beside it.
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["heatmaps"],
                          opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (heatmaps,) = session.run(["heatmaps"], {"image": check_input.cpu().numpy()})
    return torch.from_numpy(heatmaps)


def _export_torchscript(net: nn.Module, example: Tensor, path: Path, check_input: Tensor) -> Tensor:
    """Traced on the model's device and loaded back onto it, where the saved file runs the check."""
    with _quiet_exporters():
        # check_trace re-traces and compares graphs (most of the time taken); the saved file is checked
        # numerically below instead.
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location=check_input.device)
    with torch.inference_mode(), cuda_tf32(False):
        return loaded(check_input).cpu()


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, *, config_input_size: tuple[int, int],
                 input_size: tuple[int, int] | None = None, model: str | None = None,
                 device: str | torch.device = "cpu") -> ExportReport:
    """Write the checkpoint's model to `out` as ONNX (.onnx) or TorchScript (.pt) and check it.

    The input size (width, height) is `input_size` when given, else the one the checkpoint's meta
    records, else `config_input_size` (the pipeline's [data] input_size). Official HRNet and
    mmpose files need `model`. The file appears at `out` only once the exported model's heatmaps
    agree with PyTorch's on a random batch within RELATIVE_TOLERANCE of their scale. `device` is where
    the model is traced and PyTorch's heatmaps are computed (TorchScript's file runs its check there too;
    onnxruntime runs on the CPU).
    """
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise OdkdError(f"{out}: unknown export format {out.suffix!r}; use .onnx (ONNX) or .pt (TorchScript)")
    if fmt == "onnx":
        _require_onnx_extra()
    device = torch.device(device)
    pose_model, meta = build_from_checkpoint(checkpoint, device, model=model)
    dropped: tuple[str, ...] = ()
    if pose_model.has_seg_head:
        pose_model, dropped = _without_seg_head(pose_model, meta, device), ("seg_head",)
    net = HeatmapNet(pose_model).eval()
    if input_size:
        source, size = "--input-size", input_size
    elif meta.get("input_size"):
        source, size = f"{checkpoint}: meta input_size", meta["input_size"]
    else:
        source, size = "[data] input_size", config_input_size
    width, height = (int(v) for v in size)

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=generator)
    check_input = torch.randn(CHECK_BATCH, 3, height, width, generator=generator)
    try:
        check_input_size(example)
    except OdkdError as e:
        raise OdkdError(f"{source}: {e}") from None
    # drawn on the CPU, so a device gets the very same batches
    example, check_input = example.to(device), check_input.to(device)
    with torch.inference_mode(), cuda_tf32(False):
        reference = net(check_input).cpu()

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    try:
        write_and_run = _export_onnx if fmt == "onnx" else _export_torchscript
        exported = write_and_run(net, example, partial, check_input)
        if exported.shape != reference.shape:
            raise OdkdError(f"{out}: the exported model gives heatmaps of shape {tuple(exported.shape)}, "
                            f"PyTorch {tuple(reference.shape)}; not written")
        diff = float((exported - reference).abs().max())
        scale = float(reference.abs().max())
        if diff > RELATIVE_TOLERANCE * scale:
            raise OdkdError(f"{out}: the exported model differs from PyTorch by {diff:.3g} "
                            f"(largest |heatmap| {scale:.3g}, tolerance {RELATIVE_TOLERANCE:g} of it); not written")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportReport(str(out), fmt, (width, height), diff, scale, dropped, str(device))
