"""Writing a store with dask: one task per shard, a done-marker after the data, resume by skipping sound shards.

zarr 3 loses data silently when two writers touch one shard, so a task always owns whole shards:
it asks a producer for rows [start, stop) of exactly one shard, writes every array's slice of
that shard, and only then writes the shard's done-marker. An interrupted build leaves finished
shards with markers and unfinished ones without; a re-run checks the marked ones (decode,
crc32c, recorded digests) and redoes the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from odkd.dicts import first_difference
from odkd.errors import OdkdError
from odkd.store.schema import SCHEMA_VERSION, StoreLayout, compressors, settings_digest
from odkd.store.store import (
    array_digest, check_shard, clear_shard, for_each_array, is_url, missing_bucket, open_group, read_markers, remove_marker, shard_sizes,
    storage_error, storage_errors, store_exists, store_fs, write_marker,
)

WORKER_START_TIMEOUT = "120s"  # a local worker that has not joined by then did not start
# distributed's loggers in each local worker process, raised to these levels once the worker starts to close.
# A heartbeat still in flight when the worker closes its connections ends in "Failed to communicate with
# scheduler during heartbeat ... CommClosedError: Stream is closed" (distributed.worker, ERROR, with a
# traceback), or when it starts just after, "ConnectionPool is closed" (re-raised into tornado.application):
# races inside distributed's shutdown, after every result is in, that lose nothing.
QUIET_AT_SHUTDOWN = {"distributed.worker": logging.CRITICAL, "tornado.application": logging.CRITICAL}


@dataclass
class ShardTargets:
    """What a producer returns for rows [start, stop): every layout array, the instances it had to skip, and
    how it ran them (for teachers: the precision they got on the worker's device), kept in the shard's marker."""

    arrays: dict[str, np.ndarray]
    failed: list[dict] = field(default_factory=list)
    ran: dict = field(default_factory=dict)


Producer = Callable[[int, int], ShardTargets]


@dataclass(frozen=True)
class BuildSummary:
    url: str
    written: int  # shards written by this run
    skipped: int  # shards already complete and sound
    redone: list[str]  # why marked shards were found unsound and rewritten
    failed: list[dict]  # instances skipped, over the whole store
    complete: bool


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(tree: dict) -> dict:
    return json.loads(json.dumps(tree))


CREATION_CLAIM = "creating.json"  # written with create-only semantics by the one build that creates the store
CREATION_WAIT_S = 120.0  # how long a build waits for another to finish creating the store it shares


def _create(url: str, layout: StoreLayout, attrs: dict, storage_options: dict | None) -> None:
    group = open_group(url, "a", storage_options)  # "a", not "w": "w" would delete the creation claim
    for name, spec in layout.arrays().items():
        group.create_array(
            name, shape=(layout.stored_rows, *spec.tail), dtype=spec.dtype,
            chunks=(layout.chunk_instances, *spec.tail), shards=(layout.shard_instances, *spec.tail),
            compressors=compressors(), fill_value=0, overwrite=True,
        )
    # attributes last: a store without schema_version is one whose creation never finished
    group.update_attributes(attrs)


def _claim_creation(fs, root: str) -> bool:
    """True when this build is the one to create the store at `root`: the claim object is written only if
    none is there (O_EXCL on a disk, If-None-Match on S3), so of two builds started together one wins."""
    fs.makedirs(root, exist_ok=True)
    try:
        with fs.open(f"{root}/{CREATION_CLAIM}", "xb") as claim:
            claim.write(json.dumps({"writer": f"{socket.gethostname()}:{os.getpid()}", "at": utc_now()}).encode())
    except FileExistsError:
        return False
    return True


def _claimed_by_a_dead_process(claim: bytes) -> bool:
    """Whether a creation claim was written by a process of this machine that no longer runs."""
    try:
        host, pid = json.loads(claim)["writer"].rsplit(":", 1)
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


def _created_attrs(url: str, fs, root: str, storage_options: dict | None) -> dict:
    """The attributes of a store that exists or that another build is creating (waited for)."""
    deadline = time.monotonic() + CREATION_WAIT_S
    while True:
        fs.invalidate_cache()  # object stores' listings are cached per process; another build wrote these
        claim = fs.cat_file(f"{root}/{CREATION_CLAIM}") if fs.exists(f"{root}/{CREATION_CLAIM}") else None
        existing = open_group(url, "r", storage_options).attrs.asdict() if store_exists(url, storage_options) else {}
        if "schema_version" in existing:
            return existing
        if claim is None or _claimed_by_a_dead_process(claim):
            raise OdkdError(f"{url}: a store whose creation never finished is there; pass --overwrite to replace it")
        if time.monotonic() > deadline:
            raise OdkdError(f"{url}: another build has been creating this store for {CREATION_WAIT_S:.0f} s "
                            f"({claim.decode(errors='replace')}); if none is running, it was killed: "
                            f"pass --overwrite to replace what it left")
        time.sleep(0.5)


def prepare_store(url: str, layout: StoreLayout, settings: dict, attrs: dict, *, overwrite: bool,
                  storage_options: dict | None = None) -> bool:
    """Create the store, or resume an existing one built with the same settings (True then).

    With `overwrite` an existing store is replaced, whatever its settings. Two builds started together
    into one store agree on one creator; the other waits for the store and resumes it, and both then
    write every shard they find unmarked, the same bytes, so the store ends as one build leaves it.
    """
    fs, root = store_fs(url, storage_options)
    bucket = is_url(url) and missing_bucket(url, storage_options)
    if bucket:  # s3fs would create it, with whatever region and policy the credentials get by default
        raise OdkdError(f"{url}: the bucket {bucket!r} does not exist; create it first or fix the URL")
    wanted = {"schema_version": SCHEMA_VERSION, "layout": layout.to_dict(), "settings": settings}
    if overwrite and (store_exists(url, storage_options) or fs.exists(f"{root}/{CREATION_CLAIM}")):
        fs.rm(root, recursive=True)
    if not store_exists(url, storage_options):
        others = fs.ls(root, detail=False) if fs.exists(root) else []
        if [path for path in others if not str(path).endswith(f"/{CREATION_CLAIM}")]:
            # never delete what is not a zarr store, --overwrite or not: a mistyped --out must not cost a folder
            raise OdkdError(f"{url}: exists and is not a teacher-target store; choose another path")
        if _claim_creation(fs, root):
            try:
                _create(url, layout, {**attrs, **wanted, "settings_digest": settings_digest(settings),
                                      "complete": False, "failed": []}, storage_options)
            finally:
                fs.rm(f"{root}/{CREATION_CLAIM}")
            return False
    existing = _created_attrs(url, fs, root, storage_options)
    diff = first_difference({key: existing.get(key) for key in wanted}, wanted)
    if diff is None:
        return True
    raise OdkdError(f"{url}: a store built with other settings is there ({diff}); pass --overwrite to replace it")


def _check_targets(out: ShardTargets, layout: StoreLayout, start: int, stop: int) -> None:
    specs = layout.arrays()
    if set(out.arrays) != set(specs):
        raise ValueError(f"producer returned arrays {sorted(out.arrays)}, the layout has {sorted(specs)}")
    for name, spec in specs.items():
        values = out.arrays[name]
        if values.shape != (stop - start, *spec.tail) or values.dtype != np.dtype(spec.dtype):
            raise ValueError(f"producer returned {name} {values.dtype}{values.shape} for rows "
                             f"{start}..{stop}, expected {spec.dtype}{(stop - start, *spec.tail)}")


def write_shard(url: str, layout: StoreLayout, shard: int, produce: Producer, digest: str,
                storage_options: dict | None = None) -> dict:
    """Produce and write one whole shard, then its done-marker; returns the marker. Runs on a worker."""
    started, cpu = time.time(), time.process_time()
    start, stop = layout.shard_range(shard)
    out = produce(start, stop)
    _check_targets(out, layout, start, stop)
    fs, root = store_fs(url, storage_options)
    rows = layout.shard_rows(shard)
    padded = {name: np.pad(values, [(0, rows.stop - rows.start - len(values))] + [(0, 0)] * (values.ndim - 1))
              for name, values in out.arrays.items()}
    try:
        group = open_group(url, "r+", storage_options)
        clear_shard(fs, root, group, layout, shard)
        for_each_array(lambda item: group[item[0]].__setitem__(rows, item[1]),
                       {name: (name, values) for name, values in padded.items()})
        marker = {
            "shard": shard, "start": start, "stop": stop, "settings_digest": digest,
            "digests": {name: array_digest(values) for name, values in padded.items()},
            "bytes": shard_sizes(fs, root, group, layout, shard),
            "failed": out.failed, "ran": out.ran, "written_at": utc_now(), "started_at": started,
            "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu,
            "writer": f"{socket.gethostname()}:{os.getpid()}",
        }
        write_marker(fs, root, shard, marker)
    except OSError as exc:
        raise storage_error(url, exc) or OdkdError(f"{url}: writing shard {shard} failed ({exc}); the finished "
                                                   f"shards are kept, run again to resume") from None
    return marker


def _quiet_worker_shutdown():
    """A worker plugin whose teardown, which a worker's close runs before it closes its connections, applies
    QUIET_AT_SHUTDOWN. Built here, not at import, so that importing this module imports no dask (the student
    trainer reads stores through it)."""
    from distributed import WorkerPlugin

    class QuietWorkerShutdown(WorkerPlugin):
        def teardown(self, worker):
            for name, level in QUIET_AT_SHUTDOWN.items():
                logging.getLogger(name).setLevel(level)

    return QuietWorkerShutdown()


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int, worker_envs: list[dict] | None = None):
    """A client on `scheduler`, or on a LocalCluster of `workers` processes of one thread each.

    `worker_envs`, one per local worker (replacing `workers`), are environment variables that its
    process starts with, e.g. its own CUDA_VISIBLE_DEVICES.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise OdkdError(f"cannot reach the dask scheduler at {scheduler} ({exc})") from None
        with client:
            yield client
        return
    envs = worker_envs or [{}] * workers
    # dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which sends each of torch's large CPU
    # temporaries through mmap and page faults: teacher forwards ran 2-3x slower in such workers
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
            LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=logging.ERROR, memory_limit=1 / len(envs)) as cluster:
        # the cluster's own worker spec, once per worker with that worker's environment
        spec = cluster.new_spec
        cluster.worker_spec.update({i: {"cls": spec["cls"], "options": {**spec["options"], "env": env}}
                                    for i, env in enumerate(envs)})
        cluster.scale(len(envs))
        # shut down in an order that cannot race: the client first (this `with`), then the cluster, whose
        # close retires and closes the workers (scale(0)) before it terminates the scheduler; what the
        # workers' own shutdown still says (a last heartbeat) is QUIET_AT_SHUTDOWN's
        with Client(cluster) as client:
            client.register_plugin(_quiet_worker_shutdown(), name="odkd-quiet-shutdown")
            client.wait_for_workers(len(envs), timeout=WORKER_START_TIMEOUT)
            yield client


def _run_shards(todo: list[int], url: str, layout: StoreLayout, produce: Producer, digest: str,
                storage_options: dict | None, scheduler: str | None, workers: int, worker_envs: list[dict] | None,
                on_done: Callable[[dict], None]) -> None:
    if not todo:
        return
    if scheduler == "synchronous":
        for shard in todo:
            on_done(write_shard(url, layout, shard, produce, digest, storage_options))
        return
    from distributed import as_completed

    with dask_client(scheduler, workers, worker_envs) as client:
        # shipped once per worker, not once per task: it can carry a whole split's instance list
        [remote_produce] = client.scatter([produce], broadcast=True, hash=False)
        futures = [client.submit(write_shard, url, layout, shard, remote_produce, digest, storage_options,
                                 pure=False, key=f"odkd-shard-{shard}-{digest}")
                   for shard in todo]
        try:
            for future in as_completed(futures):
                on_done(future.result())
        finally:
            client.cancel(futures)


def build_store(url: str, layout: StoreLayout, settings: dict, produce: Producer, *, attrs: dict | None = None,
                scheduler: str | None = None, workers: int = 1, worker_envs: list[dict] | None = None,
                overwrite: bool = False, storage_options: dict | None = None, progress: bool = True,
                desc: str = "teacher targets") -> BuildSummary:
    """Fill the store at `url` with `produce`, shard by shard, resuming what an earlier run left.

    `settings` is everything that decides the contents; a store made with other settings is
    refused unless `overwrite`. `scheduler` is a dask address, "synchronous" (in this process,
    for memory:// stores and debugging) or None for a LocalCluster of `workers` processes (one per
    entry of `worker_envs` when given: the environment variables that worker starts with).
    """
    url = str(url).rstrip("/") if is_url(url) else os.path.abspath(url)  # workers may run elsewhere
    with storage_errors(url):
        if url.startswith("memory://") and scheduler != "synchronous":
            raise OdkdError(f"{url}: a memory:// store lives in one process; build it with scheduler='synchronous'")
        settings = _jsonable(settings)
        digest = settings_digest(settings)
        prepare_store(url, layout, settings, _jsonable(attrs or {}), overwrite=overwrite,
                      storage_options=storage_options)

        fs, root = store_fs(url, storage_options)
        group = open_group(url, "r", storage_options)
        markers = read_markers(fs, root, layout.num_shards)
        redone = []
        for shard, marker in sorted(markers.items()):
            problem = (f"shard {shard}: written with other settings" if marker.get("settings_digest") != digest
                       else check_shard(group, layout, shard, marker))
            if problem:
                redone.append(problem)
                remove_marker(fs, root, shard)
                del markers[shard]
        todo = [shard for shard in range(layout.num_shards) if shard not in markers]
        done_rows = sum(m["stop"] - m["start"] for m in markers.values())

        with tqdm(total=layout.num_instances, initial=done_rows, unit="inst", desc=desc, disable=not progress,
                  dynamic_ncols=True) as bar:
            _run_shards(todo, url, layout, produce, digest, storage_options, scheduler, workers, worker_envs,
                        lambda marker: bar.update(marker["stop"] - marker["start"]))

        markers = read_markers(fs, root, layout.num_shards)
        failed = sorted((f for m in markers.values() for f in m.get("failed", [])), key=lambda f: f["index"])
        complete = len(markers) == layout.num_shards
        open_group(url, "r+", storage_options).update_attributes(
            {"complete": complete, "failed": failed, "finished_at": utc_now()})
        return BuildSummary(url=url, written=len(todo), skipped=layout.num_shards - len(todo), redone=redone,
                            failed=failed, complete=complete)
