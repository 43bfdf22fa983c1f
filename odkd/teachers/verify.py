"""`odkd cache verify`: every shard complete and sound, the dataset the same, and a sample re-run matching."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set
from odkd.errors import OdkdError
from odkd.models.teacher import resolve_teachers
from odkd.store.info import ran_precision_of
from odkd.store.reader import TeacherTargets
from odkd.store.schema import settings_digest
from odkd.store.store import check_shard, open_group, read_markers, storage_errors, store_fs
from odkd.teachers.producer import InstanceRecords, TeacherProducer

# bits allowed to differ on a re-run: a GPU-built store checked on a CPU flips a few pixels that sit
# right at the threshold, while other teachers or settings differ by far more
BIT_TOLERANCE = 1e-3
CONF_TOLERANCE = 1e-2
REPLAYED_MAPS = ("pt/heatmaps", "st/heatmaps", "st/mask")
REPLAYED_CONF = ("pt/conf", "st/conf")


def differing_bits(a: np.ndarray, b: np.ndarray) -> int:
    """How many bits differ between two arrays of bit-packed maps."""
    return int(np.unpackbits(a ^ b).sum())


@dataclass
class VerifyReport:
    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def good(self, line: str) -> None:
        self.lines.append(f"ok    {line}")

    def bad(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL  {line}")

    def note(self, line: str) -> None:
        self.lines.append(f"skip  {line}")

    def __str__(self) -> str:
        return "\n".join(self.lines + [f"{'verified' if self.ok else 'NOT verified'}"])


def _check_shards(targets: TeacherTargets, report: VerifyReport) -> None:
    layout = targets.layout
    fs, root = store_fs(targets.url, targets.storage_options)
    markers = read_markers(fs, root, layout.num_shards)
    missing = [s for s in range(layout.num_shards) if s not in markers]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        report.bad(f"{len(missing)} of {layout.num_shards} shards never finished ({shown}); "
                   f"run odkd cache-teachers again to resume")
    group = open_group(targets.url, "r", targets.storage_options)
    digest = targets.attrs.get("settings_digest")
    problems = [f"shard {s}: written with other settings" if m.get("settings_digest") != digest
                else check_shard(group, layout, s, m) for s, m in sorted(markers.items())]
    problems = [p for p in problems if p]
    for problem in problems:
        report.bad(problem)
    if markers and not problems:
        report.good(f"{len(markers)} shard{'s' if len(markers) > 1 else ''} decode (crc32c) and match "
                    f"the writers' digests")


def _replay(targets: TeacherTargets, cfg, instances, sample: int, device: str, report: VerifyReport) -> None:
    settings = targets.attrs["settings"]
    try:
        teachers = resolve_teachers(cfg, settings["teacher_input_size"], settings["map_size"])
    except OdkdError as exc:
        # a verify asked to re-run the teachers that cannot is not a verified store: it says what it
        # could not check, and fails, unless the user asked for the shards and the dataset alone
        report.bad(f"teachers not re-run: {exc} (--no-replay checks the shards and the dataset alone)")
        return
    for key, spec in teachers.items():
        stored = settings["teachers"][key]["fingerprint"]
        if spec.fingerprint != stored:
            report.bad(f"teachers.{spec.role}: {spec.checkpoint} has fingerprint {spec.fingerprint}, "
                       f"the store was built with {stored}")
            return
    ok_rows = np.flatnonzero(targets.get_batch(np.arange(len(targets)), ["meta/ok"])["meta/ok"])
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(ok_rows, size=min(sample, len(ok_rows)), replace=False))
    # what the shards ran at, not what the config asked for: a CPU build asked for tf32 ran fp32
    fs, root = store_fs(targets.url, targets.storage_options)
    built = ran_precision_of(read_markers(fs, root, targets.layout.num_shards)) or settings.get("precision", "fp32")
    producer = TeacherProducer(
        layout=targets.layout, teachers=teachers,
        records=InstanceRecords.from_instances(instances, len(targets), settings["heatmap_size"],
                                               settings["map_size"]),
        settings={**settings, "precision": built}, batch_size=max(1, len(chosen)), device=device,
        flip_index=tuple(keypoint_set(cfg.data.keypoints).flip_index.tolist()),
    )
    replay = producer.targets_for(chosen)
    fresh, rerun = replay.arrays, replay.ran["precision"]
    against = f"re-run at {rerun}" + ("" if rerun == built else f" (the store ran {built})")
    stored = targets.get_batch(chosen, REPLAYED_MAPS + REPLAYED_CONF)
    for name in REPLAYED_MAPS:
        differ = differing_bits(fresh[name], stored[name])
        bits = stored[name].size * 8
        line = f"{name}: {differ} of {bits} bits differ on {len(chosen)} instances {against}"
        (report.good if differ <= BIT_TOLERANCE * bits else report.bad)(line)
    for name in REPLAYED_CONF:
        gap = float(np.abs(fresh[name].astype(np.float32) - stored[name].astype(np.float32)).max(initial=0.0))
        (report.good if gap <= CONF_TOLERANCE else report.bad)(f"{name}: re-run differs by at most {gap:.4f}")


def verify_cache(url: str, cfg=None, sample: int = 16, device: str = "cpu",
                 storage_options: dict | None = None, replay: bool = True) -> VerifyReport:
    """Check a store; with a pipeline config, also its dataset fingerprint and (with `replay`) a re-run of
    `sample` instances at the precision the store's shards ran at."""
    report = VerifyReport()
    targets = TeacherTargets.open(url, storage_options=storage_options, require_complete=False)
    settings = targets.attrs.get("settings", {})
    if targets.attrs.get("settings_digest") != settings_digest(settings):
        report.bad("the store's settings do not match their recorded digest (attributes edited?)")
    with storage_errors(targets.url):
        _check_shards(targets, report)
    if cfg is None:
        report.note("dataset and teachers not checked (no --config)")
        return report
    instances = load_instances(cfg.data, settings["split"])
    fingerprint = instances.fingerprint
    if fingerprint != settings.get("dataset_fingerprint"):
        report.bad(f"dataset fingerprint {fingerprint} differs from the store's {settings.get('dataset_fingerprint')}")
        return report
    report.good(f"dataset fingerprint {fingerprint} matches")
    if not replay:
        report.note("teachers not re-run (--no-replay)")
    elif sample > 0 and report.ok:
        _replay(targets, cfg, instances, sample, device, report)
    return report
