"""The files of one array in a local copy: written once with room reserved first, checked whole before a run
uses them, and checked row by row as they are read.

An array's folder holds its rows in one of two forms, and `manifest.json`, written last: the row count
and every file's size and SHA-256.
- `rows.npy`: small rows (conf, meta) as they are, one record a row: the row's bytes, then the CRC32 of
  those bytes (a structured .npy any numpy reads).
- `rows.zst` + `offsets.npy`: large rows (the packed maps), each its own zstd frame with zstd's content
  checksum; row i is bytes offsets[i]:offsets[i+1] of rows.zst.
A row is one positional read (pread) on a file each process opens for itself, never a memory map.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numcodecs
import numpy as np

FORMAT = 2  # copies of another format are made again
MANIFEST = "manifest.json"
# arrays of this many bytes a row or more are compressed row by row; smaller ones (conf, meta) stay raw
COMPRESS_ROW_BYTES = 256
_ZSTD = numcodecs.Zstd(level=3, checksum=True)
_OFFSET_DTYPE = np.dtype("<i8")  # offsets.npy's on any machine, so that _OFFSET_PAIR reads two of them
_OFFSET_PAIR = struct.Struct("<2q")
_CRC = struct.Struct("<I")
FILE_MODE = 0o644  # a copy on a shared ODKD_LOCAL_COPIES is read by other users' runs
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CopyDamaged(Exception):
    """Why a local copy's file or row cannot be trusted."""


def compressed(tail: tuple[int, ...], dtype) -> bool:
    return int(np.prod(tail)) * np.dtype(dtype).itemsize >= COMPRESS_ROW_BYTES


def record_dtype(tail: tuple[int, ...], dtype) -> np.dtype:
    return np.dtype([("row", np.dtype(dtype), tuple(tail)), ("crc32", "<u4")])


def reserve(file, size: int) -> None:
    """Allocate `size` bytes of `file` on the disk now, so that a full disk shows before the copy is written
    rather than as a SIGBUS or a short file later; filesystems without fallocate are written as they come."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, rows: int, tail: tuple[int, ...], dtype) -> None:
    files = {path.name: {"bytes": path.stat().st_size, "sha256": file_digest(path)}
             for path in sorted(folder.iterdir()) if path.name != MANIFEST}
    for path in folder.iterdir():
        path.chmod(FILE_MODE)
    manifest = {"format": FORMAT, "rows": rows, "tail": list(tail), "dtype": np.dtype(dtype).str, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (folder / MANIFEST).chmod(FILE_MODE)


class RawRowsWriter:
    """rows.npy: one record a row (the row, its CRC32), written in order with plain writes into reserved space."""

    def __init__(self, folder: Path, rows: int, tail: tuple[int, ...], dtype: np.dtype):
        self.folder, self.rows, self.tail, self.row_dtype = folder, rows, tail, dtype
        self.dtype = record_dtype(tail, dtype)
        self.file = open(folder / "rows.npy", "wb")
        np.lib.format.write_array_header_2_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": (rows,)})
        reserve(self.file, self.file.tell() + rows * self.dtype.itemsize)

    def extend(self, values: np.ndarray) -> None:
        records = np.empty(len(values), self.dtype)
        records["row"] = values
        records["crc32"] = [zlib.crc32(np.ascontiguousarray(value).tobytes()) for value in values]
        self.file.write(records.tobytes())

    def close(self) -> None:
        self.file.close()
        _write_manifest(self.folder, self.rows, self.tail, self.row_dtype)


class CompressedRowsWriter:
    """rows.zst (every row its own checksummed zstd frame, end to end) and offsets.npy."""

    def __init__(self, folder: Path, rows: int, tail: tuple[int, ...], dtype: np.dtype, expected_bytes: int):
        self.folder, self.rows, self.tail, self.dtype = folder, rows, tail, dtype
        self.file = open(folder / "rows.zst", "wb")
        reserve(self.file, expected_bytes)
        self.offsets = np.zeros(rows + 1, _OFFSET_DTYPE)
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        for value in values:
            blob = _ZSTD.encode(np.ascontiguousarray(value))
            self.file.write(blob)
            self.offsets[self.count + 1] = self.offsets[self.count] + len(blob)
            self.count += 1

    def close(self) -> None:
        self.file.truncate(int(self.offsets[self.count]))  # the reservation was an estimate
        self.file.close()
        np.save(self.folder / "offsets.npy", self.offsets)
        _write_manifest(self.folder, self.rows, self.tail, self.dtype)


def _npy_header(path: Path) -> tuple:
    """(where the data starts, shape, dtype) of a .npy file."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(file)
        return file.tell(), shape, dtype


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def check_array(folder: Path, rows: int, tail: tuple[int, ...], dtype) -> str | None:
    """Why the array folder cannot be used as `rows` rows of `tail` `dtype` (None when it can): its
    manifest, every file's presence, size and SHA-256, and the layout inside the files."""
    try:
        manifest = read_manifest(folder)
        if (manifest.get("format"), manifest.get("rows"), manifest.get("tail"), manifest.get("dtype")) != \
                (FORMAT, rows, list(tail), np.dtype(dtype).str):
            return (f"made by another odkd or for another layout (format {manifest.get('format')}, "
                    f"{manifest.get('rows')} rows of {manifest.get('tail')} {manifest.get('dtype')})")
        files = manifest["files"]
        want = {"rows.zst", "offsets.npy"} if compressed(tail, dtype) else {"rows.npy"}
        if set(files) != want:
            return f"holds {sorted(files)}, not {sorted(want)}"
        for name, entry in files.items():
            size = (folder / name).stat().st_size
            if size != entry["bytes"]:
                return f"{name} is {size} bytes, its manifest says {entry['bytes']}"
            if file_digest(folder / name) != entry["sha256"]:
                return f"{name} differs from the SHA-256 its manifest records"
        if "rows.npy" in files:
            _, shape, got = _npy_header(folder / "rows.npy")
            if shape != (rows,) or got != record_dtype(tail, dtype):
                return f"rows.npy holds {shape} {got}, not {rows} rows of {tail} {np.dtype(dtype)}"
        else:
            offsets = np.load(folder / "offsets.npy")
            blob = files["rows.zst"]["bytes"]
            if offsets.shape != (rows + 1,) or offsets[0] != 0 or offsets[-1] != blob or (np.diff(offsets) < 0).any():
                return "offsets.npy does not cut rows.zst into its rows"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def _pread(file, size: int, offset: int) -> bytes:
    """`size` bytes of `file` at `offset`, by one positional read: no map, no file position shared with a fork."""
    data = os.pread(file.fileno(), size, offset)
    if len(data) != size:
        raise CopyDamaged(f"{Path(file.name).name} cut short before byte {offset + size}")
    return data


class RawRowsReader:
    """Rows of a RawRowsWriter's rows.npy, one read a row, each checked against its CRC32."""

    def __init__(self, folder: Path):
        self.start, (self.rows,), dtype = _npy_header(folder / "rows.npy")
        self.file = open(folder / "rows.npy", "rb", buffering=0)
        self.tail, self.dtype = dtype["row"].shape, dtype["row"].base
        self.record_bytes = dtype.itemsize
        self.row_bytes = self.record_bytes - _CRC.size

    def row(self, index: int) -> np.ndarray:
        data = _pread(self.file, self.record_bytes, self.start + index * self.record_bytes)
        if zlib.crc32(data[:self.row_bytes]) != _CRC.unpack_from(data, self.row_bytes)[0]:
            raise CopyDamaged(f"rows.npy row {index} fails its CRC32")
        return np.frombuffer(data, self.dtype, count=int(np.prod(self.tail))).reshape(self.tail).copy()


class CompressedRowsReader:
    """Rows of a CompressedRowsWriter's files: a row's two offsets read, then its frame read, checked and decoded."""

    def __init__(self, folder: Path, tail: tuple[int, ...], dtype: np.dtype):
        self.offsets_start, (ends,), _ = _npy_header(folder / "offsets.npy")
        self.offsets = open(folder / "offsets.npy", "rb", buffering=0)
        self.blob = open(folder / "rows.zst", "rb", buffering=0)
        self.blob_bytes = os.fstat(self.blob.fileno()).st_size
        self.rows, self.tail, self.dtype = ends - 1, tail, dtype
        self.frame_limit = 2 * int(np.prod(tail)) * dtype.itemsize + 128  # above zstd's bound for one row

    def row(self, index: int) -> np.ndarray:
        at = self.offsets_start + _OFFSET_DTYPE.itemsize * index
        start, stop = _OFFSET_PAIR.unpack(_pread(self.offsets, _OFFSET_PAIR.size, at))
        if not 0 <= start <= stop <= self.blob_bytes or stop - start > self.frame_limit:
            raise CopyDamaged(f"offsets.npy gives row {index} bytes {start}..{stop} of a "
                              f"{self.blob_bytes}-byte rows.zst")
        try:
            return _ZSTD.decode(_pread(self.blob, stop - start, start), out=np.empty(self.tail, self.dtype))
        except CopyDamaged:
            raise
        except Exception as exc:  # zstd's checksum, a bad frame, a frame of another size
            raise CopyDamaged(f"rows.zst row {index} does not decode ({exc})") from None
