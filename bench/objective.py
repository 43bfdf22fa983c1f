"""Cost of each part of the student's objective on a device, and whether torch.compile pays for it.

    .venv/bin/python bench/objective.py [--device cpu|cuda] [--size demo|coco|both] [--margin 1.25] [--compile]

One batch at the size's batch for the device (bench/train.py's Size table) and the store's geometry
(odkd.store.geometry.cache_geometry at --margin: coco's 48x64 heatmaps at margin 1.25 are stored as
64x80 maps): the stored rows are synthetic binarized Gaussians packed as the store packs them
(odkd.store.synthetic), the crops are the loader's own geometry (odkd.data.transforms.grid_sample_theta
and map_zoom) for random centres, rotations within 30 degrees, flips and zooms in [0.7, 1.3]. The
student's output is random, in the dtype the trainer's AMP gives it (float16 on CUDA, float32 on CPU),
with gradients on, so the losses build their autograd graph as in training.

The parts, each through odkd's own function: unpack the bits (odkd.distill.warp.unpack_bits), warp
(warp_batch: affine_grid + grid_sample + the mirrored samples' channel swap), binarize again, move the
edges (move_edges, keep_blob_size), the mask's unpack + warp + binarize, the mask gate (only for a stage
with mask_gate on), the teacher confidence weights, and the losses (joints_mse_loss, mask_loss); then
the whole objective (odkd.distill.objective.StudentObjective) of the PT and the ST stage on a batch that
carries its stored rows.

Time: the parts take turns, warm-up rounds first, the device synchronized on both sides of every
timed call; the median over the timed rounds. Host syncs: on CUDA, one more call of each part under
torch.cuda.set_sync_debug_mode("warn"), counting its warnings (each is a point where the host waits for
the device); "n/a" on the CPU. --compile runs every part and the whole objective under torch.compile as
well, and reports its time against eager and the first call's seconds: the compile, the whole
objectives first from an empty compile cache, then the parts, which reuse what those left there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from odkd.config import PipelineConfig, load_config
from odkd.data.transforms import CropFrame, grid_sample_theta, map_zoom
from odkd.distill.objective import StudentObjective, teacher_blob_radius
from odkd.distill.stages import StagePlan
from odkd.distill.warp import flip_keypoint_values, move_edges, unpack_bits, warp_batch, warp_binary_batch
from odkd.models.losses import joints_mse_loss, mask_loss
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.binarize import gate_by_mask
from odkd.store.geometry import cache_geometry, stored_frame_scale
from odkd.store.synthetic import SyntheticTargets
from odkd.teachers.build import cache_settings

from cache import table  # noqa: E402  (bench/cache.py: this script's folder comes first on sys.path)
from train import SIZES, Size, synchronize  # noqa: E402  (bench/train.py's sizes and batches)

REPO = Path(__file__).resolve().parent.parent
ZOOM = (0.7, 1.3)
MAX_ROTATION = 30.0
# device type -> (warm-up rounds, timed rounds)
ROUNDS = {"cpu": (3, 40), "cuda": (5, 50)}
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    fn: Callable
    args: tuple
    calls: int | None  # calls of it in one ST-stage objective; None for a whole objective


ROW_NAMES = ("pt/heatmaps", "st/heatmaps", "st/mask", "pt/conf", "st/conf", "meta/ok")


def synthetic_store(cfg: PipelineConfig, n: int, margin: float, url: str) -> TeacherTargets:
    """A real store of `n` synthetic instances (binarized Gaussians, an elliptic mask) at the geometry
    [cache] margin gives the config's heatmaps, with the config's cache settings."""
    map_size, teacher_input = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, margin)
    layout = StoreLayout(n, 17, map_size, chunk_instances=n, shard_instances=n)
    c = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, margin=margin))
    settings = cache_settings(c, "train", "bench-objective", map_size, teacher_input, teachers={})
    build_store(url, layout, settings, SyntheticTargets(layout, sigma=cfg.data.sigma), scheduler="synchronous",
                progress=False)
    return TeacherTargets.open(url)


def stored_batch(cfg: PipelineConfig, targets: TeacherTargets, device: torch.device, seed: int) -> dict:
    """A batch as the loader delivers it to the objective: every instance's stored rows, GT heatmaps and
    weights, and each sample's crop geometry (a random centre, rotation, flip and zoom), on `device`."""
    heatmap_size = cfg.data.heatmap_size
    map_size = tuple(targets.layout.map_size)
    n = len(targets)
    rng = np.random.default_rng(seed)
    thetas, zooms, flips = [], [], []
    for _ in range(n):
        scale = np.array([1.0, 1.0 * heatmap_size[1] / heatmap_size[0]], np.float32)
        stored = CropFrame(center=(100.0, 100.0),
                           scale=tuple(map(float, stored_frame_scale(scale, heatmap_size, map_size))))
        crop = CropFrame(center=tuple(map(float, 100.0 + rng.normal(0.0, 10.0, 2))),
                         scale=tuple(map(float, scale * rng.uniform(*ZOOM))),
                         rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), flip=bool(rng.random() < 0.5),
                         image_width=200)
        thetas.append(grid_sample_theta(stored, map_size, crop, heatmap_size))
        zooms.append(map_zoom(stored, map_size, crop, heatmap_size))
        flips.append(crop.flip)
    rows = targets.get_batch(np.arange(n), list(ROW_NAMES))
    w, h = heatmap_size
    batch = {name: torch.from_numpy(np.ascontiguousarray(rows[name])) for name in ROW_NAMES}
    batch |= {"teacher_theta": torch.from_numpy(np.stack(thetas)),
              "teacher_zoom": torch.tensor(zooms, dtype=torch.float32), "flip": torch.tensor(flips),
              "heatmaps": torch.from_numpy(rng.random((n, 17, h, w), dtype=np.float32)),
              "target_weight": torch.ones(n, 17, 1)}
    return {k: v.to(device) for k, v in batch.items()}


def student_output(cfg: PipelineConfig, n: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random student heatmaps and mask logits as the trainer's forward returns them, with gradients on."""
    w, h = cfg.data.heatmap_size
    g = torch.Generator().manual_seed(seed)
    heatmaps = (0.1 * torch.randn(n, 17, h, w, generator=g)).to(device, dtype).requires_grad_()
    logits = torch.randn(n, 1, h, w, generator=g).to(device, dtype).requires_grad_()
    return heatmaps, logits


def parts(cfg: PipelineConfig, batch: dict, output, map_width: int) -> list[Part]:
    """The objective's steps for the ST stage of cfg's method, each on the previous one's real output."""
    senior = cfg.student.stages[-1]
    heatmap_size = tuple(cfg.data.heatmap_size)
    radius = (teacher_blob_radius({"threshold": cfg.cache.threshold, "sigma": cfg.data.sigma})
              if cfg.student.keep_blob_size else 0.0)
    theta, flip, zoom, ok = batch["teacher_theta"], batch["flip"], batch["teacher_zoom"], batch["meta/ok"].bool()
    heatmaps, logits = output

    def warp(maps, theta, flip):
        return warp_batch(maps, theta, heatmap_size, flip, keypoint_channels=True)

    def binarize_again(maps):
        return (maps >= 0.5).float()

    def edge_move(maps, zoom):
        return move_edges(maps, radius * (1.0 / zoom - 1.0))

    def mask_targets(packed, theta, flip):
        return warp_binary_batch(packed, map_width, theta, heatmap_size, flip, keypoint_channels=False)

    def gate(target, mask):
        return gate_by_mask(target > 0, mask > 0, senior.mask_gate_dilation) * target

    def conf_weight(conf, ok, flip):
        return (ok[:, None] & (flip_keypoint_values(conf.float(), flip) >= senior.conf_floor)).float().unsqueeze(-1)

    def seg_loss(logits, mask, ok):
        return mask_loss(logits, mask, cfg.student.seg_loss, weight=ok)

    unpacked = unpack_bits(batch["st/heatmaps"], map_width)
    warped = warp(unpacked, theta, flip)
    target = edge_move(warped, zoom) if radius > 0 else binarize_again(warped)
    mask = mask_targets(batch["st/mask"], theta, flip)
    weight = conf_weight(batch["st/conf"], ok, flip)
    return [
        Part("unpack bits (17 maps)", unpack_bits, (batch["st/heatmaps"], map_width), 1),
        Part("warp: affine_grid + grid_sample + flip swap", warp, (unpacked, theta, flip), 1),
        Part("binarize again (>= 0.5; inside the edge move when keep_blob_size)", binarize_again, (warped,),
             0 if radius > 0 else 1),
        Part(f"edge move (keep_blob_size, r {radius:.2f} px)", edge_move, (warped, zoom), 1 if radius > 0 else 0),
        Part("mask: unpack + warp + binarize", mask_targets, (batch["st/mask"], theta, flip), 1),
        Part(f"mask gate (dilation {senior.mask_gate_dilation}; where mask_gate is on)", gate, (target, mask),
             int(senior.mask_gate)),
        Part("teacher conf weights (flip + conf_floor)", conf_weight, (batch["st/conf"], ok, flip), 1),
        Part("joints_mse_loss (GT term, KD term)", joints_mse_loss, (heatmaps, target, weight), 2),
        Part(f"mask_loss ({cfg.student.seg_loss})", seg_loss, (logits, mask, ok), 1),
    ]


def whole_objectives(cfg: PipelineConfig, targets: TeacherTargets, batch: dict, output) -> list[Part]:
    """StudentObjective under the method's first (PT) and last (ST) stage, as the trainer calls it."""
    plan = StagePlan(cfg.student)
    out = []
    for label, epoch in (("PT", 0), ("ST", plan.start(len(plan.stages) - 1))):
        loss_fn = StudentObjective(plan, targets, heatmap_size=cfg.data.heatmap_size, sigma=cfg.data.sigma, seg_loss=cfg.student.seg_loss,
                                   keep_blob_size=cfg.student.keep_blob_size)
        stage = loss_fn.begin_epoch(epoch)["stage"]
        # a bound method: torch.compile takes functions and modules, and the objective is neither
        out.append(Part(f"whole objective, {label} stage ('{stage}')", loss_fn.__call__, (output, batch), None))
    return out


def run(part: Part, fn: Callable) -> None:
    """One call, its result dropped: a loss builds its autograd graph, as in training, but no backward runs
    (that is the step's, not the objective's)."""
    fn(*part.args)


def host_syncs(part: Part, fn: Callable, device: torch.device) -> str:
    """Synchronizing CUDA operations in one call of `fn`: the warnings of sync debug mode."""
    if device.type != "cuda":
        return "n/a"
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(part, fn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return str(sum("synchroniz" in str(w.message) for w in caught))


def median_times(entries: dict[str, tuple[Part, Callable]], device: torch.device, warmup: int, timed: int
                 ) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of every entry, the entries taking turns, the device
    synchronized around every call."""
    seconds: dict[str, list[tuple[float, float]]] = {key: [] for key in entries}
    for r in range(warmup + timed):
        for key, (part, fn) in entries.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run(part, fn)
            synchronize(device)
            if r >= warmup:
                seconds[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {key: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for key, s in seconds.items()}


def first_call_seconds(part: Part, fn: Callable, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    run(part, fn)
    synchronize(device)
    return time.perf_counter() - t0


def bench(size: Size, device: torch.device, margin: float, amp_dtype: torch.dtype, warmup: int, timed: int,
          compile_too: bool, tmp: Path) -> tuple[str, str]:
    cfg = load_config(REPO / size.pipeline)
    n = size.batch[device.type]
    targets = synthetic_store(cfg, n, margin, str(tmp / f"{size.name}.zarr"))
    batch = stored_batch(cfg, targets, device, seed=0)
    output = student_output(cfg, n, amp_dtype, device, seed=0)
    everything = parts(cfg, batch, output, targets.layout.map_size[0]) + whole_objectives(cfg, targets, batch, output)
    entries = {p.name: (p, p.fn) for p in everything}
    compile_seconds = {}
    if compile_too:
        # every size from scratch (no compiled frames, an empty compile cache), the whole objectives first:
        # what compiling the objective costs a run; the parts then reuse what those compiles left
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{size.name}")
        for p in sorted(everything, key=lambda p: p.calls is not None):
            compiled = torch.compile(p.fn)
            compile_seconds[p.name] = first_call_seconds(p, compiled, device)
            entries[p.name + " [compiled]"] = (p, compiled)
    times = median_times(entries, device, warmup, timed)
    # the ratios on the CPU clock there: other work on a shared machine moves it far less than the wall clock
    clock = 1 if device.type == "cpu" else 0
    st_whole = times[everything[-1].name][clock]
    summed = [sum(times[p.name][k] * p.calls for p in everything if p.calls) for k in (0, 1)]
    rows = []
    for p in everything:
        t = times[p.name]
        calls = "-" if p.calls is None else str(p.calls)
        share = f"{t[clock] / st_whole:.2f}x" if p.calls is None else f"{p.calls * t[clock] / st_whole:.1%}"
        row = [p.name, calls, f"{1000 * t[0]:.3f}", *([f"{1000 * t[1]:.3f}"] if clock else []), share,
               host_syncs(p, p.fn, device)]
        if compile_too:
            c = times[p.name + " [compiled]"]
            row += [f"{1000 * c[clock]:.3f}", f"{c[clock] / t[clock]:.2f}x",
                    host_syncs(p, entries[p.name + " [compiled]"][1], device), f"{compile_seconds[p.name]:.1f}"]
        rows.append(row)
    rows.append(["the ST stage's parts, summed", "", f"{1000 * summed[0]:.3f}",
                 *([f"{1000 * summed[1]:.3f}"] if clock else []), f"{summed[clock] / st_whole:.2f}x", "",
                 *([""] * 4 if compile_too else [])])
    ms = "CPU ms" if clock else "ms"
    header = ["part", "calls in an ST objective", "ms", *(["CPU ms"] if clock else []),
              f"vs ST objective (calls x {ms})", "host syncs"]
    if compile_too:
        header += [f"compiled {ms}", "compiled / eager", "host syncs, compiled", "first call s (compile)"]
    w, h = cfg.data.heatmap_size
    note = (f"{size.name}: batch {n}, student heatmaps {w}x{h} ({str(amp_dtype).removeprefix('torch.')}), stored maps "
            f"{targets.layout.map_size[0]}x{targets.layout.map_size[1]} (margin {margin:g}), {warmup} warm-up + "
            f"{timed} timed rounds, median; the stages of {size.pipeline} (ST: conf_floor "
            f"{cfg.student.stages[-1].conf_floor:g}, seg_weight {cfg.student.stages[-1].seg_weight:g}, mask_gate "
            f"{cfg.student.stages[-1].mask_gate}).")
    return table(header, rows), note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES) + ("both",), default="coco")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--margin", type=float, default=1.25, help="the store's [cache] margin")
    parser.add_argument("--amp-dtype", choices=tuple(AMP_DTYPES), default=None,
                        help="dtype of the student's output (default: fp16 on CUDA as the trainer's AMP, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: per device)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: per device)")
    parser.add_argument("--compile", action="store_true", help="also every part under torch.compile")
    parser.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    amp_dtype = AMP_DTYPES[args.amp_dtype or ("fp16" if device.type == "cuda" else "fp32")]
    warmup, timed = ROUNDS[device.type]
    warmup = warmup if args.warmup is None else args.warmup
    timed = args.rounds or timed
    sizes = list(SIZES.values()) if args.size == "both" else [SIZES[args.size]]
    started, load = time.perf_counter(), os.getloadavg()[0]
    sections = []
    with tempfile.TemporaryDirectory(prefix="odkd-bench-objective-") as tmp:
        for size in sizes:
            text, note = bench(size, device, args.margin, amp_dtype, warmup, timed, args.compile, Path(tmp))
            print(text, "\n", flush=True)
            sections += [text, note]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    command = "`" + " ".join([".venv/bin/python bench/objective.py", *(sys.argv[1:] if argv is None else argv)]) + "`"
    print("\n\n".join([command, f"{machine} (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
                                f"end), torch {torch.__version__}; {time.perf_counter() - started:.0f} s in all.",
                       *sections]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
