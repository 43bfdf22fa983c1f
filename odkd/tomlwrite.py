"""TOML text from plain values: the writer Python's tomllib lacks, for the config a run keeps."""

from __future__ import annotations

import json
import re


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_inline(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's float repr (1e-05, inf, nan) is TOML too
    if isinstance(value, str):
        # JSON's escapes are TOML's; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_inline(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_lines(table: dict, path: tuple[str, ...], header: str) -> list[str]:
    """`table` under its `header` line, then its sub-tables and arrays of tables under their own."""
    values = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    lines = [header] if header and (values or not table or header.startswith("[[")) else []
    lines += [f"{_toml_key(k)} = {_toml_inline(v)}" for k, v in values.items()]
    for key, value in table.items():
        sub = (*path, key)
        dotted = ".".join(map(_toml_key, sub))
        if isinstance(value, dict):
            lines += ["", *_toml_lines(value, sub, f"[{dotted}]")]
        elif _is_table_array(value):
            for item in value:
                lines += ["", *_toml_lines(item, sub, f"[[{dotted}]]")]
    return lines


def toml_text(table: dict) -> str:
    """A TOML document that tomllib reads back as `table` (no TOML writer ships with Python)."""
    text = "\n".join(_toml_lines(table, (), ""))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"  # a table with no keys of its own adds no line


def as_toml_value(value):
    """A Python value as TOML holds it: tuples as arrays (as tomllib reads them back)."""
    if isinstance(value, (list, tuple)):
        return [as_toml_value(item) for item in value]
    if isinstance(value, dict):
        return {key: as_toml_value(item) for key, item in value.items()}
    return value
