"""Model names -> constructors, and build_model, the one way the rest of odkd makes a network."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from odkd.config import key_origin
from odkd.errors import OdkdError
from odkd.models.hrnet import PoseHighResolutionNet
from odkd.models.mobilenetv2 import PoseMobileNetV2

# teachers from other frameworks, a file each (odkd.models.external): no constructor of their own
EXTERNAL_KINDS = ("onnx", "torchscript")

# Every constructor takes (num_joints, seg_head, **overrides); the overrides are the keyword-only
# parameters of the class (see the docstrings of odkd.models.hrnet and odkd.models.mobilenetv2).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "hrnet_w48": partial(PoseHighResolutionNet, width=48),
    "hrnet_w32": partial(PoseHighResolutionNet, width=32),
    "hrnet_w18": partial(PoseHighResolutionNet, width=18),
    "hrnet_w16": partial(PoseHighResolutionNet, width=16),
    "hrnet_tiny": partial(
        PoseHighResolutionNet,
        width=8,
        num_modules=(1, 1, 1),
        num_blocks=1,
        layer1_blocks=1,
        layer1_planes=16,
        stem_channels=16,
    ),
    "mobilenetv2": partial(PoseMobileNetV2),
    "mobilenetv2_tiny": partial(PoseMobileNetV2, width_mult=0.25, last_channels=64, deconv_channels=32),
}


def override_keys(name: str) -> list[str]:
    """The keyword arguments ``build_model(name, ...)`` accepts besides num_joints and seg_head."""
    params = inspect.signature(MODELS[name]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_model(name: str, num_joints: int = 17, seg_head: bool = False, **overrides) -> nn.Module:
    """A freshly initialised model; unknown names, unknown override keys and bad values are OdkdErrors."""
    if name not in MODELS:
        raise OdkdError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    allowed = override_keys(name)
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise OdkdError(f"model {name!r} has no argument {unknown[0]!r}; its model_args are: {', '.join(allowed)}")
    try:
        return MODELS[name](num_joints, seg_head, **overrides)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch refuses a layer (a negative width)
        raise OdkdError(f"model {name!r} with model_args {overrides}: {e}") from None


# the roles whose [section] names a model, and whether a file (onnx, torchscript) may stand in for it
_MODEL_ROLES = (("teachers.primary", True), ("teachers.senior", True), ("teachers.init", True), ("student", False))


def check_configured_models(cfg) -> None:
    """Every model a pipeline names is a registered one (or a file kind, for a teacher), and every model_args
    key one it takes; else one line naming the key and where its value came from (the file or a --set).
    The CLI checks every pipeline it loads with it, before anything runs."""
    origin = partial(key_origin, cfg.source, cfg.overrides)
    for role, files_too in _MODEL_ROLES:
        section = cfg
        for part in role.split("."):
            section = getattr(section, part)
        known = [*MODELS, *(EXTERNAL_KINDS if files_too else ())]
        if section.model not in known:
            raise OdkdError(f"{origin(f'{role}.model')}: {role}.model: unknown model {section.model!r}; known "
                            f"models: {', '.join(known)}")
        if section.model in EXTERNAL_KINDS:
            continue
        allowed = override_keys(section.model)
        for key in section.model_args:
            if key not in allowed:
                raise OdkdError(f"{origin(f'{role}.model_args.{key}', f'{role}.model')}: {role}.model_args.{key}: "
                                f"model {section.model!r} has no argument {key!r}; its model_args are: "
                                f"{', '.join(allowed)}")
