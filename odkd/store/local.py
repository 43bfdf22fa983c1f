"""A store's rows, copied once per machine into read-only files that every rank and loader worker reads.

A student run reads a few rows per sample, in the loader worker that makes the sample. zarr answers a
row by decoding its whole chunk, and holding the unpacked arrays in each process costs 13.5 KB an
instance per rank (2 GB for COCO train, times the GPUs of a machine). So the first run on a machine
reads the store once, shard by shard (a URL is fetched once, with plain GETs), checks every shard
against the digests its writer recorded, and writes the arrays a run needs into a folder keyed by the
store's identity: the packed maps compressed row by row (zstd: a row decodes in ~15 us and keeps the
store's few hundred bytes an instance), the small arrays as they are. Every process reads its rows
with positional reads (pread) on files it opens itself, never a memory map: the files' pages then live
only in the kernel's page cache, once per machine, evictable, and in no process's resident memory
(a map would make every page an epoch touches resident in each process that maps it, conf and meta
rows included). Later runs start at once.

A copy is written into a temporary folder and renamed into place under a lock, so an interrupted copy
is never read and concurrent ranks copy once. A store rebuilt under the same path has other
attributes and digests, so it gets another folder: a copy never serves stale rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numcodecs
import numpy as np
from tqdm import tqdm

from odkd.errors import OdkdError
from odkd.store.reader import TeacherTargets
from odkd.store.store import ShardError, open_group, read_checked_shard, shard_paths, storage_errors, store_fs

log = logging.getLogger(__name__)

LOCAL_COPIES_ENV = "ODKD_LOCAL_COPIES"
# arrays of this many bytes a row or more are compressed row by row; smaller ones (conf, meta) stay raw
COMPRESS_ROW_BYTES = 256
_ZSTD = numcodecs.Zstd(level=3)
_OFFSET_DTYPE = np.dtype("<i8")  # offsets.npy's on any machine, so that _OFFSET_PAIR reads two of them
_OFFSET_PAIR = struct.Struct("<2q")


def local_copies_root() -> Path:
    """Where local copies live: $ODKD_LOCAL_COPIES, else $XDG_CACHE_HOME/odkd/local-copies (~/.cache/...)."""
    if os.environ.get(LOCAL_COPIES_ENV):
        return Path(os.environ[LOCAL_COPIES_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "odkd" / "local-copies"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _array_folder(name: str) -> str:
    return name.replace("/", "-")


class LocalRows:
    """Rows of the named arrays of one store, from its local copy: `row(i)` is instance i's rows."""

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], str]], map_size: tuple[int, int],
                 identity: dict):
        self.folder = Path(folder)
        self.identity = identity  # the identity of the store copied (TeacherTargets.identity)
        self.specs = specs  # name -> (row shape, dtype)
        self.map_size = tuple(map_size)  # (width, height) of the stored maps
        self._readers: dict[str, _RawRowsReader | _CompressedRowsReader] = {}
        self._pid: int | None = None  # the process that opened _readers
        self._count = 0  # instances in the copy, from the files' headers

    @classmethod
    def fetch(cls, targets: TeacherTargets, names, root: Path | None = None) -> "LocalRows":
        """The local copy of `names` from the store `targets`, made first if this machine has none."""
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
            with open(root / f"{folder.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                missing = [n for n in wanted if not (folder / _array_folder(n)).is_dir()]
                if missing:
                    with storage_errors(targets.url):
                        _copy(targets, markers, missing, folder, identity)
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
                sub = self.folder / _array_folder(name)
                readers[name] = (_RawRowsReader(sub) if (sub / "rows.npy").exists()
                                 else _CompressedRowsReader(sub, tail, np.dtype(dtype)))
            self._readers, self._pid = readers, os.getpid()
            self._count = min((reader.rows for reader in readers.values()), default=0)
        return self._readers

    def row(self, index: int) -> dict[str, np.ndarray]:
        readers = self._open()
        if not 0 <= index < self._count:
            raise IndexError(f"instance {index} is outside the {self._count} of {self.folder}")
        return {name: reader.row(index) for name, reader in readers.items()}

    def __getstate__(self):
        # a spawned loader worker opens the files itself rather than receiving them pickled
        return {**self.__dict__, "_readers": {}, "_pid": None}


def _copy(targets: TeacherTargets, markers: dict[int, dict], names: list[str], folder: Path, identity: dict) -> None:
    """Write `names` into `folder`, each array through a temporary folder renamed into place."""
    layout, url = targets.layout, targets.url
    for stale in folder.glob("*.partial-*"):  # left by a copy that was killed: the lock says none is running
        shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "store.json").write_text(json.dumps(identity, indent=1) + "\n")
    group = open_group(url, "r", targets.storage_options)
    fs, root = store_fs(url, targets.storage_options)
    specs = layout.arrays()
    n = layout.num_instances
    log.info("copying %s (%s) into %s, once for this machine", url, ", ".join(names), folder)
    partial = {name: Path(tempfile.mkdtemp(prefix=f"{_array_folder(name)}.partial-", dir=folder)) for name in names}
    try:
        writers = {}
        for name in names:
            tail, dtype = specs[name].tail, np.dtype(specs[name].dtype)
            compress = int(np.prod(tail)) * dtype.itemsize >= COMPRESS_ROW_BYTES
            writers[name] = (_CompressedRowsWriter if compress else _RawRowsWriter)(partial[name], n, tail, dtype)
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
            os.rename(partial[name], folder / _array_folder(name))
    finally:
        for path in partial.values():
            shutil.rmtree(path, ignore_errors=True)


class _RawRowsWriter:
    """rows.npy: the rows as they are, one .npy array, filled in order."""

    def __init__(self, folder: Path, rows: int, tail: tuple[int, ...], dtype: np.dtype):
        self.rows = np.lib.format.open_memmap(folder / "rows.npy", mode="w+", dtype=dtype, shape=(rows, *tail))
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        self.rows[self.count:self.count + len(values)] = values
        self.count += len(values)

    def close(self) -> None:
        self.rows.flush()


class _CompressedRowsWriter:
    """rows.zst (every row zstd-compressed, end to end) and offsets.npy (row i is bytes offsets[i]:offsets[i+1])."""

    def __init__(self, folder: Path, rows: int, tail: tuple[int, ...], dtype: np.dtype):
        self.folder = folder
        self.file = open(folder / "rows.zst", "wb")
        self.offsets = np.zeros(rows + 1, _OFFSET_DTYPE)
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        for value in values:
            blob = _ZSTD.encode(np.ascontiguousarray(value))
            self.file.write(blob)
            self.offsets[self.count + 1] = self.offsets[self.count] + len(blob)
            self.count += 1

    def close(self) -> None:
        self.file.close()
        np.save(self.folder / "offsets.npy", self.offsets)


def _open_npy(path: Path) -> tuple:
    """(the .npy file opened read-only and unbuffered, where its data starts, its shape, its dtype)."""
    file = open(path, "rb", buffering=0)
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(file)
    return file, file.tell(), shape, dtype


def _pread(file, size: int, offset: int) -> bytes:
    """`size` bytes of `file` at `offset`, by one positional read: no map, no file position shared with a fork."""
    data = os.pread(file.fileno(), size, offset)
    if len(data) != size:
        raise OdkdError(f"{file.name}: cut short before byte {offset + size}; delete its local copy "
                        f"({Path(file.name).parent.parent}) to have the next run copy it again")
    return data


class _RawRowsReader:
    """Rows from a _RawRowsWriter's rows.npy, one read a row."""

    def __init__(self, folder: Path):
        self.file, self.start, (self.rows, *tail), self.dtype = _open_npy(folder / "rows.npy")
        self.tail = tuple(tail)
        self.row_bytes = int(np.prod(self.tail)) * self.dtype.itemsize

    def row(self, index: int) -> np.ndarray:
        data = _pread(self.file, self.row_bytes, self.start + index * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.tail).copy()


class _CompressedRowsReader:
    """Rows from a _CompressedRowsWriter's files: a row's two offsets read, then its bytes read and decoded."""

    def __init__(self, folder: Path, tail: tuple[int, ...], dtype: np.dtype):
        self.offsets, self.offsets_start, (ends,), _ = _open_npy(folder / "offsets.npy")
        self.blob = open(folder / "rows.zst", "rb", buffering=0)
        self.rows, self.tail, self.dtype = ends - 1, tail, dtype

    def row(self, index: int) -> np.ndarray:
        at = self.offsets_start + _OFFSET_DTYPE.itemsize * index
        start, stop = _OFFSET_PAIR.unpack(_pread(self.offsets, _OFFSET_PAIR.size, at))
        return _ZSTD.decode(_pread(self.blob, stop - start, start), out=np.empty(self.tail, self.dtype))
