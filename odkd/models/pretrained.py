"""ImageNet classification checkpoints as backbone inits: torchvision's MobileNetV2 and timm's HRNet.

Users download the files themselves; read_checkpoint recognises them by their keys, and each format
here maps a file's backbone keys to odkd's names and drops its classification-only keys. The pose
head (and seg head) of the model then stays as initialised.

torchvision-imagenet  ``mobilenet_v2-b0353104.pth`` / ``mobilenet_v2-7ebf99e0.pth``:
                      ``features.*`` is odkd's ``backbone.features.*`` (same module tree);
                      ``classifier.*`` is dropped. Fits ``mobilenetv2`` (width_mult 1.0).
timm-imagenet         timm's ``hrnet_w*`` files (``pytorch_model.bin``, or the older
                      ``hrnetv2_w*-*.pth``) and HRNet-Image-Classification's own, which timm's keep the
                      names of, as does the official pose code: stem, ``layer1``, ``transition*``,
                      ``stage*`` load as they are. Dropped: ``incre_modules``, ``downsamp_modules``, ``final_layer``
                      (the classification one), ``classifier``, and the fuse layers to branches 1-3
                      of the last stage4 module, which only the classification head reads.
                      hrnet_w18/w32/w48 fit the odkd models of those names; w30/w40/w44/w64 fit
                      ``hrnet_w32`` with ``width`` 30/40/44/64; hrnet_w18_small_v2 fits ``hrnet_w18``
                      with num_modules [1, 3, 2], num_blocks 2, layer1_blocks 2; hrnet_w18_small
                      (width 16) fits ``hrnet_w16`` with num_modules [1, 1, 1], num_blocks 2,
                      layer1_blocks 1, layer1_planes 32. No file fits ``hrnet_tiny`` or the
                      default ``hrnet_w16``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The heads of odkd's pose models; an ImageNet file never holds them.
POSE_HEAD_PREFIXES = ("deconv_layers.", "final_layer.", "seg_head.")

_TIMM_HRNET_CLASSIFIER = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_STAGE4_MODULE = re.compile(r"stage4\.(\d+)\.")


@dataclass(frozen=True)
class ImagenetBackbone:
    """An ImageNet file's backbone under odkd's key names, and the file keys left out of it."""

    state_dict: dict[str, torch.Tensor]
    dropped_keys: list[str]


def _torchvision_mobilenetv2(state_dict: dict) -> ImagenetBackbone | None:
    if "features.0.0.weight" not in state_dict or "classifier.1.weight" not in state_dict:
        return None
    # keys outside features/classifier pass through unmapped, so loading names them as unexpected
    backbone = {
        f"backbone.{k}" if k.startswith("features.") else k: v
        for k, v in state_dict.items()
        if not k.startswith("classifier.")
    }
    return ImagenetBackbone(backbone, [k for k in state_dict if k.startswith("classifier.")])


def _timm_hrnet(state_dict: dict) -> ImagenetBackbone | None:
    if "conv1.weight" not in state_dict or not any(k.startswith("incre_modules.") for k in state_dict):
        return None
    modules = [int(m.group(1)) for k in state_dict if (m := _STAGE4_MODULE.match(k))]
    # The pose net's last module fuses into the highest-resolution branch only (multi_scale_output=False).
    multi_scale_fuse = f"stage4.{max(modules, default=-1)}.fuse_layers."

    def classification_only(key: str) -> bool:
        return key.startswith(_TIMM_HRNET_CLASSIFIER) or (
            key.startswith(multi_scale_fuse) and not key.startswith(f"{multi_scale_fuse}0.")
        )

    return ImagenetBackbone(
        {k: v for k, v in state_dict.items() if not classification_only(k)},
        [k for k in state_dict if classification_only(k)],
    )


# format name -> its reader: the backbone under odkd names, or None when the file has another layout
IMAGENET_FORMATS: dict[str, Callable[[dict], ImagenetBackbone | None]] = {
    "torchvision-imagenet": _torchvision_mobilenetv2,
    "timm-imagenet": _timm_hrnet,
}


def read_imagenet(state_dict: dict) -> tuple[str, ImagenetBackbone] | None:
    """The ImageNet format of a flat state_dict and its backbone, or None for any other file."""
    for name, read in IMAGENET_FORMATS.items():
        backbone = read(state_dict)
        if backbone is not None:
            return name, backbone
    return None
