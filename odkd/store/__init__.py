"""The teacher-target store: PT and ST outputs, binarized and bit-packed, in a sharded Zarr v3 store.

build_cache fills it (dask, shard-aligned, resumable); TeacherTargets reads it; cache_info and
verify_cache describe and check it. Importing this package loads the reader side only: the two
names that run teachers (build_cache, verify_cache) import the teacher stack when first used, so
the student trainer can read a store without ever importing code that builds a teacher.
"""

from odkd.cache.bitpack import bitpack_maps, packed_width, unpack_maps
from odkd.cache.info import cache_info
from odkd.cache.reader import TeacherTargets
from odkd.cache.schema import SCHEMA_VERSION, StoreLayout
from odkd.cache.writer import BuildSummary, ShardTargets, build_store

_TEACHER_SIDE = {"build_cache": "odkd.cache.build", "verify_cache": "odkd.cache.verify",
                 "VerifyReport": "odkd.cache.verify"}


def __getattr__(name: str):
    if name in _TEACHER_SIDE:
        import importlib

        return getattr(importlib.import_module(_TEACHER_SIDE[name]), name)
    raise AttributeError(f"module 'odkd.cache' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION", "BuildSummary", "ShardTargets", "StoreLayout", "TeacherTargets", "VerifyReport",
    "bitpack_maps", "build_cache", "build_store", "cache_info", "packed_width", "unpack_maps", "verify_cache",
]
