"""Parameter and FLOP counts of the registered models, the way pose papers and mmpose report them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from odkd.config import key_origin
from odkd.errors import OdkdError
from odkd.models.registry import EXTERNAL_KINDS, MODELS, build_model


def model_complexity(model: nn.Module, input_size: tuple[int, int] = (192, 256)) -> tuple[int, float]:
    """(parameters, GFLOPs) for one image of input_size (width, height) on the model's device.

    GFLOPs are those of the HRNet paper and code (get_model_summary): multiply-accumulates of
    convolutions and matmuls, counted once and divided by 2**30, so HRNet-W32 at 256x192 is 7.1 and
    W48 is 14.6. FlopCounterMode counts two FLOPs per MAC, hence the halving.
    """
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    width, height = input_size
    x = torch.zeros(1, 3, height, width, device=first.device, dtype=first.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return params, counter.get_total_flops() / 2 / 2**30


def _meta_complexity(name: str, input_size, seg_head: bool = False, **model_args) -> tuple[int, float]:
    """model_complexity of a model built on the meta device: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(name, seg_head=seg_head, **model_args)
    return model_complexity(model, input_size)


def list_models(input_size: tuple[int, int] = (192, 256)) -> list[dict]:
    """One row per registered model, as registered: name, params, gflops."""
    rows = []
    for name in MODELS:
        params, gflops = _meta_complexity(name, input_size)
        rows.append({"name": name, "params": params, "gflops": gflops})
    return rows


def configured_models(cfg) -> list[dict]:
    """One row per model a pipeline configures (the two teachers and the student), built as configured
    (model_args, seg head): role, name, model_args, params, gflops at [data] input_size. An ONNX or
    TorchScript teacher's params and gflops are None: its file fixes them."""
    rows = []
    for role, mcfg in (("primary", cfg.teachers.primary), ("senior", cfg.teachers.senior), ("student", cfg.student)):
        key = "student" if role == "student" else f"teachers.{role}"
        try:
            params, gflops = (None, None) if mcfg.model in EXTERNAL_KINDS else _meta_complexity(
                mcfg.model, cfg.data.input_size, mcfg.seg_head, **mcfg.model_args)
        except (OdkdError, RuntimeError) as exc:  # a value the model cannot take (a negative width, say)
            where = key_origin(cfg.source, cfg.overrides, f"{key}.model_args", f"{key}.model")
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OdkdError(f"{where}: {key}.model_args: {message}") from None
        rows.append({"role": role, "name": mcfg.model, "model_args": dict(mcfg.model_args), "params": params,
                     "gflops": gflops})
    return rows
