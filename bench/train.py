"""Cost of a student training step: no KD, ODKD from the teacher store, online dual-teacher KD.

Every number is a ratio measured in this one run.

    .venv/bin/python bench/train.py [--size demo|coco|both] [--device cpu|cuda] [--steps N] [--torch-threads N]

A step is the training loop's own (odkd.train.loop.train_one_epoch over one batch): forward under
the loop's AMP and layout, loss, backward, optimizer step, the loss parts read back. The batches are
collated once beforehand (real augmented crops, GT heatmaps and teacher_theta), so data loading is
left out. The variants, each with its own student from the same initial weights:

1. no KD: the student trainer's objective with one stage of teacher "none" (GT heatmaps only);
2. ODKD, PT stage and ST stage: the student trainer's objective under the method's two stages,
   reading a real store on disk (synthetic binarized maps at each instance's real stored crop): the
   batch carries its samples' packed rows, as the loader delivers them from the store's local copy, and
   per step the objective unpacks them on the device, warps them into the augmented crops and
   binarizes them again (ST: the mask too, seg_weight > 0);
3. online KD: both teachers (PT; ST with its seg head) run on every batch, in eval mode, without
   gradients and without flip test, under the student's autocast; their heatmaps and ST's mask are
   binarized by the cache's rule and the student learns from GT, both teachers and the mask at once,
   as a toolkit without a cache trains.

Time: the variants take turns, the order rotating, warm-up rounds first; a turn is two steps on one
batch, the second timed, with CUDA synchronized around it; the median of the timed steps. On CPU also
the process's CPU time per step, which other load on a shared machine moves far less than the wall
clock. The time inside the objective alone (targets and losses; on CUDA in rounds of its own,
synchronized around it) tells the store's own cost from what a stage adds to backward (ST's trains
the seg head).

Memory: each variant again in a fresh process for a few steps: on CPU the growth of the resident
set's high-water mark (VmHWM) over the resident set before the variant was built, on CUDA
torch.cuda.max_memory_allocated over what was allocated before it. Weights, gradients, optimizer
state, activations, the store's arrays held in memory and the teachers all count. Weights are
untrained: a step costs the same whatever they hold.

Sizes: demo (pipeline/demo.toml: 96x128 crops, student mobilenetv2_tiny + seg head, teachers
hrnet_tiny width 8 and width 24 + seg head, batch 16 as the demo teachers train: the smaller batch
weighs the objective's fixed cost per step more than the trainer's default 32, the harder test) and
coco (pipeline/coco_hrnet.toml: 192x256 crops, student hrnet_w16 + seg head, teachers hrnet_w32 and
hrnet_w48 + seg head, batch 32 on CUDA, 8 on CPU). Everything is written into one temporary folder.
"""

from __future__ import annotations

import os

# train_one_epoch draws a progress bar for every one-batch "epoch" timed here, which would add the
# same fixed cost to every variant and pull the ratios towards 1; tqdm reads this when imported
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from itertools import islice  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from odkd.config import CacheConfig, PipelineConfig, StageConfig, load_config  # noqa: E402
from odkd.data.dataset import EpochSampler, TopDownDataset, make_loader  # noqa: E402
from odkd.data.instances import load_instances  # noqa: E402
from odkd.distill.objective import StudentObjective, stored_arrays  # noqa: E402
from odkd.distill.stages import StagePlan  # noqa: E402
from odkd.models import build_model  # noqa: E402
from odkd.models.inference import predict_batch  # noqa: E402
from odkd.models.losses import joints_mse_loss, mask_loss  # noqa: E402
from odkd.store import StoreLayout, TeacherTargets, build_store  # noqa: E402
from odkd.store.binarize import binarize  # noqa: E402
from odkd.store.geometry import cache_geometry, stored_frame_scale  # noqa: E402
from odkd.store.local import LocalRows  # noqa: E402
from odkd.store.synthetic import SyntheticTargets  # noqa: E402
from odkd.store.writer import ShardTargets  # noqa: E402
from odkd.synth import make_synthetic_dataset  # noqa: E402
from odkd.teachers.build import cache_settings  # noqa: E402
from odkd.train.loop import new_state, train_one_epoch  # noqa: E402

from cache import table  # noqa: E402  (bench/cache.py: this script's folder comes first on sys.path)

REPO = Path(__file__).resolve().parent.parent
BATCHES = 4  # collated once, taken in turn by every variant
MEMORY_STEPS = 2  # the second step holds gradients, optimizer state and activations at once
COCO_TRAIN_INSTANCES = 149_813  # the person instances HRNet trains on in COCO train2017
NO_KD = "no KD (GT only)"
ODKD_PT = "ODKD from the store, PT stage"
ODKD_ST = "ODKD from the store, ST stage (+ mask)"
ONLINE = "online KD, PT + ST forwarded"
VARIANTS = (NO_KD, ODKD_PT, ODKD_ST, ONLINE)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    pipeline: str  # its data geometry, augmentation, cache thresholds, teachers and student stages apply
    student: str  # with a seg head in every size
    batch: dict[str, int]  # device type -> batch size
    # device type -> (warm-up rounds, timed rounds); every turn's untimed first step warms up too
    rounds: dict[str, tuple[int, int]]


SIZES = {
    "demo": Size("demo", "pipeline/demo.toml", "mobilenetv2_tiny", {"cpu": 16, "cuda": 16},
                 {"cpu": (1, 15), "cuda": (3, 40)}),
    "coco": Size("coco", "pipeline/coco_hrnet.toml", "hrnet_w16", {"cpu": 8, "cuda": 32},
                 {"cpu": (0, 3), "cuda": (2, 20)}),
}


def size_config(size: Size, world: Path) -> PipelineConfig:
    """The size's pipeline with its train split on the world's synthetic data and its student set."""
    cfg = load_config(REPO / size.pipeline)
    data = dataclasses.replace(cfg.data, root=str(world / "data"), train_ann="annotations/person_keypoints_train.json",
                               train_images="images/train")
    student = dataclasses.replace(cfg.student, model=size.student, model_args={}, seg_head=True)
    return dataclasses.replace(cfg, data=data, student=student)


@dataclasses.dataclass(frozen=True)
class FramedSyntheticTargets:
    """SyntheticTargets whose rows sit at their instances' real stored crops, so that the warp from the
    stored crop into each augmented crop is the one a real store gives."""

    maps: SyntheticTargets
    centers: np.ndarray
    scales: np.ndarray

    def __call__(self, start: int, stop: int) -> ShardTargets:
        rows = self.maps(start, stop)
        rows.arrays["meta/center"][:] = self.centers[start:stop]
        rows.arrays["meta/scale"][:] = self.scales[start:stop]
        return rows


def store_url(world: Path) -> str:
    return str(world / "store.zarr")


def batches_path(world: Path) -> Path:
    return world / "batches.pt"


def make_world(size: Size, world: Path, device: torch.device) -> StoreLayout:
    """A synthetic train split, a store for it and BATCHES collated training batches, under `world`."""
    cfg = size_config(size, world)
    batch = size.batch[device.type]
    # about 2.7 people per synthetic image: enough instances for every batch
    make_synthetic_dataset(world / "data", train_images=batch * BATCHES, val_images=0, seed=0)
    instances = load_instances(cfg.data, "train")
    map_size, teacher_input = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, cfg.cache.margin)
    centers = np.stack([inst.center for inst in instances.instances]).astype(np.float32)
    scales = np.stack([stored_frame_scale(inst.scale, cfg.data.heatmap_size, map_size)
                       for inst in instances.instances])
    layout = StoreLayout(len(instances), 17, map_size, chunk_instances=cfg.cache.chunk_instances,
                         shard_instances=cfg.cache.shard_instances)
    settings = cache_settings(cfg, "train", instances.fingerprint, map_size, teacher_input, teachers={})
    build_store(store_url(world), layout, settings,
                FramedSyntheticTargets(SyntheticTargets(layout, sigma=cfg.data.sigma), centers, scales),
                scheduler="synchronous", progress=False)
    rows = LocalRows.fetch(TeacherTargets.open(store_url(world)), stored_arrays(StagePlan(cfg.student)),
                           root=world / "local-copies")
    dataset = TopDownDataset(instances, cfg.data, train=True, seed=0, stored_rows=rows)
    loader = make_loader(dataset, batch, workers=0, sampler=EpochSampler(len(dataset), shuffle=True, seed=0),
                         drop_last=True)
    torch.save(list(islice(loader, BATCHES)), batches_path(world))
    return layout


def load_batches(world: Path, device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in torch.load(batches_path(world), weights_only=True)]


@dataclasses.dataclass
class OnlineDualTeacher:
    """Online dual-teacher KD's objective: both teachers run on the batch inside the step."""

    primary: torch.nn.Module
    senior: torch.nn.Module
    cache: CacheConfig  # the binarization rule the store applies
    stage: StageConfig  # the ST stage: the GT, KD and mask weights
    seg_loss: str
    autocast_dtype: torch.dtype | None

    def binary(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return binarize(heatmaps, self.cache.threshold, self.cache.threshold_mode).float()

    def __call__(self, output, batch: dict):
        heatmaps, mask_logits = output
        images = batch["image"]
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        pt, _ = predict_batch(self.primary, images, flip_test=False, autocast_dtype=self.autocast_dtype)
        st, mask = predict_batch(self.senior, images, flip_test=False, autocast_dtype=self.autocast_dtype)
        every = torch.ones_like(batch["target_weight"])
        # two teachers at once share the KD weight, as the student trainer's "both" stage does
        terms = {
            "gt_loss": (self.stage.gt_weight, joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"])),
            "kd_pt_loss": (self.stage.kd_weight / 2, joints_mse_loss(heatmaps, self.binary(pt), every)),
            "kd_st_loss": (self.stage.kd_weight / 2, joints_mse_loss(heatmaps, self.binary(st), every)),
            "seg_loss": (self.stage.seg_weight, mask_loss(mask_logits, (mask >= self.cache.mask_threshold).float(),
                                                          self.seg_loss)),
        }
        loss = sum(weight * value for weight, value in terms.values())
        return loss, {name: value.item() for name, (_, value) in terms.items()}


def teacher_net(cfg: PipelineConfig, role: str, device: torch.device) -> torch.nn.Module:
    t = getattr(cfg.teachers, role)
    net = build_model(t.model, seg_head=t.seg_head, **t.model_args).eval().requires_grad_(False).to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def objective(variant: str, cfg: PipelineConfig, world: Path, device: torch.device, amp: bool):
    scfg = cfg.student
    plan = StagePlan(scfg)  # the method's stages: PT, then ST with the mask
    if variant == ONLINE:
        return OnlineDualTeacher(teacher_net(cfg, "primary", device), teacher_net(cfg, "senior", device), cfg.cache,
                                 plan.stages[1], scfg.seg_loss, torch.get_autocast_dtype(device.type) if amp else None)
    if variant == NO_KD:
        plan = StagePlan(dataclasses.replace(scfg, stages=(StageConfig(name="gt", epochs=1, teacher="none"),)))
    loss_fn = StudentObjective(plan, TeacherTargets.open(store_url(world)), heatmap_size=cfg.data.heatmap_size,
                               sigma=cfg.data.sigma, seg_loss=scfg.seg_loss)
    loss_fn.begin_epoch(plan.start(1) if variant == ODKD_ST else 0)
    return loss_fn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class TimedObjective:
    """An objective that, while `timing`, records the time spent inside it with the device synchronized
    on both sides; off in the steps timed whole, where those waits would stall the device's queue."""

    loss_fn: Callable
    device: torch.device
    timing: bool = False
    seconds: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, output, batch: dict):
        if not self.timing:
            return self.loss_fn(output, batch)
        synchronize(self.device)
        t0 = time.perf_counter()
        result = self.loss_fn(output, batch)
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)
        return result


def make_step(variant: str, cfg: PipelineConfig, world: Path,
              device: torch.device) -> tuple[Callable[[dict], None], TimedObjective]:
    """One training step of `variant` on a batch already on the device, as fit() sets the loop up, and
    its objective."""
    torch.manual_seed(cfg.student.train.seed)
    student = build_model(cfg.student.model, seg_head=True, **cfg.student.model_args).to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        student.to(memory_format=torch.channels_last)
    amp = cfg.student.train.amp and on_cuda
    state = new_state(student, cfg.student.train, lambda step: 1.0, amp, device)
    loss_fn = TimedObjective(objective(variant, cfg, world, device, amp), device)

    def step(batch: dict) -> None:
        train_one_epoch(student, state, [batch], loss_fn, steps=1, device=device, amp=amp, desc=variant)

    return step, loss_fn


def step_times(cfg: PipelineConfig, world: Path, device: torch.device, warmup: int,
               timed: int) -> dict[str, tuple[float, float, float]]:
    """Median (wall, process CPU, inside the objective) seconds per step of every variant, taking turns on
    the same batches.

    A turn is two steps, the first untimed: a step right after another variant's pays for that one's
    evicted caches and freed memory (online KD's teachers most), which a training run never does. On
    CUDA the objective's own timing would stall the step it sits in, so it gets rounds of its own.
    """
    batches = load_batches(world, device)
    steps = {variant: make_step(variant, cfg, world, device) for variant in VARIANTS}
    seconds: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    apart = device.type == "cuda"
    for r in range(warmup + timed + (min(timed, 5) if apart else 0)):
        batch = batches[r % len(batches)]
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            step, loss_fn = steps[variant]
            loss_fn.timing = False
            step(batch)
            loss_fn.timing = r >= warmup + timed if apart else r >= warmup
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step(batch)
            synchronize(device)
            if warmup <= r < warmup + timed:
                seconds[variant].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {variant: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s),
                      statistics.median(steps[variant][1].seconds)) for variant, s in seconds.items()}


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(variant: str, size: Size, world: Path, device: torch.device) -> int:
    """Bytes the variant's peak adds to what the process held once its batches were on the device."""
    cfg = size_config(size, world)
    batches = load_batches(world, device)
    synchronize(device)
    start = torch.cuda.memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmRSS")
    step, _ = make_step(variant, cfg, world, device)
    for i in range(MEMORY_STEPS):
        step(batches[i % len(batches)])
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmHWM")
    return peak - start


def measure_peak_in_fresh_process(variant: str, size: Size, world: Path, device: torch.device) -> int:
    threads = ["--torch-threads", str(torch.get_num_threads())]
    # glibc moves its mmap threshold with the allocation history, which moved VmHWM by +-10% from run to
    # run; a fixed one hands every large block back when it is freed, so VmHWM follows the live peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--size", size.name, "--device",
                           str(device), *threads, "--peak-of", variant, "--world", str(world)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise RuntimeError(f"memory probe of {variant!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["bytes"]


def local_copy_bytes_per_instance(world: Path, layout: StoreLayout) -> float:
    """Bytes per instance of the store's local copy, which every process of a machine maps and shares."""
    files = [f for f in (world / "local-copies").rglob("*") if f.is_file() and f.suffix in (".npy", ".zst")]
    return sum(f.stat().st_size for f in files) / layout.num_instances


def header(device: torch.device) -> list[str]:
    cpu = ["CPU ms/step", "vs no KD"] if device.type == "cpu" else []
    return ["size", "variant", "ms/step", "vs no KD", *cpu, "objective ms", "peak MB", "vs no KD"]


def bench_size(size: Size, tmp: Path, device: torch.device, timed: int | None,
               peak: bool = True) -> tuple[list[list], str]:
    world = tmp / size.name
    layout = make_world(size, world, device)
    cfg = size_config(size, world)
    warmup, default_timed = size.rounds[device.type]
    timed = timed or default_timed
    times = step_times(cfg, world, device, warmup, timed)
    peaks = ({variant: measure_peak_in_fresh_process(variant, size, world, device) for variant in VARIANTS}
             if peak else {})
    clocks = (0, 1) if device.type == "cpu" else (0,)
    ratios = {variant: [times[variant][k] / times[NO_KD][k] for k in clocks] for variant in VARIANTS}
    rows = [[size.name, variant,
             *[c for k in clocks for c in (f"{1000 * times[variant][k]:.1f}", f"{ratios[variant][k]:.3f}x")],
             f"{1000 * times[variant][2]:.1f}",
             *([f"{peaks[variant] / 2**20:.0f}", f"{peaks[variant] / peaks[NO_KD]:.2f}x"] if peak else ["-", "-"])]
            for variant in VARIANTS]
    shown = {variant: " / ".join(f"{r:.3f}x" for r in ratios[variant]) for variant in VARIANTS}
    # the objective's time beyond GT's is the store's own cost, apart from what a stage adds to backward
    own = {variant: (times[variant][2] - times[NO_KD][2]) / times[NO_KD][0] for variant in (ODKD_PT, ODKD_ST)}
    t = cfg.teachers
    per_instance = local_copy_bytes_per_instance(world, layout)
    note = (f"{size.name}: batch {size.batch[device.type]}, {warmup} warm-up + {timed} timed rounds, crops "
            f"{cfg.data.input_size[0]}x{cfg.data.input_size[1]}, maps {layout.map_size[0]}x{layout.map_size[1]}; "
            f"student {cfg.student.model} + seg head, PT {t.primary.model} {t.primary.model_args}, ST "
            f"{t.senior.model} {t.senior.model_args} + seg head. Step against no KD"
            f"{' (wall / CPU)' if device.type == 'cpu' else ''}: ODKD PT stage {shown[ODKD_PT]}, ST stage "
            f"{shown[ODKD_ST]} (target <= 1.05x); online KD {shown[ONLINE]}. The objective's time beyond GT's, "
            f"against the no-KD step: PT stage {own[ODKD_PT]:.1%}, ST stage {own[ODKD_ST]:.1%}. The store's rows "
            f"reach the step with the batch (the loader reads them from the local copy, not timed here); that "
            f"copy takes {per_instance:,.0f} B/instance on disk, mapped once per machine: "
            f"{per_instance * COCO_TRAIN_INSTANCES / 2**20:,.0f} MB for COCO train's {COCO_TRAIN_INSTANCES:,} "
            f"(bench/scale.py measures it at scale).")
    return rows, note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("demo", "coco", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: the size's, per device)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: the size's, per device); smaller for a quick smoke run")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 on a shared machine")
    parser.add_argument("--no-peak", action="store_true",
                        help="skip the memory probes (a fresh process per variant): a quicker smoke run")
    parser.add_argument("--peak-of", choices=VARIANTS, help=argparse.SUPPRESS)  # the memory probe's process
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.peak_of:
        print(json.dumps({"bytes": peak_growth(args.peak_of, SIZES[args.size], args.world, device)}))
        return 0
    sizes = list(SIZES.values()) if args.size == "both" else [SIZES[args.size]]
    if args.batch_size:
        sizes = [dataclasses.replace(size, batch={**size.batch, device.type: args.batch_size}) for size in sizes]
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="odkd-bench-train-") as tmp:
        for size in sizes:
            size_rows, note = bench_size(size, Path(tmp), device, args.steps, peak=not args.no_peak)
            rows += size_rows
            notes.append(note)
            print(table(header(device), size_rows), "\n", flush=True)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    command = "`" + " ".join([".venv/bin/python bench/train.py", *(sys.argv[1:] if argv is None else argv)]) + "`"
    print("\n\n".join([
        command,
        f"{machine} (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), torch "
        f"{torch.__version__}; {time.perf_counter() - started:.0f} s in all.",
        table(header(device), rows),
        *notes,
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
