"""What every pose model returns, and the heads shared by the model families."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from odkd.errors import OdkdError

# The official HRNet and SimpleBaseline code use this BatchNorm momentum everywhere.
BN_MOMENTUM = 0.1


class PoseOutput(NamedTuple):
    """Heatmaps (N, K, H/4, W/4) and, for models with a seg head, mask logits (N, 1, H/4, W/4)."""

    heatmaps: Tensor
    mask_logits: Tensor | None


def check_input_size(x: Tensor, multiple: int = 32) -> None:
    """Both families reach stride 32 and come back to stride 4 exactly only on multiples of 32."""
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise OdkdError(f"input size {width}x{height} (WxH): width and height must be multiples of {multiple}")


def make_seg_head(in_channels: int) -> nn.Sequential:
    """Person-mask head: conv3x3-BN-ReLU-conv1x1 to one logit channel, at the input's resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(in_channels, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, 1, kernel_size=1),
    )


def add_pose_heads(model: nn.Module, channels: int, num_joints: int, seg_head: bool) -> None:
    """The heads every pose model ends with, under the names its checkpoints use: `final_layer` (1x1 conv
    to the heatmaps) and, with `seg_head`, the person-mask head `seg_head`."""
    model.num_joints, model.has_seg_head = num_joints, seg_head
    model.final_layer = nn.Conv2d(channels, num_joints, kernel_size=1)
    if seg_head:
        model.seg_head = make_seg_head(channels)


def pose_output(model: nn.Module, features: Tensor) -> PoseOutput:
    """The model's heads on its stride-4 features: heatmaps, and mask logits when it has a seg head."""
    mask_logits = model.seg_head(features) if model.has_seg_head else None
    return PoseOutput(model.final_layer(features), mask_logits)


def make_deconv_layers(in_channels: int, channels: int, num_layers: int = 3) -> nn.Sequential:
    """SimpleBaseline upsampling: num_layers x (deconv 4x4 stride 2, BN, ReLU), each doubling H and W."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [
            nn.ConvTranspose2d(in_channels, channels, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        ]
        in_channels = channels
    return nn.Sequential(*layers)


def init_pose_weights(module: nn.Module) -> None:
    """The official HRNet/SimpleBaseline init: convs and deconvs N(0, 0.001), biases 0, BN 1/0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
