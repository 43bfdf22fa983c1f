"""Where each target form puts a joint: the teachers' stored maps, made into each form's target in
augmented crops as the student trainer makes them, decoded, against the exact labelled joint.

    .venv/bin/python bench/targets.py [--config pipeline/demo.toml] [--store cache/demo.zarr] [--epochs 4]

Samples are TopDownDataset(train=True) draws of the labelled train split, (epoch, index) for --epochs epochs,
the augmentation of [data.augment]. Per teacher and form: the target maps of the batch
(odkd.distill.targets, the objective's own functions), decoded with [eval] decode, against the labelled
joint, in stored-map pixels (crop pixels times the sample's zoom), over the joints the stage would teach (stored peak >= --conf-floor, joint inside
the crop). "unwarped" is the same form on the crops the store was made on (no augmentation): what the teacher
and the form get wrong without a warp, so the gap to it is what the warp adds. A soft row
appears when the store holds the raw maps ([cache] store_soft).
"""

from __future__ import annotations

import argparse

import numpy as np
from torch.utils.data import default_collate

from odkd.config import load_config
from odkd.data.dataset import TopDownDataset
from odkd.data.decode import heatmap_coords
from odkd.data.instances import load_instances
from odkd.distill.objective import teacher_blob_radius
from odkd.distill.targets import TARGET_FORMS, WarpInputs
from odkd.distill.warp import flip_keypoint_values
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets


def joint_errors(batch: dict, key: str, form: str, cfg, store, conf_floor: float) -> np.ndarray:
    """Distances in stored-map pixels between the decoded targets of `form` and the labelled joints the stage would teach."""
    warp = WarpInputs(theta=batch["teacher_theta"], zoom=batch["teacher_zoom"], flip=batch["flip"],
                      out_size=tuple(cfg.data.heatmap_size), stored_width=store.layout.map_size[0],
                      blob_radius=teacher_blob_radius(store.attrs.get("settings", {})), keep_blob_size=True,
                      sigma=float(cfg.data.sigma))
    conf = flip_keypoint_values(batch[f"{key}/conf"].float(), batch["flip"])
    spec = TARGET_FORMS[form]
    maps = spec.make(batch[f"{key}/{spec.array}"], conf, warp).numpy()
    coords, _ = heatmap_coords(maps, method=cfg.eval.decode, sigma=float(cfg.data.sigma))
    stride = np.array(cfg.data.input_size, np.float32) / np.array(cfg.data.heatmap_size, np.float32)
    truth = batch["joints"][..., :2].numpy() / stride
    w, h = cfg.data.heatmap_size
    inside = (truth[..., 0] >= 0) & (truth[..., 0] <= w - 1) & (truth[..., 1] >= 0) & (truth[..., 1] <= h - 1)
    keep = (batch["joints"][..., 2].numpy() > 0) & (conf.numpy() >= conf_floor) & inside & (maps.max((-2, -1)) > 0)
    # in stored-map pixels (the teacher's own), so a zoomed-in crop does not magnify the same error
    return (np.hypot(*(coords - truth).transpose(2, 0, 1)) * batch["teacher_zoom"].numpy()[:, None])[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--store", default=None, help="default: [student] cache")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--conf-floor", type=float, default=0.7)
    args = parser.parse_args()
    cfg = load_config(args.config)
    instances = load_instances(cfg.data, "train")
    store = TeacherTargets.open(args.store or cfg.student.cache, dataset_fingerprint=instances.fingerprint)
    forms = [f for f in TARGET_FORMS if f"pt/{TARGET_FORMS[f].array}" in store.names]
    arrays = sorted({"meta/center", "meta/scale"} | {f"{k}/conf" for k in ("pt", "st")}
                    | {f"{k}/{TARGET_FORMS[f].array}" for k in ("pt", "st") for f in forms})
    rows = LocalRows.fetch(store, arrays)
    data = TopDownDataset(instances, cfg.data, train=True, seed=0, stored_rows=rows)
    plain = TopDownDataset(instances, cfg.data, train=False, stored_rows=rows)
    errors: dict[tuple[str, str, str], list[np.ndarray]] = {}
    draws = {"augmented": [[data[(epoch, i)] for i in range(len(data))] for epoch in range(args.epochs)],
             "unwarped": [[plain[i] for i in range(len(plain))]]}  # the crop the store was made on
    for crops, batches in draws.items():
        for samples in batches:
            batch = default_collate(samples)
            for key in ("pt", "st"):
                for form in forms:
                    errors.setdefault((key, form, crops), []).append(
                        joint_errors(batch, key, form, cfg, store, args.conf_floor))
    print("| teacher | form | crops | joints | mean px | median px | > 1 px |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (key, form, crops), parts in errors.items():
        e = np.concatenate(parts)
        print(f"| {key.upper()} | {form} | {crops} | {len(e)} | {e.mean():.3f} | {np.median(e):.3f} | {(e > 1).mean():.1%} |")


if __name__ == "__main__":
    main()
