"""The student's teacher targets at COCO size and beyond, on the CPU: disk, start-up, memory per process, rows/s.

    .venv/bin/python bench/scale.py [--instances 150000 600000] [--ranks 1 2 4] [--workers 2] [--tables ...]
        [--rounds 1] [--record]

Stores are synthetic (odkd.store.synthetic's binarized Gaussians, no teachers) at COCO geometry: 48x64
heatmaps cached at margin 1.25 (64x80 stored maps), chunks of 64, shards of 1024. Their rows are drawn
from a pool of 8,192 distinct synthetic rows, so a 600k store builds in minutes rather than an hour;
compression works chunk by chunk (or row by row), so bytes per instance are those of distinct rows.

1. store: bytes per instance on disk, and the write time (zarr encode and write, the producer excluded);
2. candidates for "the targets once per machine", on the first store: bytes each machine holds, us per
   sample for the method's arrays (three packed maps, two conf rows, ok, the stored crop), and the time
   to make it. (a) the local copy odkd uses: maps zstd-compressed row by row, every row read with
   pread; (b) the packed rows raw in one memory-mapped file; (c) no copy: the store's own chunks, one
   decoded per row;
3. start-up: a fresh process from opening the store to the first batch of a loader with --workers
   workers, on the first run on this machine (the local copy is made) and on the second (it is read);
4. rows per second that one loader worker delivers (LocalRows.row in a loop over a random order);
5. memory: --ranks gloo ranks (torch.distributed, DDP of the COCO student, hrnet_w16 as
   pipeline/coco_hrnet_w16.toml configures it, batch 8 at 256x192, two Adam steps), each with --workers
   persistent loader workers that go once through the rank's share of every row: PSS per process
   (/proc smaps, shared pages divided among the processes that map them) with KD rows against the same
   trainer whose loader delivers only indices (no KD). Images are left out of both: the no-KD
   trainer is then smaller than a real one, and the targets' share larger. The local copy is read,
   not mapped, so its pages are in the kernel's page cache, once per machine and evictable, and in no
   process's PSS: the table gives the copy's size beside the PSS.
"""

from __future__ import annotations

import os

# the local copy's progress bar, drawn in every probe process, is not what is measured
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import zarr

from cache import record, table  # bench/cache.py, beside this script
from odkd.config import load_config
from odkd.distill.objective import stored_arrays
from odkd.distill.stages import StagePlan
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.geometry import cache_geometry
from odkd.store.local import LOCAL_COPIES_ENV, LocalRows
from odkd.store.rowfiles import check_array, read_manifest
from odkd.store.synthetic import SyntheticTargets

REPO = Path(__file__).resolve().parent.parent
COCO = load_config(REPO / "pipeline" / "coco_hrnet_w16.toml")
MAP_SIZE = cache_geometry((48, 64), (192, 256), 1.25)[0]
NAMES = stored_arrays(StagePlan(COCO.student))  # the method's arrays: both teachers' maps and conf, mask, ok, crop
POOL = 8192
SAMPLES = 20_000  # rows timed per candidate and for rows/s
TABLES = ("store", "candidates", "startup", "rate", "memory")


@dataclasses.dataclass(frozen=True)
class PooledTargets:
    """Rows of a pool of distinct synthetic rows, in a random order per shard, each row with its own index."""

    pool: dict

    def __call__(self, start: int, stop: int):
        from odkd.store.writer import ShardTargets

        pick = np.random.default_rng(start).integers(0, POOL, stop - start)
        rows = {name: values[pick] for name, values in self.pool.items()}
        rows["meta/index"][:] = np.arange(start, stop)
        return ShardTargets(rows)


def build(url: Path, n: int, pool: dict) -> float:
    layout = StoreLayout(n, 17, MAP_SIZE, chunk_instances=64, shard_instances=1024)
    t0 = time.perf_counter()
    build_store(str(url), layout, {"dataset_fingerprint": f"scale-{n}"}, PooledTargets(pool), scheduler="synchronous",
                progress=False)
    return time.perf_counter() - t0


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def per_sample_us(fn, n: int) -> float:
    order = np.random.default_rng(0).permutation(n)[:SAMPLES]
    t0 = time.perf_counter()
    for i in order:
        fn(int(i))
    return (time.perf_counter() - t0) / len(order) * 1e6


def candidates(url: Path, tmp: Path) -> list[list]:
    targets = TeacherTargets.open(str(url))
    n = len(targets)
    t0 = time.perf_counter()
    local = LocalRows.fetch(targets, NAMES, root=tmp / "cand-local")
    local_s = time.perf_counter() - t0
    # (b) every row packed and raw, one .npy per array, memory-mapped
    t0 = time.perf_counter()
    raw_dir = tmp / "cand-raw"
    raw_dir.mkdir()
    group = zarr.open_group(str(url), mode="r")
    for name in NAMES:
        out = np.lib.format.open_memmap(raw_dir / f"{name.replace('/', '-')}.npy", mode="w+",
                                        dtype=group[name].dtype, shape=(n, *group[name].shape[1:]))
        for shard in range(targets.layout.num_shards):
            start, stop = targets.layout.shard_range(shard)
            out[start:stop] = group[name][targets.layout.shard_rows(shard)][: stop - start]
        out.flush()
    raw_s = time.perf_counter() - t0
    raw = {name: np.load(raw_dir / f"{name.replace('/', '-')}.npy", mmap_mode="r") for name in NAMES}
    arrays = {name: group[name] for name in NAMES}
    store_bytes = disk_bytes(url)
    return [
        ["(a) local copy, maps zstd per row, pread (odkd)", f"{disk_bytes(local.folder) / n:.0f}",
         f"{per_sample_us(local.row, n):.0f}", f"{local_s:.1f}"],
        ["(b) packed rows raw, mmap", f"{disk_bytes(raw_dir) / n:.0f}",
         f"{per_sample_us(lambda i: {k: np.array(v[i]) for k, v in raw.items()}, n):.0f}", f"{raw_s:.1f}"],
        ["(c) no copy: the store's chunk decoded per row", f"{store_bytes / n:.0f} (the store)",
         f"{per_sample_us(lambda i: {k: v[i] for k, v in arrays.items()}, n // 20):.0f}", "0"],
    ]


STARTUP = """
import sys, time
t0 = time.perf_counter()
import torch
from torch.utils.data import DataLoader
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets
sys.path.insert(0, sys.argv[3])
from scale import RowsDataset, NAMES
t1 = time.perf_counter()
rows = LocalRows.fetch(TeacherTargets.open(sys.argv[1]), NAMES)
loader = DataLoader(RowsDataset(rows, len(TeacherTargets.open(sys.argv[1])), True), batch_size=32, shuffle=True,
                    num_workers=int(sys.argv[2]))
next(iter(loader))
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def startup_seconds(url: Path, workers: int, copies: Path) -> tuple[float, float]:
    """(imports, open store -> first batch) of a fresh process."""
    env = {**os.environ, LOCAL_COPIES_ENV: str(copies), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STARTUP, str(url), str(workers), str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    return float(out[-2]), float(out[-1])


def check_seconds(copies: Path) -> float:
    """What a run's check of a copy costs: every array's files against its manifest (sizes, SHA-256, offsets)."""
    t0 = time.perf_counter()
    for sub in sorted(copies.glob("*/*/manifest.json")):
        manifest = read_manifest(sub.parent)
        problem = check_array(sub.parent, manifest["rows"], tuple(manifest["tail"]), manifest["dtype"])
        assert problem is None, (sub.parent, problem)
    return time.perf_counter() - t0


class RowsDataset(torch.utils.data.Dataset):
    """Sample i: the stored rows of instance i (KD), or only i (no KD)."""

    def __init__(self, rows: LocalRows | None, n: int, kd: bool):
        self.rows, self.n, self.kd = rows, n, kd

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **({k: torch.from_numpy(v) for k, v in self.rows.row(i).items()} if self.kd else {})}


def rank_main(rank: int, world: int, url: str, kd: bool, workers: int, queue, done) -> None:
    import torch.distributed as dist

    from odkd.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{url}.rendezvous-{world}-{int(kd)}", rank=rank,
                            world_size=world)
    scfg = COCO.student
    model = build_model(scfg.model, seg_head=True, **scfg.model_args)
    net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(2):
        heatmaps, mask = net(torch.randn(8, 3, 256, 192))
        (heatmaps.square().mean() + mask.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    targets = TeacherTargets.open(url)
    rows = LocalRows.fetch(targets, NAMES) if kd else None
    dataset = RowsDataset(rows, len(targets), kd)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=workers,
                                         persistent_workers=True)
    for _ in loader:
        pass
    children = [c.pid for c in psutil.Process().children(recursive=True)]
    queue.put((rank, os.getpid(), children))
    done.wait()
    dist.destroy_process_group()


def pss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().pss / 2**20


def copy_mapped_mb(pid: int) -> float:
    """PSS MB of the process's mappings of files in the local copies (nothing, when rows are read, not mapped)."""
    root = os.environ[LOCAL_COPIES_ENV]
    return sum(m.pss for m in psutil.Process(pid).memory_maps() if m.path.startswith(root)) / 2**20


def memory(url: Path, world: int, kd: bool, workers: int) -> tuple[float, float, float, float]:
    """(mean PSS MB of a rank, mean of a loader worker, sum over every process, the part of that sum that
    maps the local copy) with every worker alive."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=rank_main, args=(r, world, str(url), kd, workers, queue, done)) for r in range(world)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=3600) for _ in procs]
    ranks = [pss_mb(pid) for _, pid, _ in got]
    loaders = [pss_mb(c) for _, _, children in got for c in children]
    mapped = sum(copy_mapped_mb(pid) for _, rank, children in got for pid in (rank, *children))
    done.set()
    for p in procs:
        p.join()
    return statistics.mean(ranks), statistics.mean(loaders) if loaders else 0.0, sum(ranks) + sum(loaders), mapped


def memory_medians(url: Path, world: int, workers: int, rounds: int) -> tuple[list[float], list[float]]:
    """memory() without KD and with KD, each value the median of `rounds` interleaved runs: a rank's PSS
    swings by tens of MB from run to run, with or without KD."""
    runs = {False: [], True: []}
    for _ in range(rounds):
        for kd in runs:
            runs[kd].append(memory(url, world, kd, workers))
    return tuple([statistics.median(values) for values in zip(*runs[kd])] for kd in (False, True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[150_000, 600_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                        help="the tables to measure (default: all; the stores are built for any)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved no-KD / KD rounds of the memory table, medians kept")
    parser.add_argument("--tmp", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--record", action="store_true", help="write the tables into bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.record and set(args.tables) != set(TABLES):
        parser.error("--record replaces the whole section of bench/RESULTS.md: it needs every table")
    tmp = Path(tempfile.mkdtemp(prefix="odkd-scale-", dir=args.tmp))
    os.environ[LOCAL_COPIES_ENV] = str(tmp / "copies")
    try:
        pool_layout = StoreLayout(POOL, 17, MAP_SIZE, chunk_instances=64, shard_instances=1024)
        pool = SyntheticTargets(pool_layout, sigma=COCO.data.sigma)(0, POOL).arrays
        stores, store_rows = {}, []
        for n in args.instances:
            stores[n] = tmp / f"s{n}.zarr"
            seconds = build(stores[n], n, pool)
            store_rows.append([f"{n:,}", f"{disk_bytes(stores[n]) / n:.0f}", f"{seconds:.0f}"])
        first = min(stores)
        sections = []
        if "store" in args.tables:
            sections.append("store\n\n" + table(["instances", "B/instance on disk", "write s"], store_rows))
        if "candidates" in args.tables:
            sections.append(f"candidates, {first:,} instances\n\n" + table(
                ["candidate", "B/instance held per machine", "us/sample", "made in s"], candidates(stores[first], tmp)))
        if "startup" in args.tables:
            startup_rows = []
            for n, url in stores.items():
                copies = tmp / f"startup-{n}"
                imports, cold = startup_seconds(url, args.workers, copies)
                _, warm = startup_seconds(url, args.workers, copies)
                startup_rows.append([f"{n:,}", f"{cold:.2f}", f"{warm:.2f}", f"{check_seconds(copies):.2f}",
                                     f"{imports:.2f}"])
            sections.append(f"start-up to the first batch ({args.workers} workers, batch 32)\n\n" + table(
                ["instances", "first run s (copy made)", "second run s (copy made before)",
                 "of it, the copy's check s", "imports s (not counted)"], startup_rows))
        if "rate" in args.tables:
            rate_rows = []
            for n, url in stores.items():
                rows = LocalRows.fetch(TeacherTargets.open(str(url)), NAMES)
                rate_rows.append([f"{n:,}", f"{1e6 / per_sample_us(rows.row, n):,.0f}"])
            sections.append("one loader worker\n\n" + table(["instances", "rows/s"], rate_rows))
        if "memory" in args.tables:
            memory_rows = []
            for n, url in stores.items():
                copy = LocalRows.fetch(TeacherTargets.open(str(url)), NAMES)  # made once before: each run reads it
                copy_mb = f"{disk_bytes(copy.folder) / 2**20:.0f}"
                for world in args.ranks:
                    plain, kd = memory_medians(url, world, args.workers, args.rounds)
                    memory_rows.append([f"{n:,}", world, f"{plain[0]:.0f}", f"{kd[0]:.0f}", f"{plain[1]:.0f}",
                                        f"{kd[1]:.0f}", f"{plain[2]:.0f}", f"{kd[2]:.0f}",
                                        f"{(kd[2] - plain[2]) / plain[2]:+.1%}", f"{kd[3]:.0f}", copy_mb])
            rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
            sections.append(f"memory, PSS MB ({args.workers} loader workers a rank{rounds})\n\n" + table(
                ["instances", "ranks", "rank, no KD", "rank, KD", "worker, no KD", "worker, KD", "all, no KD",
                 "all, KD", "KD vs no KD", "all, KD: of it the copy's mapped pages", "copy in the page cache, MB "
                 "(once per machine)"], memory_rows))
        text = "\n\n".join(sections)
        print(text)
        if args.record:
            record(text, "## Targets at scale (bench/scale.py)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
