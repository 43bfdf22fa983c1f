"""A store's rows, copied once per machine into read-only files that every rank and loader worker reads.

A student run reads a few rows per sample, in the loader worker that makes the sample. zarr answers a
row by decoding its whole chunk, and holding the unpacked arrays in each process costs 13.5 KB an
instance per rank (2 GB for COCO train, times the GPUs of a machine). So the first run on a machine
reads the store once, shard by shard (a URL is fetched once, with plain GETs), checks every shard
against the digests its writer recorded, and writes the arrays a run needs into a folder keyed by the
store's identity (the files of one array: odkd/store/rowfiles.py). Every process reads its rows with
positional reads (pread) on files it opens itself, never a memory map: the files' pages then live only
in the kernel's page cache, once per machine, evictable, and in no process's resident memory. Later
runs start at once.

Nothing on a disk is trusted for being there: every run checks each array it uses (presence, sizes,
SHA-256, the offsets inside their file) before it writes anything, and an array that fails is removed
and copied again, with one line saying so; every row is checked again as it is read (CRC32 or zstd's
checksum), so a byte that goes bad during a run stops it in one line naming the copy. A copy is
written into a temporary folder, with its room reserved first, and renamed into place under a lock,
so an interrupted copy is never read and concurrent ranks copy once; a run holds a shared lock on the
copy while it lives, so `odkd cache copies --prune` never removes a copy in use. A store rebuilt under
the same path has other attributes and digests, so it gets another folder: a copy never serves stale rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from odkd.errors import OdkdError
from odkd.store.reader import TeacherTargets
from odkd.store.rowfiles import (
    NO_SPACE, CompressedRowsReader, CompressedRowsWriter, CopyDamaged, RawRowsReader, RawRowsWriter, check_array,
    compressed, record_dtype,
)
from odkd.store.store import ShardError, open_group, read_checked_shard, shard_paths, storage_errors, store_fs

log = logging.getLogger(__name__)

LOCAL_COPIES_ENV = "ODKD_LOCAL_COPIES"
COPY_WAIT_ENV = "ODKD_LOCAL_COPY_WAIT"  # seconds a run waits for another process's copy (default an hour)
DEFAULT_COPY_WAIT_S = 3600.0
# a row compressed alone takes about 1.7x its share of the store's chunk-compressed object: room is
# reserved for twice that, and the copy checks the disk has it before writing
COPY_BYTES_PER_STORE_BYTE = 2.0
SHARED_DIR_MODE = 0o755
SHARED_LOCK_MODE = 0o666  # any user's run takes the locks of a copy on a shared ODKD_LOCAL_COPIES
_IN_USE: dict[Path, object] = {}  # folder -> this process's open .use file, its shared lock held for life
_CHECKED: set[tuple[Path, str]] = set()  # (folder, array) this process has checked


def local_copies_root() -> Path:
    """Where local copies live: $ODKD_LOCAL_COPIES, else $XDG_CACHE_HOME/odkd/local-copies (~/.cache/...)."""
    if os.environ.get(LOCAL_COPIES_ENV):
        return Path(os.environ[LOCAL_COPIES_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "odkd" / "local-copies"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_folder(name: str) -> str:
    return name.replace("/", "-")


def lock_file(folder: Path, kind: str):
    """`folder`.`kind` (lock: held while a copy is made; use: shared by every run that reads it), opened for
    writing where this user may and read-only where not (flock takes either), created open to all users."""
    path = folder.parent / f"{folder.name}.{kind}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, SHARED_LOCK_MODE)
        try:
            os.fchmod(fd, SHARED_LOCK_MODE)
        except PermissionError:  # another user's file
            pass
        return os.fdopen(fd, "r+b")
    except PermissionError:
        return open(path, "rb")


def _hold_in_use(folder: Path) -> None:
    """A shared lock on `folder`.use for the rest of this process's life (its loader workers inherit it)."""
    if folder not in _IN_USE:
        use = lock_file(folder, "use")
        fcntl.flock(use, fcntl.LOCK_SH)
        _IN_USE[folder] = use


def copy_owner(folder: Path) -> str:
    """Who is making the copy in `folder`, as its .owner file says."""
    try:
        owner = json.loads((folder.parent / f"{folder.name}.owner").read_text())
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _wait_for_copy_lock(lock, folder: Path, url: str) -> None:
    """The copy lock of `folder`, waiting (with one line saying for whom) while another process copies."""
    limit = float(os.environ.get(COPY_WAIT_ENV) or DEFAULT_COPY_WAIT_S)
    deadline, told = time.monotonic() + limit, False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not told:
                log.warning("waiting for %s, which is copying %s into %s", copy_owner(folder), url, folder)
                told = True
            if time.monotonic() > deadline:
                raise OdkdError(f"{folder}: waited {limit:.0f} s for {copy_owner(folder)} to finish copying {url}; "
                                f"if it is stuck, stop it (set {COPY_WAIT_ENV} to wait longer)") from None
            time.sleep(0.5)


class LocalRows:
    """Rows of the named arrays of one store, from its local copy: `row(i)` is instance i's rows."""

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], str]], map_size: tuple[int, int],
                 identity: dict):
        self.folder = Path(folder)
        self.identity = identity  # the identity of the store copied (TeacherTargets.identity)
        self.specs = specs  # name -> (row shape, dtype)
        self.map_size = tuple(map_size)  # (width, height) of the stored maps
        self._readers: dict[str, RawRowsReader | CompressedRowsReader] = {}
        self._pid: int | None = None  # the process that opened _readers
        self._count = 0  # instances in the copy, from the files' headers

    @classmethod
    def fetch(cls, targets: TeacherTargets, names, root: Path | None = None) -> "LocalRows":
        """The local copy of `names` from the store `targets`: checked, and made (again) where this machine
        has none or a damaged one."""
        specs = targets.layout.arrays()
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise OdkdError(f"{targets.url}: no arrays {unknown}; it has {sorted(specs)}")
        _, store_root = store_fs(targets.url, targets.storage_options)
        markers, identity = targets.markers(), targets.identity()
        key = _digest({"identity": {**identity, "url": None}, "layout": targets.attrs["layout"]})
        root = Path(root) if root is not None else local_copies_root()
        folder = root / f"{Path(store_root).name}-{key}"
        wanted = sorted(set(names))
        try:
            root.mkdir(parents=True, exist_ok=True)
            _hold_in_use(folder)
            with lock_file(folder, "lock") as lock:
                _wait_for_copy_lock(lock, folder, targets.url)
                missing = [name for name in wanted
                           if not _sound(folder, name, specs[name], targets.layout.num_instances, targets.url)]
                if missing:
                    with storage_errors(targets.url):
                        _copy(targets, markers, missing, folder, identity)
                (folder / "store.json").touch()  # when it was last used, for odkd cache copies --prune
        except OSError as exc:
            raise OdkdError(f"{root}: cannot write the local copy of {targets.url} ({exc.strerror or exc}); "
                            f"set {LOCAL_COPIES_ENV} to a writable local folder") from None
        return cls(folder, {n: (specs[n].tail, specs[n].dtype) for n in wanted}, targets.layout.map_size, identity)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def _open(self) -> dict:
        # a forked loader worker inherits its parent's readers: it opens its own, and its inherited
        # descriptors close with the readers it drops
        if self._pid != os.getpid():
            readers = {}
            for name, (tail, dtype) in self.specs.items():
                sub = self.folder / array_folder(name)
                readers[name] = (CompressedRowsReader(sub, tail, np.dtype(dtype)) if compressed(tail, dtype)
                                 else RawRowsReader(sub))
            self._readers, self._pid = readers, os.getpid()
            self._count = min((reader.rows for reader in readers.values()), default=0)
        return self._readers

    def row(self, index: int) -> dict[str, np.ndarray]:
        readers = self._open()
        if not 0 <= index < self._count:
            raise IndexError(f"instance {index} is outside the {self._count} of {self.folder}")
        rows = {}
        for name, reader in readers.items():
            try:
                rows[name] = reader.row(index)
            except CopyDamaged as exc:
                raise OdkdError(f"{self.folder / array_folder(name)}: {exc}: this local copy went bad on its disk "
                                f"during the run; run again, and the check at start copies it anew") from None
        return rows

    def __getstate__(self):
        # a spawned loader worker opens the files itself rather than receiving them pickled
        return {**self.__dict__, "_readers": {}, "_pid": None}


def _sound(folder: Path, name: str, spec, rows: int, url: str) -> bool:
    """Whether `folder` holds a sound copy of array `name`; a damaged one is removed, with one line saying so."""
    sub = folder / array_folder(name)
    if not sub.is_dir():
        return False
    if (folder, name) in _CHECKED:
        return True
    problem = check_array(sub, rows, spec.tail, spec.dtype)
    if problem:
        log.warning("%s: %s; copying %s again from %s", sub, problem, name, url)
        shutil.rmtree(sub)
        return False
    _CHECKED.add((folder, name))
    return True


def copy_bytes(targets: TeacherTargets, markers: dict[int, dict], names: list[str]) -> dict[str, int]:
    """Bytes each array's copy is given on the disk: raw rows exactly, compressed rows estimated from the store."""
    specs, n = targets.layout.arrays(), targets.layout.num_instances
    sizes = {}
    for name in names:
        tail, dtype = specs[name].tail, specs[name].dtype
        if compressed(tail, dtype):
            stored = sum(m.get("bytes", {}).get(name, 0) for m in markers.values())
            sizes[name] = int(COPY_BYTES_PER_STORE_BYTE * stored) + 8 * (n + 1) + 4096
        else:
            sizes[name] = n * record_dtype(tail, dtype).itemsize + 4096
    return sizes


def _copy(targets: TeacherTargets, markers: dict[int, dict], names: list[str], folder: Path, identity: dict) -> None:
    """Write `names` into `folder`, each array through a temporary folder renamed into place."""
    layout, url = targets.layout, targets.url
    for stale in folder.glob("*.partial-*"):  # left by a copy that was killed: the lock says none is running
        shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(SHARED_DIR_MODE)
    (folder / "store.json").write_text(json.dumps(identity, indent=1) + "\n")
    (folder / "store.json").chmod(0o644)
    sizes = copy_bytes(targets, markers, names)
    needed, free = sum(sizes.values()), shutil.disk_usage(folder).free
    if needed > free:
        raise OdkdError(_no_room(folder, url, needed, free))
    owner = folder.parent / f"{folder.name}.owner"
    owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    group = open_group(url, "r", targets.storage_options)
    fs, root = store_fs(url, targets.storage_options)
    specs = layout.arrays()
    log.info("copying %s (%s) into %s, once for this machine", url, ", ".join(names), folder)
    partial = {name: Path(tempfile.mkdtemp(prefix=f"{array_folder(name)}.partial-", dir=folder)) for name in names}
    try:
        writers = {}
        for name in names:
            tail, dtype = specs[name].tail, np.dtype(specs[name].dtype)
            writers[name] = (CompressedRowsWriter(partial[name], layout.num_instances, tail, dtype, sizes[name])
                             if compressed(tail, dtype) else RawRowsWriter(partial[name], layout.num_instances, tail, dtype))
        for shard in tqdm(range(layout.num_shards), desc="local copy", unit="shard", leave=False):
            start, stop = layout.shard_range(shard)
            for name in names:
                try:
                    values = read_checked_shard(group, layout, shard, markers.get(shard, {}), name)
                except ShardError as exc:
                    obj = shard_paths(root, group, layout, shard)[name]
                    raise OdkdError(f"{url}: {name} shard {shard} ({obj}) is damaged: {exc}; "
                                    f"`odkd cache verify {url}` lists every damaged shard") from None
                writers[name].extend(values[: stop - start])
        for name in names:
            writers[name].close()
            partial[name].chmod(SHARED_DIR_MODE)
            os.rename(partial[name], folder / array_folder(name))
            _CHECKED.add((folder, name))
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise OdkdError(_no_room(folder, url, needed, shutil.disk_usage(folder).free)) from None
        raise
    finally:
        for path in partial.values():
            shutil.rmtree(path, ignore_errors=True)
        owner.unlink(missing_ok=True)


def _no_room(folder: Path, url: str, needed: int, free: int) -> str:
    return (f"{folder}: the local copy of {url} needs about {needed / 1e6:.1f} MB and its disk has "
            f"{free / 1e6:.1f} MB free; make room, or set {LOCAL_COPIES_ENV} to a local disk that has it")
