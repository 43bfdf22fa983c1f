"""Teachers from other frameworks: an ONNX or TorchScript file, called the way odkd's own models are.

The contract such a file keeps:

- Input: one float tensor (N, 3, H, W), a batch of crops normalized as the teacher's config states
  (`input_mean`, `input_std` in RGB order and 0..1 units, channels fed in `input_order`). odkd's
  crops are ImageNet-normalized RGB; they are re-normalized when the file expects otherwise.
- Outputs, told apart by their order: the first is the heatmaps (N, K, h, w); for a teacher with a
  mask (`seg_head = true`) the second is the person mask (N, 1, h, w), as logits or probabilities
  (`mask_output`). Further outputs are ignored.

`ExternalTeacher` returns a PoseOutput with mask logits, like odkd's models, so predict_batch's
flip test, the cache and `cache verify` run it unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from odkd.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from odkd.errors import OdkdError
from odkd.models.heads import PoseOutput
from odkd.models.registry import EXTERNAL_KINDS

# the logit of a clamped probability stays finite where a file's mask saturates at exactly 0 or 1
PROBABILITY_EPS = 1e-6


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, in hex, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputNormalization:
    """What a file expects: (rgb - mean) / std per channel, RGB order and 0..1 units, fed as `order`."""

    mean: tuple[float, float, float] = tuple(IMAGENET_MEAN_RGB.tolist())
    std: tuple[float, float, float] = tuple(IMAGENET_STD_RGB.tolist())
    order: str = "rgb"  # "rgb" | "bgr"

    def is_odkds(self) -> bool:
        return (self.order == "rgb" and np.array_equal(np.float32(self.mean), IMAGENET_MEAN_RGB)
                and np.array_equal(np.float32(self.std), IMAGENET_STD_RGB))

    def apply(self, crops: Tensor) -> Tensor:
        """odkd's ImageNet-normalized RGB crops -> this normalization."""
        if self.is_odkds():  # untouched, so the file sees the very bits a PyTorch teacher sees
            return crops
        std = np.float32(self.std)
        # rgb = crops * S + M, so (rgb - mean) / std = crops * S / std + (M - mean) / std
        scale = torch.from_numpy(IMAGENET_STD_RGB / std).to(crops.device).view(1, 3, 1, 1)
        shift = torch.from_numpy((IMAGENET_MEAN_RGB - np.float32(self.mean)) / std).to(crops.device).view(1, 3, 1, 1)
        out = crops * scale + shift
        return out.flip(1) if self.order == "bgr" else out


def _onnxruntime(path: str):
    try:
        import onnxruntime
    except ImportError:
        raise OdkdError(f"{path}: ONNX teachers need onnxruntime: pip install odkd[export]") from None
    return onnxruntime


class OnnxModel:
    """An onnxruntime session: the CUDA provider when `device` is cuda and onnxruntime has it, else the CPU."""

    def __init__(self, path: str, device: torch.device):
        ort = _onnxruntime(path)
        options = ort.SessionOptions()
        # torch's thread count here, so an ONNX teacher takes the same share of the cores as a PyTorch one
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # onnxruntime's errors derive from Exception alone
            raise OdkdError(f"{path}: onnxruntime cannot load it: {_first_line(exc)}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OdkdError(f"{path}: an ONNX teacher takes one input (the crop batch), this file takes {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32

    def __call__(self, x: Tensor) -> list[Tensor]:
        feed = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        return [torch.from_numpy(out).to(x.device) for out in self.session.run(None, {self.input_name: feed})]


class TorchScriptModel:
    """A torch.jit file loaded onto `device`."""

    def __init__(self, path: str, device: torch.device):
        self.path = path
        try:
            self.module = torch.jit.load(path, map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise OdkdError(f"{path}: torch.jit.load cannot load it: {_first_line(exc)}") from None

    def __call__(self, x: Tensor) -> list[Tensor]:
        out = self.module(x)
        if isinstance(out, Tensor):
            return [out]
        if isinstance(out, (tuple, list)):
            return list(out)
        raise OdkdError(f"{self.path}: returns a {type(out).__name__}; a teacher returns a tensor or a tuple "
                        f"of tensors")


@dataclass
class ExternalTeacher:
    """A loaded file behind odkd's model interface: odkd's crops in, PoseOutput (mask as logits) out."""

    run: Callable[[Tensor], list[Tensor]]
    path: str
    normalization: InputNormalization
    mask_output: str | None  # None: no mask wanted; "logits" | "probabilities": what the second output holds

    def __call__(self, crops: Tensor) -> PoseOutput:
        try:
            outputs = self.run(self.normalization.apply(crops))
        except OdkdError:
            raise
        except Exception as exc:  # the foreign runtime's own error, as one line naming the file
            raise OdkdError(f"{self.path}: cannot run a batch of shape {tuple(crops.shape)}: "
                            f"{_first_line(exc)}") from None
        if len(outputs) < (1 if self.mask_output is None else 2):
            raise OdkdError(f"{self.path}: gives {len(outputs)} output; a teacher with a mask gives the heatmaps "
                            f"first and the mask second")
        if self.mask_output is None:
            return PoseOutput(outputs[0], None)
        mask = outputs[1]
        if self.mask_output == "probabilities":  # predict_batch takes logits and averages the flip in sigmoid space
            mask = torch.logit(mask.float(), eps=PROBABILITY_EPS)
        return PoseOutput(outputs[0], mask)


def load_external_teacher(kind: str, path: str, device: str | torch.device = "cpu", *,
                          input_mean=InputNormalization.mean, input_std=InputNormalization.std,
                          input_order: str = "rgb", mask_output: str | None = None) -> ExternalTeacher:
    """An ONNX (`kind="onnx"`) or TorchScript (`"torchscript"`) file on `device`, called like odkd's models.

    `mask_output` is None for a teacher without a mask, else "logits" or "probabilities": what the
    file's second output holds.
    """
    backends = {"onnx": OnnxModel, "torchscript": TorchScriptModel}
    if kind not in backends:
        raise OdkdError(f"{path}: unknown external teacher kind {kind!r}; known: {', '.join(EXTERNAL_KINDS)}")
    if mask_output not in (None, "logits", "probabilities"):
        raise OdkdError(f"{path}: mask_output must be logits or probabilities, got {mask_output!r}")
    normalization = InputNormalization(tuple(input_mean), tuple(input_std), input_order)
    return ExternalTeacher(backends[kind](str(path), torch.device(device)), str(path), normalization, mask_output)
