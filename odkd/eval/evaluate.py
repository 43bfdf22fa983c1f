"""Model evaluation the official HRNet way: crops from GT or detected boxes, flip test, decoding,
rescoring, OKS-NMS, COCOeval (PCK, AUC and EPE as mmpose's, for a set without OKS sigmas); plus mean mask
IoU for a model with a segmentation head."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odkd.config import resolve_device
from odkd.data.dataset import TopDownDataset, frame_from_batch, make_loader
from odkd.data.decode import decode_heatmaps
from odkd.data.instances import DetectedPersons, PersonInstances, load_instances
from odkd.data.keypoints import FLIP_INDEX, keypoint_set, oks_sigmas
from odkd.data.transforms import PIXEL_STD
from odkd.errors import OdkdError
from odkd.eval import metrics
from odkd.models.inference import predict_batch


@dataclass
class EvalReport:
    stats: dict[str, float]  # COCO's ten (STATS_NAMES), or PCK, AUC and EPE for a set without OKS sigmas
    mask_iou: float | None
    results: list[dict]
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # a set with parts: each part's stats
    crowd: dict[str, dict[str, float]] = field(default_factory=dict)  # images with a crowdIndex: easy, medium, hard

    def record(self) -> dict[str, float]:
        """The stats as a training log records them, plus mask_iou for a seg-head model."""
        return self.stats if self.mask_iou is None else {**self.stats, "mask_iou": self.mask_iou}


def mask_iou(pred_prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of mask probabilities and soft targets, both thresholded at 0.5; (N,)."""
    p, t = pred_prob >= 0.5, target >= 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@torch.inference_mode()
def predict_instances(model, loader, *, device, flip_test: bool = True, shift_heatmap: bool = True,
                      decode: str = "argmax", sigma: float = 2.0, desc: str = "eval", flip_index=FLIP_INDEX):
    """Keypoints (N, K, 3) [x, y, maxval] in image coordinates for every crop the loader yields, and the
    per-crop mask IoU against the dataset's mask targets when the model has a seg head and the dataset
    has masks (else None). `decode` and `sigma` (the targets', in heatmap pixels) pick the decoder."""
    model.eval()
    keypoints, ious = [], []
    # no bar off a terminal (disable=None): in a log file its wiping '\r', with no newline, left the next line,
    # the AP table's header, on the bar's line
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images = batch["image"].to(device, non_blocking=True)
        heatmaps, mask = predict_batch(model, images, flip_test=flip_test, shift_heatmap=shift_heatmap,
                                       flip_index=flip_index)
        frames = [frame_from_batch(batch, i) for i in range(len(images))]
        preds, maxvals = decode_heatmaps(heatmaps.cpu().numpy(), frames, decode, sigma, flip_index)
        keypoints.append(np.concatenate([preds, maxvals], axis=2))
        if mask is not None and "mask" in batch:
            ious.append(mask_iou(mask.cpu(), batch["mask"]))
    mask_ious = torch.cat(ious).numpy() if ious else None
    return np.concatenate(keypoints), mask_ious


class ModelEvaluator:
    """COCO keypoint AP on a fixed set of instances (PersonInstances or DetectedPersons), or PCK, AUC and
    EPE for a set without OKS sigmas (PersonInstances only), with one loader whose workers live across
    calls: a training run evaluates every few epochs without starting workers again."""

    def __init__(self, instances, data_cfg, eval_cfg, gt_coco, *, device, with_mask: bool, workers: int = 0):
        self.instances, self.eval_cfg, self.gt_coco, self.device = instances, eval_cfg, gt_coco, device
        self.sigma = data_cfg.sigma
        self.keypoints = keypoint_set(data_cfg.keypoints)
        self.oks_sigmas = oks_sigmas(self.keypoints)
        if self.oks_sigmas is None and not isinstance(instances, PersonInstances):
            raise OdkdError(f"data.keypoints: the set {self.keypoints.name!r} has no OKS sigmas, so it is scored by "
                            f"PCK, AUC and EPE of one prediction per labelled instance: evaluate it on GT boxes "
                            f"(no --boxes, no --split unlabeled)")
        with_mask = with_mask and isinstance(instances, PersonInstances)  # a detected box has no mask
        dataset = TopDownDataset(instances, data_cfg, train=False, with_mask=with_mask)
        self.loader = make_loader(dataset, eval_cfg.batch_size, workers)

    def __call__(self, model, flip_test: bool | None = None) -> EvalReport:
        cfg = self.eval_cfg
        flip = (cfg.flip_test if flip_test is None else flip_test) and self.keypoints.mirrored
        kpts, ious = predict_instances(model, self.loader, device=self.device, flip_test=flip,
                                       shift_heatmap=cfg.shift_heatmap, decode=cfg.decode, sigma=self.sigma,
                                       flip_index=self.keypoints.flip_index)
        insts = self.instances.instances
        box_scores = np.array([i.score for i in insts])
        raw = metrics.keypoint_results([i.image_id for i in insts], kpts, box_scores,
                                       [i.category_id for i in insts])
        mean_iou = None if ious is None else float(ious.mean())
        if self.oks_sigmas is None:  # each labelled instance against its own prediction, as mmpose pairs them
            points, visible, sizes = metrics.gt_points(self.gt_coco, [self.gt_coco.anns[i.ann_id] for i in insts])
            return EvalReport(stats=metrics.pck_stats(kpts, points, visible, sizes), mask_iou=mean_iou, results=raw)
        areas = np.array([float(np.prod(i.scale)) * PIXEL_STD ** 2 for i in insts])
        results = metrics.nms_per_image(raw, areas, thresh=cfg.oks_nms_thr, in_vis_thr=cfg.in_vis_thr,
                                        sigmas=self.oks_sigmas)
        stats = metrics.coco_keypoint_eval(self.gt_coco, results, sigmas=self.oks_sigmas)
        parts = (metrics.part_keypoint_eval(self.gt_coco, results, self.oks_sigmas, self.keypoints.parts)
                 if self.keypoints.parts else {})
        return EvalReport(stats=stats, mask_iou=mean_iou, results=results,
                          parts=parts, crowd=metrics.crowd_keypoint_eval(self.gt_coco, results, self.oks_sigmas))


def evaluate_model(model, instances, data_cfg, eval_cfg, gt_coco, *, device, flip_test: bool | None = None,
                   workers: int = 0) -> EvalReport:
    """COCO keypoint AP (or PCK, AUC and EPE) of `model` on `instances` (PersonInstances or DetectedPersons)."""
    with_mask = bool(getattr(model, "has_seg_head", False))
    evaluator = ModelEvaluator(instances, data_cfg, eval_cfg, gt_coco, device=device, with_mask=with_mask,
                               workers=workers)
    return evaluator(model, flip_test)


def evaluate_checkpoint(cfg, checkpoint: str, *, split: str = "val", boxes: str = "gt",
                        flip_test: bool | None = None, results_out: str | None = None,
                        device: str | None = None, model: str | None = None, ann: str | None = None) -> EvalReport:
    """`odkd evaluate --checkpoint`: rebuild the model from its file (or as `model`, for official and
    mmpose files) and evaluate it on `split`. Split "unlabeled" runs it on the boxes of [data.unlabeled],
    the crops a pseudo-label store holds, and scores it against `ann`, those images' true annotations."""
    from odkd.models import build_from_checkpoint, check_keypoint_count

    if split == "unlabeled" and (not ann or boxes != "gt"):
        raise OdkdError("--split unlabeled scores the crops of [data.unlabeled] boxes against --ann TRUE.json, "
                        "those images' labels; give --ann and no --boxes")
    dev = resolve_device(device or cfg.device)
    kset = keypoint_set(cfg.data.keypoints)
    net, meta = build_from_checkpoint(checkpoint, dev, model=model)
    check_keypoint_count(checkpoint, meta["num_joints"], kset)
    aspect = cfg.data.input_size[0] / cfg.data.input_size[1]
    if split == "unlabeled":
        gt = PersonInstances(ann, cfg.data.image_dir(split), aspect, strict=cfg.data.strict,
                             keypoints=kset, categories=cfg.data.categories)
        instances = load_instances(cfg.data, split)
    else:
        gt = load_instances(cfg.data, split)
        instances = gt if boxes == "gt" else DetectedPersons(
            boxes, gt.coco, cfg.data.image_dir(split), aspect, cfg.eval.det_score_thr, strict=cfg.data.strict,
            num_keypoints=kset.num_keypoints, categories=gt.category_ids)
    report = evaluate_model(net, instances, cfg.data, cfg.eval, gt.coco, device=dev, flip_test=flip_test)
    if results_out:
        Path(results_out).parent.mkdir(parents=True, exist_ok=True)
        Path(results_out).write_text(json.dumps(report.results))
    return report
