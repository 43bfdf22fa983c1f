"""Where a store lives: its zarr group, its per-shard done-markers, and the check of one shard.

A store is a local path or an fsspec URL. zarr reads and writes the arrays; fsspec reads and
writes the small JSON done-markers next to them (`done/000012.json`), one per shard, each
written by the task that owns the shard and only after its data. Nothing is ever renamed,
appended to or locked, so a store works the same on a disk and on object storage (S3), where
each object is written whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import zarr

from odkd.errors import OdkdError
from odkd.store.schema import StoreLayout

MARKER_DIR = "done"


def is_url(url: str) -> bool:
    return "://" in str(url)


def store_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, root path) of a store."""
    url = str(url).rstrip("/")
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    url = str(url).rstrip("/")
    kwargs = {"storage_options": storage_options} if is_url(url) and storage_options else {}
    return zarr.open_group(url, mode=mode, **kwargs)


def store_exists(url: str, storage_options: dict | None = None) -> bool:
    fs, root = store_fs(url, storage_options)
    return fs.exists(f"{root}/zarr.json")


# fsspec filesystems whose first path component is a bucket that must exist before anything is written
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")
# transport errors by class name: botocore and aiohttp are optional, so their classes are not imported
NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                  "ProfileNotFound", "InvalidConfigError")
NO_ANSWER = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
             "ServerDisconnectedError", "ConnectionError", "TimeoutError")


def missing_bucket(url: str, storage_options: dict | None = None) -> str | None:
    """The bucket of an object-storage URL when it does not exist, else None."""
    fs, root = store_fs(url, storage_options)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if not set(protocols) & set(BUCKET_PROTOCOLS):
        return None
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)  # not fs.exists, which answers False for missing credentials and denied access too
    except FileNotFoundError:
        return bucket
    return None


def storage_error(url: str, exc: BaseException) -> OdkdError | None:
    """What a failure to reach the storage under `url` means to a user and what to do, or None when
    `exc` is not such a failure."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if kinds & set(NO_CREDENTIALS):
        return OdkdError(f"{url}: no credentials to reach it ({reason}); set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (docs/scaling.md, \"A store on S3\")")
    if isinstance(exc, PermissionError):
        return OdkdError(f"{url}: access denied ({reason}); check that the credentials in AWS_* or AWS_PROFILE "
                         f"may read this bucket (and, to build, write it)")
    if isinstance(exc, FileNotFoundError) and "bucket" in reason.lower():
        return OdkdError(f"{url}: the bucket does not exist ({reason}); create it first or fix the URL")
    if kinds & set(NO_ANSWER):
        return OdkdError(f"{url}: the storage does not answer ({reason}); check the endpoint "
                         f"(AWS_ENDPOINT_URL, or endpoint_url in [cache] storage_options) and the network")
    return None


@contextlib.contextmanager
def storage_errors(url: str):
    """Failures to reach the storage of `url` (credentials, access, bucket, endpoint) as one OdkdError line."""
    try:
        yield
    except OdkdError:
        raise
    except Exception as exc:
        error = storage_error(url, exc)
        if error is None:
            raise
        raise error from None


def read_attrs(url: str, storage_options: dict | None = None) -> dict:
    """The store's attributes; an OdkdError naming the URL when it is not an odkd store."""
    fs, root = store_fs(url, storage_options)
    try:
        # one plain request first: when the storage cannot be reached, zarr's concurrent probes of the
        # group's keys leave coroutines behind whose tracebacks print as the process exits
        fs.info(f"{root}/zarr.json")
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        bucket = is_url(url) and missing_bucket(url, storage_options)
        if bucket:
            raise OdkdError(f"{url}: the bucket {bucket!r} does not exist; fix the URL") from None
        raise OdkdError(f"{url}: no teacher-target store there") from None
    attrs = group.attrs.asdict()
    if "schema_version" not in attrs:
        raise OdkdError(f"{url}: a zarr group, but not an odkd teacher-target store (no schema_version)")
    return attrs


def store_identity(url: str, attrs: dict, markers: dict[int, dict]) -> dict:
    """Who taught from a store: its URL, dataset fingerprint, teachers' fingerprints, a digest of its
    settings and one of its contents (the digests its writer recorded for every shard, from `markers`)."""
    contents = json.dumps({str(s): m.get("digests") for s, m in sorted(markers.items())}, sort_keys=True)
    return {
        "url": url,
        "dataset_fingerprint": attrs.get("settings", {}).get("dataset_fingerprint"),
        "teachers": {key: t.get("fingerprint") for key, t in sorted(attrs.get("teachers", {}).items())},
        "settings_digest": attrs.get("settings_digest"),
        "content_digest": hashlib.sha256(contents.encode()).hexdigest()[:16],
    }


def marker_path(root: str, shard: int) -> str:
    return f"{root}/{MARKER_DIR}/{shard:06d}.json"


def write_marker(fs, root: str, shard: int, marker: dict) -> None:
    fs.makedirs(f"{root}/{MARKER_DIR}", exist_ok=True)
    fs.pipe_file(marker_path(root, shard), json.dumps(marker, sort_keys=True).encode())


def remove_marker(fs, root: str, shard: int) -> None:
    try:
        fs.rm(marker_path(root, shard))
    except FileNotFoundError:
        pass


def read_markers(fs, root: str, num_shards: int) -> dict[int, dict]:
    """The done-markers present, by shard; a marker cut short by a crash counts as absent."""
    paths = {marker_path(root, s): s for s in range(num_shards)}
    found = fs.cat(list(paths), on_error="omit")
    markers = {}
    for path, blob in found.items():
        try:
            markers[paths[path]] = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return markers


def array_digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def shard_paths(root: str, group: zarr.Group, layout: StoreLayout, shard: int) -> dict[str, str]:
    """The object that holds each array's part of `shard`."""
    return {name: f"{root}/{name}/" + group[name].metadata.encode_chunk_key((shard,) + (0,) * len(spec.tail))
            for name, spec in layout.arrays().items()}


def for_each_array(fn, items: dict) -> dict:
    """{name: fn(value)} over a shard's arrays, all at once: on object storage each is a request, and
    eleven in flight cost one round trip instead of eleven."""
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return dict(zip(items, pool.map(fn, items.values())))


def shard_sizes(fs, root: str, group: zarr.Group, layout: StoreLayout, shard: int) -> dict[str, int]:
    """Bytes on storage of each array's part of `shard` (0 where zarr stored nothing: all fill value)."""
    def size(path: str) -> int:
        try:
            return int(fs.size(path))
        except FileNotFoundError:
            return 0

    return for_each_array(size, shard_paths(root, group, layout, shard))


def clear_shard(fs, root: str, group: zarr.Group, layout: StoreLayout, shard: int) -> None:
    """Delete a shard's objects, so a rewrite never reads back a half-written one."""
    def remove(path: str) -> None:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    for_each_array(remove, shard_paths(root, group, layout, shard))


class ShardError(Exception):
    """Why one array's part of a shard cannot be trusted."""


def read_checked_shard(group: zarr.Group, layout: StoreLayout, shard: int, marker: dict, name: str) -> np.ndarray:
    """A shard's rows of `name`, decoded (crc32c included) and matched against the digest its writer recorded."""
    try:
        values = group[name][layout.shard_rows(shard)]
    except Exception as exc:  # any codec or I/O failure: a flipped byte, a truncated object
        raise ShardError(f"does not decode ({type(exc).__name__}: {exc})") from None
    if array_digest(values) != marker.get("digests", {}).get(name):
        raise ShardError("differs from what its writer recorded")
    return values


def check_shard(group: zarr.Group, layout: StoreLayout, shard: int, marker: dict) -> str | None:
    """Why a marked shard is not sound (None when it is): it must decode, crc32c included, and match
    the digests its writer recorded."""
    start, stop = layout.shard_range(shard)
    if (marker.get("start"), marker.get("stop")) != (start, stop):
        return (f"shard {shard}: marker covers rows {marker.get('start')}..{marker.get('stop')}, "
                f"expected {start}..{stop}")
    for name in layout.arrays():
        try:
            read_checked_shard(group, layout, shard, marker, name)
        except ShardError as exc:
            return f"shard {shard}: {name} {exc}"
    return None
