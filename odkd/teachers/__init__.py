"""The teacher batch stage: PT and ST run once over a split into a store (odkd.store), and re-run on a sample to
verify one. It sits above the models and the store; the student trainer never imports it."""

from odkd.teachers.build import build_cache, build_teacher_store
from odkd.teachers.verify import VerifyReport, verify_cache

__all__ = ["VerifyReport", "build_cache", "build_teacher_store", "verify_cache"]
