"""The one exception type for user errors: the CLI prints it as a single line, no traceback."""

from pathlib import Path


class OdkdError(Exception):
    """A user-facing error; its message names the file, key or field at fault."""


def not_found(path: str | Path, what: str, key: str = "") -> OdkdError:
    """'PATH: WHAT not found (KEY)'. A relative path also names the absolute one looked for: relative paths
    are taken from the working directory, not from the config file, so run from another folder they miss."""
    path = Path(path)
    where = [key] if key else []
    if not path.is_absolute():
        where.append(f"looked for {path.absolute()}, relative to the working directory")
    return OdkdError(f"{path}: {what} not found" + (f" ({'; '.join(where)})" if where else ""))
