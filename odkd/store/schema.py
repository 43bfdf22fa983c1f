"""What a teacher-target store holds: its arrays, their shapes, chunks and shards, and its codecs.

Row i of every array is instance i of the split, so a shard (a run of `shard_instances` rows)
is the unit of writing, of resuming and of checking: one task owns it whole. The arrays are
padded to a whole number of shards (rows past `num_instances` are zero, meta/ok 0), so that every
read and write covers whole shard objects: plain GETs that any static HTTP server answers, and
writes that never merge with what another writer left in the same object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from odkd.errors import OdkdError
from odkd.store.bitpack import packed_width

SCHEMA_VERSION = 1
TEACHERS = ("pt", "st")
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class ArraySpec:
    tail: tuple[int, ...]  # the shape of one instance's row
    dtype: str


@dataclass(frozen=True)
class StoreLayout:
    """The shape of a store: how many instances, and the size of the maps stored for each."""

    num_instances: int
    num_joints: int
    map_size: tuple[int, int]  # (width, height) of the stored heatmaps and mask
    chunk_instances: int = 64
    shard_instances: int = 1024
    soft: bool = False  # also the raw maps (float16), for students that learn from soft targets

    def __post_init__(self):
        if self.num_instances <= 0:
            raise OdkdError("the cache has no instances to store")
        if self.chunk_instances <= 0:
            raise OdkdError(f"cache.chunk_instances must be positive, got {self.chunk_instances}")
        if self.shard_instances <= 0 or self.shard_instances % self.chunk_instances:
            raise OdkdError(f"cache.shard_instances ({self.shard_instances}) must be a positive "
                            f"multiple of cache.chunk_instances ({self.chunk_instances})")

    @property
    def num_shards(self) -> int:
        return -(-self.num_instances // self.shard_instances)

    @property
    def stored_rows(self) -> int:
        """Rows of every array: num_instances padded to whole shards."""
        return self.num_shards * self.shard_instances

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The instances [start, stop) of a shard; the last one may hold fewer than shard_instances."""
        start = shard * self.shard_instances
        return start, min(start + self.shard_instances, self.num_instances)

    def shard_rows(self, shard: int) -> slice:
        """The stored rows of a shard, padding included."""
        return slice(shard * self.shard_instances, (shard + 1) * self.shard_instances)

    def arrays(self) -> dict[str, ArraySpec]:
        w, h = self.map_size
        k, wb = self.num_joints, packed_width(w)
        return {
            "pt/heatmaps": ArraySpec((k, h, wb), "uint8"),
            "pt/conf": ArraySpec((k,), "float16"),
            "st/heatmaps": ArraySpec((k, h, wb), "uint8"),
            "st/conf": ArraySpec((k,), "float16"),
            "st/mask": ArraySpec((1, h, wb), "uint8"),
            "meta/index": ArraySpec((), "int64"),
            "meta/image_id": ArraySpec((), "int64"),
            "meta/ann_id": ArraySpec((), "int64"),
            "meta/center": ArraySpec((2,), "float32"),
            "meta/scale": ArraySpec((2,), "float32"),
            "meta/ok": ArraySpec((), "uint8"),
            **({"pt/soft_heatmaps": ArraySpec((k, h, w), "float16"),
                "st/soft_heatmaps": ArraySpec((k, h, w), "float16")} if self.soft else {}),
        }

    def allocate(self, rows: int) -> dict[str, np.ndarray]:
        """Zeroed arrays for `rows` instances, ready for a producer to fill."""
        return {name: np.zeros((rows, *spec.tail), spec.dtype) for name, spec in self.arrays().items()}

    def to_dict(self) -> dict:
        return {**asdict(self), "map_size": list(self.map_size)}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreLayout":
        return cls(**{**d, "map_size": tuple(d["map_size"])})


def compressors():
    """Zstd on the packed bytes, then a crc32c of every chunk so corruption fails the read."""
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def settings_digest(settings: dict) -> str:
    """A short stable hash of everything that decides a store's contents."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

