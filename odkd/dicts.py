"""Comparing nested settings: where two dict trees first disagree, as one line for an error message."""

from __future__ import annotations


def first_difference(old, new, where: str = "") -> str | None:
    """The first dotted key where two settings trees differ, with both values; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            sub = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                return f"{sub} {old.get(key, '<absent>')!r} != {new.get(key, '<absent>')!r}"
            diff = first_difference(old[key], new[key], sub)
            if diff:
                return diff
        return None
    return None if old == new else f"{where} {old!r} != {new!r}"
