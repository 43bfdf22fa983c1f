"""A local copy proves its bytes: checked whole before a run uses it (and made again when damaged), checked row
by row as it is read, written into reserved room (a full disk is one line), waited for by name, and listed,
pruned and verified by `odkd cache copies`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from odkd.cli import main
from odkd.errors import OdkdError
from odkd.store import StoreLayout, TeacherTargets, build_store
from odkd.store.local import COPY_WAIT_ENV, LOCAL_COPIES_ENV, LocalRows
from odkd.store.synthetic import SyntheticTargets
from conftest import odkd_log

LAYOUT = StoreLayout(num_instances=200, num_joints=17, map_size=(24, 32), chunk_instances=16, shard_instances=64)
SETTINGS = {"dataset_fingerprint": "sha256:c0c0", "threshold": 0.5}
ARRAYS = ["pt/heatmaps", "pt/conf", "st/heatmaps", "st/mask", "meta/ok", "meta/center"]


def build(url: Path, seed: int = 0, layout: StoreLayout = LAYOUT) -> TeacherTargets:
    build_store(str(url), layout, SETTINGS, SyntheticTargets(layout, seed=seed), scheduler="synchronous",
                progress=False)
    return TeacherTargets.open(str(url))


def fresh_process_rows(targets: TeacherTargets, root: Path) -> LocalRows:
    """LocalRows.fetch as a new run makes it: this process forgets which copies it has checked."""
    from odkd.store import local

    local._CHECKED.clear()
    return LocalRows.fetch(targets, ARRAYS, root=root)


def equal_to_store(rows: LocalRows, targets: TeacherTargets) -> None:
    idx = np.arange(LAYOUT.num_instances)
    want = targets.get_batch(idx)
    for name in ARRAYS:
        got = np.stack([rows.row(int(i))[name] for i in idx])
        np.testing.assert_array_equal(got, want[name], err_msg=name)


def flip(path: Path, offsets, bit: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    for at in offsets:
        data[at] ^= bit
    path.write_bytes(bytes(data))


# each damage found on a real copy: a run used it silently, or stopped mid-run with a traceback
DAMAGES = {
    "64 bytes flipped in st-mask/rows.npy": lambda f: flip(f / "st-mask" / "rows.npy", range(300, 364), 0xFF),
    "40 bytes flipped in pt-conf/rows.npy": lambda f: flip(f / "pt-conf" / "rows.npy", range(500, 540), 0x10),
    "one bit in each row of pt-heatmaps/rows.zst": lambda f: flip(
        f / "pt-heatmaps" / "rows.zst", np.load(f / "pt-heatmaps" / "offsets.npy")[:-1] + 9),
    "8 bytes flipped in st-heatmaps/rows.zst": lambda f: flip(f / "st-heatmaps" / "rows.zst", range(1000, 1008), 0xFF),
    "rows.npy cut to 0 bytes": lambda f: (f / "meta-ok" / "rows.npy").write_bytes(b""),
    "rows.npy deleted": lambda f: (f / "meta-center" / "rows.npy").unlink(),
    "rows.zst deleted": lambda f: (f / "st-heatmaps" / "rows.zst").unlink(),
    "offsets.npy deleted": lambda f: (f / "pt-heatmaps" / "offsets.npy").unlink(),
    "bits flipped in offsets.npy": lambda f: flip(f / "st-heatmaps" / "offsets.npy", [200, 407, 1300], 0x40),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_copy_is_found_before_the_run_and_made_again(damage, tmp_path, caplog):
    targets = build(tmp_path / "s.zarr")
    root = tmp_path / "copies"
    rows = LocalRows.fetch(targets, ARRAYS, root=root)
    DAMAGES[damage](rows.folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = fresh_process_rows(targets, root)
    warnings = odkd_log(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(str(rows.folder)) and "copying" in warnings[0], warnings
    assert again.folder == rows.folder
    equal_to_store(again, targets)


@pytest.mark.parametrize("damage", ["raw row", "zstd frame", "offsets"])
def test_a_byte_that_goes_bad_during_a_run_is_one_line_naming_the_copy(damage, tmp_path):
    targets = build(tmp_path / "s.zarr")
    rows = LocalRows.fetch(targets, ARRAYS, root=tmp_path / "copies")
    rows.row(0)  # the run has opened its files
    folder = rows.folder
    if damage == "raw row":
        sub = folder / "pt-conf"
        start = os.path.getsize(sub / "rows.npy") - 200 * (17 * 2 + 4)
        flip(sub / "rows.npy", [start + 150 * (17 * 2 + 4) + 3])
    elif damage == "zstd frame":
        sub = folder / "st-heatmaps"
        offsets = np.load(sub / "offsets.npy")
        flip(sub / "rows.zst", [int(offsets[150]) + 12], 0x04)
    else:
        sub = folder / "pt-heatmaps"
        data = bytearray((sub / "offsets.npy").read_bytes())
        header = len(data) - 8 * 201
        data[header + 8 * 150 + 6] = 0x7F  # row 150's start, 2^54 and more: a huge pread before the check
        (sub / "offsets.npy").write_bytes(bytes(data))
    with pytest.raises(OdkdError) as err:
        rows.row(150)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{sub}: ") and "went bad" in message, message
    assert rows.row(100)  # the other rows are still read


def test_no_room_for_a_copy_is_one_line_naming_the_folder_and_the_bytes(tmp_path):
    targets = build(tmp_path / "s.zarr", layout=StoreLayout(6000, 17, (24, 32), 64, 256))
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here ({done.stderr.decode().strip()})")
    try:
        with pytest.raises(OdkdError) as err:
            LocalRows.fetch(targets, ["pt/heatmaps", "st/heatmaps", "meta/center"], root=mount / "copies")
        message = str(err.value)
        assert "\n" not in message and str(mount / "copies") in message and "needs about" in message, message
        assert "MB free" in message
        folder = next(p for p in (mount / "copies").iterdir() if p.is_dir())
        assert not [p for p in folder.iterdir() if p.is_dir()]  # nothing half-written is left to be read
    finally:
        from odkd.store import local

        for held in [f for f in local._IN_USE if mount in f.parents]:  # this process's run lock, on the mount
            local._IN_USE.pop(held).close()
        subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_during_the_copy_is_one_line(tmp_path, monkeypatch):
    """The estimate can be short: a write that meets a full disk (ENOSPC, injected at the file write) says so."""
    import errno
    from odkd.store import rowfiles

    targets = build(tmp_path / "s.zarr")
    real_extend = rowfiles.CompressedRowsWriter.extend

    def extend_then_full(self, values):
        real_extend(self, values)
        if self.count > 100:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rowfiles.CompressedRowsWriter, "extend", extend_then_full)
    with pytest.raises(OdkdError, match="needs about .* MB and its disk has .* MB free") as err:
        LocalRows.fetch(targets, ["pt/heatmaps"], root=tmp_path / "copies")
    assert "\n" not in str(err.value)
    folder = next(p for p in (tmp_path / "copies").iterdir() if p.is_dir())
    assert not [p for p in folder.iterdir() if p.is_dir()]


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
from pathlib import Path
from odkd.store.local import lock_file
folder = Path(sys.argv[1])
lock = lock_file(folder, "lock")
fcntl.flock(lock, fcntl.LOCK_EX)
(folder.parent / (folder.name + ".owner")).write_text(json.dumps(
    {"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_waiting_for_another_copy_names_it_and_gives_up_in_one_line(tmp_path, monkeypatch, caplog):
    targets = build(tmp_path / "s.zarr")
    root = tmp_path / "copies"
    folder = LocalRows.fetch(targets, ["meta/ok"], root=root).folder
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(COPY_WAIT_ENV, "1")
        with caplog.at_level(logging.WARNING), pytest.raises(OdkdError) as err:
            LocalRows.fetch(targets, ["pt/heatmaps"], root=root)
        assert odkd_log(caplog) == [f"waiting for process {holder.pid} on {os.uname().nodename} (since now), "
                                    f"which is copying {targets.url} into {folder}"]
        assert str(err.value) == (f"{folder}: waited 1 s for process {holder.pid} on {os.uname().nodename} "
                                  f"(since now) to finish copying {targets.url}; if it is stuck, stop it "
                                  f"(set {COPY_WAIT_ENV} to wait longer)")
    finally:
        holder.kill()
        holder.wait()


# a run in a process of its own: it copies the arrays of argv[3], says so, and holds the copy for argv[4] s
RUN = """
import sys, time
from pathlib import Path
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets
LocalRows.fetch(TeacherTargets.open(sys.argv[1]), sys.argv[3].split(","), root=Path(sys.argv[2]))
print("using", flush=True)
time.sleep(float(sys.argv[4]))
"""


def run_process(url: str, root: Path, arrays: list[str], hold_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RUN, url, str(root), ",".join(arrays), str(hold_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "using"
    return proc


def test_cache_copies_lists_prunes_what_no_run_holds_and_verifies(tmp_path, monkeypatch):
    root = tmp_path / "copies"
    monkeypatch.setenv(LOCAL_COPIES_ENV, str(root))
    used, idle = build(tmp_path / "used.zarr", seed=0), build(tmp_path / "idle.zarr", seed=1)
    run_process(idle.url, root, ["meta/ok", "pt/heatmaps"], 0).wait(timeout=60)  # a run that ended
    runner = run_process(used.url, root, ["meta/ok"], 120)
    try:
        out = CliRunner().invoke(main, ["cache", "copies"])
        assert out.exit_code == 0, out.output
        assert f"2 local copies in {root}" in out.output
        [used_line] = [line for line in out.output.splitlines() if used.url in line]
        [idle_line] = [line for line in out.output.splitlines() if idle.url in line]
        assert f"pid {runner.pid}" in used_line and "no run" in idle_line

        idle_folder = next(p for p in root.iterdir() if p.is_dir() and p.name.startswith("idle.zarr-"))
        flip(idle_folder / "pt-heatmaps" / "rows.zst", [40])
        out = CliRunner().invoke(main, ["cache", "copies", "--verify"])
        assert out.exit_code == 1
        assert f"FAIL {idle_folder.name}/pt-heatmaps: rows.zst differs from the SHA-256 its manifest records" in out.output
        assert f"ok   {idle_folder.name}/meta-ok" in out.output

        out = CliRunner().invoke(main, ["cache", "copies", "--prune", "--older-than", "1"])
        assert out.exit_code == 0 and "removed 0 local copies" in out.output  # both used today
        out = CliRunner().invoke(main, ["cache", "copies", "--prune"])
        assert out.exit_code == 0 and f"removed 1 local copy" in out.output and idle_folder.name in out.output
        assert not idle_folder.exists() and not (root / f"{idle_folder.name}.lock").exists()
        assert [p.name for p in root.iterdir() if p.is_dir()] == [p.name for p in root.iterdir()
                                                                   if p.is_dir() and p.name.startswith("used.zarr-")]
    finally:
        runner.kill()
        runner.wait()
    out = CliRunner().invoke(main, ["cache", "copies", "--prune"])
    assert out.exit_code == 0 and "removed 1 local copy" in out.output and f"no local copies in {root}" in out.output


def test_a_copy_on_a_shared_folder_is_open_to_other_users(tmp_path):
    """Folders 755, files 644, the locks 666 whatever the umask; where this machine lets a test run a process
    as `nobody`, that user's run reads root's copy (its locks opened read-only)."""
    targets = build(tmp_path / "s.zarr")
    shared = tmp_path / "shared"
    old = os.umask(0o077)
    try:
        folder = LocalRows.fetch(targets, ARRAYS, root=shared).folder
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    for path in folder.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    for kind in ("lock", "use"):
        assert (shared / f"{folder.name}.{kind}").stat().st_mode & 0o777 == 0o666

    if os.geteuid() != 0:
        return
    import pwd

    nobody = pwd.getpwnam("nobody")
    code = ("import sys; from pathlib import Path; from odkd.store.local import LocalRows; "
            "from odkd.store.reader import TeacherTargets; "
            "rows = LocalRows.fetch(TeacherTargets.open(sys.argv[1]), sys.argv[3].split(','), root=Path(sys.argv[2])); "
            "print(rows.folder, int(rows.row(7)['meta/ok']))")

    def as_nobody():
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    for path in [tmp_path, *(tmp_path / "s.zarr").rglob("*"), tmp_path / "s.zarr"]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        done = subprocess.run([sys.executable, "-c", code, targets.url, str(shared), ",".join(ARRAYS)],
                              preexec_fn=as_nobody, capture_output=True, text=True, timeout=120)
    except PermissionError:
        return  # this Python lies where `nobody` may not run it (a venv under /root): the modes above are the check
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(folder), "1"]
