"""The teacher batch stage, until it moves to its own package."""

from odkd.cache.build import build_cache
from odkd.cache.verify import VerifyReport, verify_cache

__all__ = ["VerifyReport", "build_cache", "verify_cache"]
