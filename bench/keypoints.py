"""What a store costs per instance for each keypoint-set preset, at COCO's geometry.

    .venv/bin/python bench/keypoints.py [--instances 4096] [--record]

Synthetic stores (odkd.store.synthetic: binarized unit-peak Gaussians at sigma 2, one per point, placed at
random in the map) with K maps a row, the stored maps of COCO's recipe (48x64 heatmaps cached at margin
1.25: 64x80), chunks of 64, shards of 1024, built in one process; bytes from the writers' markers. The
store keeps two teachers' maps, their confidences and ST's mask, so the maps grow with K and the mask
does not.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from cache import map_bytes, record, table  # bench/cache.py, beside this script
from odkd.data.keypoints import keypoint_set, presets
from odkd.store import StoreLayout, build_store
from odkd.store.geometry import cache_geometry
from odkd.store.store import read_markers, store_fs
from odkd.store.synthetic import SyntheticTargets

SECTION = "## Store bytes per keypoint set (bench/keypoints.py)"
COCO_TRAIN_PEOPLE = 149_813  # COCO train2017's labelled people; COCO-WholeBody annotates the same people


def total_bytes(url: str, layout: StoreLayout) -> float:
    """Every array's bytes per instance, from the writers' markers."""
    fs, root = store_fs(url)
    return sum(sum(m["bytes"].values()) for m in read_markers(fs, root, layout.num_shards).values()) / layout.num_instances


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4096)
    parser.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md, {SECTION!r}")
    args = parser.parse_args(argv)
    map_size = cache_geometry((48, 64), (192, 256), 1.25)[0]
    tmp = Path(tempfile.mkdtemp(prefix="odkd-keypoints-bench-"))
    rows = []
    try:
        for name in presets():
            k = keypoint_set(name).num_keypoints
            layout = StoreLayout(args.instances, k, map_size, chunk_instances=64, shard_instances=1024)
            url = str(tmp / f"{name}.zarr")
            build_store(url, layout, {"dataset_fingerprint": f"bench-{name}"}, SyntheticTargets(layout, sigma=2.0),
                        scheduler="synchronous", progress=False)
            total, maps = total_bytes(url, layout), map_bytes(url, layout)
            rows.append([name, k, f"{total:.0f}", f"{maps:.0f}", f"{maps / k:.1f}",
                         f"{total * COCO_TRAIN_PEOPLE / 1e6:.0f}"])
            shutil.rmtree(url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(["set", "K", "B/instance", "of it maps", "maps per point", "MB for COCO train's 149,813 people"],
                 rows)
    print(text)
    if args.record:
        record(f"{args.instances:,} synthetic instances a set, 64x80 stored maps (COCO's recipe at margin 1.25).\n\n"
               f"```sh\ncd bench && ../.venv/bin/python keypoints.py --instances {args.instances} --record\n```\n\n"
               + text, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
