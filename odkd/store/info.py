"""`odkd cache info`: what a store holds, what it costs, where it came from, how far its build is."""

from __future__ import annotations

from collections import Counter

import numpy as np

from odkd.store.reader import MAP_ARRAYS
from odkd.store.schema import StoreLayout
from odkd.store.store import read_attrs, read_markers, storage_errors, store_fs, store_identity

SHOWN_FAILURES = 10


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _sizes(v) -> str:
    return "x".join(str(s) for s in v)


def ran_precision_of(markers: dict) -> str | None:
    """The one precision every written shard ran at, or None when they differ or one did not record it."""
    ran = {m.get("ran", {}).get("precision") for m in markers.values()}
    return ran.pop() if len(ran) == 1 else None


def precision_line(requested: str, markers: dict) -> str:
    """The precision a store asked for and what its written shards ran at, e.g.
    'tf32 requested; ran fp32 on cpu (16 shards)': a CPU runs tf32 as fp32."""
    ran = Counter((m.get("ran", {}).get("precision"), m.get("ran", {}).get("device")) for m in markers.values())
    parts = [(f"ran {precision} on {device}" if precision else "not recorded (built before odkd recorded it)")
             + f" ({count} shard{'s' if count > 1 else ''})" for (precision, device), count in ran.most_common()]
    return f"{requested} requested; " + (", ".join(parts) if parts else "no shard written yet")


def store_precision_line(url: str, storage_options: dict | None = None) -> str:
    """precision_line of the store at `url`."""
    with storage_errors(url):
        attrs = read_attrs(url, storage_options)
        fs, root = store_fs(url, storage_options)
        markers = read_markers(fs, root, StoreLayout.from_dict(attrs["layout"]).num_shards)
    return precision_line(attrs.get("settings", {}).get("precision", "fp32"), markers)


def cache_info(url: str, storage_options: dict | None = None) -> str:
    """The report `odkd cache info STORE` prints."""
    url = str(url).rstrip("/")
    with storage_errors(url):
        attrs = read_attrs(url, storage_options)
        fs, root = store_fs(url, storage_options)
        markers = read_markers(fs, root, StoreLayout.from_dict(attrs["layout"]).num_shards)
    layout = StoreLayout.from_dict(attrs["layout"])
    settings = attrs.get("settings", {})
    done = sum(m["stop"] - m["start"] for m in markers.values())
    failed = sorted((f for m in markers.values() for f in m.get("failed", [])), key=lambda f: f["index"])
    specs = layout.arrays()
    stored = {name: sum(m.get("bytes", {}).get(name, 0) for m in markers.values()) for name in specs}
    w, h = layout.map_size

    lines = [
        f"store        {url}",
        f"schema       v{attrs['schema_version']}, written by odkd {attrs.get('odkd_version', '?')} "
        f"at {attrs.get('created_at', '?')}",
        f"dataset      split {settings.get('split', '?')}, fingerprint {settings.get('dataset_fingerprint', '?')}",
        "identity     content {content_digest}, settings {settings_digest} (what a student's checkpoint "
        "records)".format(**store_identity(url, attrs, markers)),
        f"instances    {layout.num_instances} ({done - len(failed)} with targets, {len(failed)} failed"
        + (f", {layout.num_instances - done} not built yet)" if done < layout.num_instances else ")"),
        f"build        {len(markers)}/{layout.num_shards} shards, {done}/{layout.num_instances} instances "
        f"({100.0 * done / layout.num_instances:.1f}%)" + ("" if attrs.get("complete") else ", not finished"),
        f"layout       maps {w}x{h} packed to {specs['pt/heatmaps'].tail[-1]} bytes a row, chunks of "
        f"{layout.chunk_instances}, shards of {layout.shard_instances}, zstd + crc32c",
        "",
        f"{'array':<18}{'dtype':>9}{'per instance':>16}{'stored':>12}{'B/instance':>12}",
    ]
    for name, spec in specs.items():
        per = stored[name] / done if done else float("nan")
        shape = _sizes(spec.tail) or "scalar"
        lines.append(f"{name:<18}{spec.dtype:>9}{shape:>16}{_size(stored[name]):>12}{per:>12.1f}")
    total = sum(stored.values())
    maps = sum(stored[n] for n in MAP_ARRAYS)
    float32_maps = sum(int(np.prod(specs[n].tail[:-1])) * w * 4 for n in MAP_ARRAYS)
    if done:
        lines += [
            "",
            f"total        {_size(total)}, {total / done:.1f} B/instance "
            f"(maps {maps / done:.1f} B/instance)",
            f"vs float32   maps would take {float32_maps} B/instance: "
            + (f"{float32_maps * done / maps:.0f}x smaller" if maps else "every stored map is empty"),
        ]
        soft = [n for n in specs if "soft" in n]
        if soft:
            lines.append(f"soft maps    {sum(stored[n] for n in soft) / done:.1f} B/instance of the total "
                         f"([cache] store_soft: raw float16 maps for soft-target students)")
    lines += ["", "teachers"]
    for key, t in attrs.get("teachers", {}).items():
        ap = "unknown" if t.get("val_ap") is None else f"{t['val_ap']:.4f}"
        lines.append(f"  {key}  {t.get('model')} ({t.get('role')}), fingerprint {t.get('fingerprint')}, "
                     f"val AP {ap}, {t.get('checkpoint')}")
    if "teacher_input_size" in settings:  # stores from build_cache; synthetic ones have no teachers
        lines += [
            "geometry     input {}, heatmap {}, sigma {}, margin {} -> maps {} from teacher input {}".format(
                _sizes(settings["input_size"]), _sizes(settings["heatmap_size"]), settings["sigma"],
                settings["margin"], _sizes(settings["map_size"]), _sizes(settings["teacher_input_size"])),
            "binarize     map >= {} ({}), mask >= {}, mask gate {}, flip test {}".format(
                settings["threshold"], settings["threshold_mode"], settings["mask_threshold"],
                f"on (dilation {settings['mask_gate_dilation']})" if settings["mask_gate"] else "off",
                "on" if settings["flip_test"] else "off"),
            f"precision    {precision_line(settings.get('precision', 'fp32'), markers)}",
            "keypoints    " + ("{name}, {num_keypoints} points, digest {digest}".format(**settings["keypoints"])
                               if "keypoints" in settings else f"coco, {layout.num_joints} points"),
        ]
    if attrs.get("pipeline", {}).get("source"):
        lines.append(f"pipeline     {attrs['pipeline']['source']}")
    if failed:
        lines += ["", f"failed instances ({len(failed)})"]
        lines += [f"  #{f['index']} image {f['image_id']} ann {f['ann_id']}: {f['reason']}"
                  for f in failed[:SHOWN_FAILURES]]
        if len(failed) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(failed) - SHOWN_FAILURES} more (store attribute 'failed')")
    return "\n".join(lines)
