"""HRNet for top-down pose, with the module tree and attribute names of the official code.

The layout follows leoxiaobin/deep-high-resolution-net.pytorch (lib/models/pose_hrnet.py):
stem ``conv1, bn1, conv2, bn2``, ``layer1`` (Bottlenecks), ``transition1..3``, ``stage2..4``
(HighResolutionModules with ``branches`` and ``fuse_layers``), and ``final_layer`` (1x1 conv) on the
highest-resolution branch. Official ``pose_hrnet_w32/w48_*.pth`` state_dicts therefore load with
strict key and shape matching. The optional ``seg_head`` adds only ``seg_head.*`` keys.

Overrides (the ``model_args`` of a pipeline, keyword arguments of ``build_model``):

``width``          channels C of the highest-resolution branch; branches have C, 2C, 4C, 8C (32, 48, ...)
``num_modules``    HighResolutionModules in stage2, stage3, stage4 (official: [1, 4, 3])
``num_blocks``     BasicBlocks per branch in every module (official: 4)
``layer1_blocks``  Bottlenecks in layer1 (official: 4)
``layer1_planes``  Bottleneck planes in layer1; it outputs 4x this many channels (official: 64)
``stem_channels``  channels of the two stride-2 stem convs (official: 64)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from odkd.models.heads import (
    BN_MOMENTUM, PoseOutput, add_pose_heads, check_input_size, init_pose_weights, pose_output,
)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, relu: bool) -> nn.Sequential:
    """conv-BN(-ReLU) as a Sequential, so the parameters are named ``0.weight``, ``1.weight``, ..."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def _fuse_path(channels: list[int], src: int, dst: int) -> nn.Module | None:
    """The path that brings branch ``src`` to the resolution and width of branch ``dst``."""
    if src == dst:
        return None
    if src > dst:
        return nn.Sequential(
            nn.Conv2d(channels[src], channels[dst], 1, 1, 0, bias=False),
            nn.BatchNorm2d(channels[dst]),
            nn.Upsample(scale_factor=2 ** (src - dst), mode="nearest"),
        )
    steps = dst - src
    return nn.Sequential(
        *(
            _conv_bn(channels[src], channels[dst] if k == steps - 1 else channels[src], 3, 2, relu=k < steps - 1)
            for k in range(steps)
        )
    )


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every output branch sums all inputs brought to its scale.

    With ``multi_scale_output=False`` only the highest-resolution output is fused, as in the last
    module of the official stage4.
    """

    def __init__(self, channels: list[int], num_blocks: int, multi_scale_output: bool = True):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c) for _ in range(num_blocks))) for c in channels
        )
        num_outputs = len(channels) if multi_scale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_path(channels, j, i) for j in range(len(channels))) for i in range(num_outputs)
        )
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        fused = []
        for i, paths in enumerate(self.fuse_layers):
            y = xs[i]
            for j, path in enumerate(paths):
                if j != i:
                    y = y + path(xs[j])
            fused.append(self.relu(y))
        return fused


def _transition(prev: list[int], cur: list[int]) -> nn.ModuleList:
    """Adapt existing branches whose width changes; grow each new branch from the lowest-resolution one."""
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(prev):
            layers.append(_conv_bn(prev[i], c, 3, 1, relu=True) if prev[i] != c else None)
        else:
            steps = i + 1 - len(prev)
            layers.append(
                nn.Sequential(
                    *(_conv_bn(prev[-1], c if k == steps - 1 else prev[-1], 3, 2, relu=True) for k in range(steps))
                )
            )
    return nn.ModuleList(layers)


class PoseHighResolutionNet(nn.Module):
    """HRNet-W``width`` with a 1x1 heatmap conv at stride 4 and an optional person-mask head."""

    def __init__(
        self,
        num_joints: int = 17,
        seg_head: bool = False,
        *,
        width: int = 32,
        num_modules: Sequence[int] = (1, 4, 3),
        num_blocks: int = 4,
        layer1_blocks: int = 4,
        layer1_planes: int = 64,
        stem_channels: int = 64,
    ):
        super().__init__()
        if len(num_modules) != 3:
            raise ValueError(f"num_modules needs 3 entries (stage2, stage3, stage4), got {list(num_modules)}")

        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        layer1_out = layer1_planes * Bottleneck.expansion
        self.layer1 = nn.Sequential(
            *(Bottleneck(stem_channels if b == 0 else layer1_out, layer1_planes) for b in range(layer1_blocks))
        )

        widths = [width * 2**i for i in range(4)]
        self.transition1 = _transition([layer1_out], widths[:2])
        self.stage2 = self._make_stage(widths[:2], num_modules[0], num_blocks, last_multi_scale=True)
        self.transition2 = _transition(widths[:2], widths[:3])
        self.stage3 = self._make_stage(widths[:3], num_modules[1], num_blocks, last_multi_scale=True)
        self.transition3 = _transition(widths[:3], widths)
        self.stage4 = self._make_stage(widths, num_modules[2], num_blocks, last_multi_scale=False)

        add_pose_heads(self, width, num_joints, seg_head)
        init_pose_weights(self)

    @staticmethod
    def _make_stage(channels: list[int], num_modules: int, num_blocks: int, last_multi_scale: bool) -> nn.Sequential:
        return nn.Sequential(
            *(
                HighResolutionModule(channels, num_blocks, multi_scale_output=last_multi_scale or m < num_modules - 1)
                for m in range(num_modules)
            )
        )

    @staticmethod
    def _enter(transition: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
        """Inputs of the next stage: kept or adapted branches, plus new ones grown from the last branch."""
        xs = []
        for i, layer in enumerate(transition):
            if i < len(ys):
                xs.append(ys[i] if layer is None else layer(ys[i]))
            else:
                xs.append(layer(ys[-1]))
        return xs

    def forward(self, x: Tensor) -> PoseOutput:
        check_input_size(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._enter(self.transition1, [x]))
        ys = self.stage3(self._enter(self.transition2, ys))
        ys = self.stage4(self._enter(self.transition3, ys))
        return pose_output(self, ys[0])
