"""The teacher-target store: PT and ST outputs, binarized and bit-packed, in a sharded Zarr v3 store.

build_cache fills it (dask, shard-aligned, resumable); TeacherTargets reads it; cache_info and
verify_cache describe and check it.
"""

from odkd.cache.bitpack import bitpack_maps, packed_width, unpack_maps
from odkd.cache.build import build_cache
from odkd.cache.info import cache_info
from odkd.cache.reader import TeacherTargets
from odkd.cache.schema import SCHEMA_VERSION, StoreLayout
from odkd.cache.verify import VerifyReport, verify_cache
from odkd.cache.writer import BuildSummary, ShardTargets, build_store

__all__ = [
    "SCHEMA_VERSION", "BuildSummary", "ShardTargets", "StoreLayout", "TeacherTargets", "VerifyReport",
    "bitpack_maps", "build_cache", "build_store", "cache_info", "packed_width", "unpack_maps", "verify_cache",
]
