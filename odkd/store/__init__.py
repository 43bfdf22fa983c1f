"""The teacher-target store: PT and ST outputs, binarized and bit-packed, in a sharded Zarr v3 store.

The contract between the two stages. build_store writes it (dask, shard-aligned, resumable);
TeacherTargets reads it; cache_info describes it. It imports neither the models nor the teacher
stage that fills it (odkd.teachers), so the student trainer reads a store without ever importing
code that builds a teacher.
"""

from odkd.store.bitpack import bitpack_maps, packed_width, unpack_maps
from odkd.store.info import cache_info
from odkd.store.reader import TeacherTargets
from odkd.store.schema import SCHEMA_VERSION, StoreLayout
from odkd.store.writer import BuildSummary, ShardTargets, build_store

__all__ = [
    "SCHEMA_VERSION", "BuildSummary", "ShardTargets", "StoreLayout", "TeacherTargets",
    "bitpack_maps", "build_store", "cache_info", "packed_width", "unpack_maps",
]
