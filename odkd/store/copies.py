"""The local copies on this machine (`odkd cache copies`): which store each holds, its size, when a run last
used it, which running processes hold it now; removing those no run holds, and checking their files."""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from odkd.store.local import lock_file
from odkd.store.rowfiles import check_array, read_manifest


@dataclass(frozen=True)
class LocalCopy:
    folder: Path
    store: str  # the URL or path it was copied from
    bytes: int
    last_used: float  # seconds since the epoch
    arrays: tuple[str, ...]
    users: tuple[int, ...] = field(default=())  # pids that hold it now (empty: none; -1: one this system hides)

    @property
    def in_use(self) -> bool:
        return bool(self.users)


def _users(folder: Path) -> tuple[int, ...]:
    """The pids that hold the shared lock of runs on `folder` (from /proc/locks, on Linux); (-1,) when a
    process holds it that this system does not name."""
    try:
        stat = (folder.parent / f"{folder.name}.use").stat()
    except FileNotFoundError:
        return ()
    with lock_file(folder, "use") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return ()
        except BlockingIOError:
            pass
    pids = set()
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(stat.st_ino):
                pids.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return tuple(sorted(pids)) or (-1,)


def list_copies(root: Path) -> list[LocalCopy]:
    copies = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        try:
            store = json.loads((folder / "store.json").read_text()).get("url", "?")
            last_used = (folder / "store.json").stat().st_mtime
        except (OSError, ValueError):
            store, last_used = "? (no store.json)", folder.stat().st_mtime
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        arrays = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and ".partial-" not in p.name))
        users = _users(folder)
        copies.append(LocalCopy(folder, store, size, last_used, arrays, users))
    return copies


def prune_copies(root: Path, older_than_s: float | None = None) -> list[LocalCopy]:
    """Remove the copies no process holds (and, with `older_than_s`, that no run used for that long)."""
    removed = []
    for copy in list_copies(root):
        if copy.in_use or (older_than_s is not None and time.time() - copy.last_used < older_than_s):
            continue
        with lock_file(copy.folder, "lock") as lock, lock_file(copy.folder, "use") as use:
            try:  # nobody copying, nobody reading, and nobody may start until it is gone
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(copy.folder)
            for kind in ("lock", "use", "owner"):
                (copy.folder.parent / f"{copy.folder.name}.{kind}").unlink(missing_ok=True)
        removed.append(copy)
    return removed


def verify_copy(copy: LocalCopy) -> dict[str, str | None]:
    """Each array of a copy: why its files cannot be trusted, or None when they can."""
    problems = {}
    for name in copy.arrays:
        sub = copy.folder / name
        try:
            manifest = read_manifest(sub)
            problems[name] = check_array(sub, manifest["rows"], tuple(manifest["tail"]), manifest["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems[name] = f"no readable manifest ({type(exc).__name__})"
    return problems


def copies_table(copies: list[LocalCopy], root: Path) -> str:
    if not copies:
        return f"no local copies in {root}"
    lines = [f"{len(copies)} local cop{'y' if len(copies) == 1 else 'ies'} in {root}", "",
             f"{'size':>10}  {'last used':<16}  {'in use by':<14}  store (folder)"]
    for copy in copies:
        users = ("no run" if not copy.users else "a process" if copy.users == (-1,)
                 else "pid " + ",".join(map(str, copy.users)))
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(copy.last_used))
        lines.append(f"{copy.bytes / 1e6:>8.1f}MB  {used:<16}  {users:<14}  {copy.store} ({copy.folder.name})")
    return "\n".join(lines)
