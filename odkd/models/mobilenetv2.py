"""MobileNetV2 backbone (stride 32) with a SimpleBaseline deconv head (stride 4): a light student.

Overrides (the ``model_args`` of a pipeline, keyword arguments of ``build_model``):

``width_mult``       channel multiplier of the backbone (1.0 is the paper's network)
``last_channels``    channels of the backbone's final 1x1 conv (paper: 1280)
``deconv_channels``  channels of each of the three 4x4 stride-2 deconvs (SimpleBaseline: 256)
"""

from __future__ import annotations

from torch import Tensor, nn

from odkd.models.heads import (
    BN_MOMENTUM,
    PoseOutput,
    add_pose_heads,
    check_input_size,
    init_pose_weights,
    make_deconv_layers,
    pose_output,
)

# (expansion t, channels c, repeats n, first stride s) of the MobileNetV2 paper, Table 2
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of divisor that loses at most 10% of the channels, as the reference models do."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


class MobileNetV2(nn.Module):
    """The MobileNetV2 feature extractor: stride 32, ``last_channels`` output channels."""

    def __init__(self, width_mult: float = 1.0, last_channels: int = 1280):
        super().__init__()
        in_channels = _round_channels(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn_relu6(3, in_channels, 3, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            out_channels = _round_channels(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        layers.append(_conv_bn_relu6(in_channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.out_channels = last_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class PoseMobileNetV2(nn.Module):
    """MobileNetV2 + three deconvs + 1x1 heatmap conv (SimpleBaseline), optional person-mask head."""

    def __init__(
        self,
        num_joints: int = 17,
        seg_head: bool = False,
        *,
        width_mult: float = 1.0,
        last_channels: int = 1280,
        deconv_channels: int = 256,
    ):
        super().__init__()
        self.backbone = MobileNetV2(width_mult, last_channels)
        self.deconv_layers = make_deconv_layers(self.backbone.out_channels, deconv_channels)
        add_pose_heads(self, deconv_channels, num_joints, seg_head)
        self._init_weights()

    def _init_weights(self) -> None:
        init_pose_weights(self)
        # No ImageNet weights are fetched, so the backbone convs start from He init instead.
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> PoseOutput:
        check_input_size(x)
        return pose_output(self, self.deconv_layers(self.backbone(x)))
