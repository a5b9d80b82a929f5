"""Files written so that a kill at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path, write, sync: bool = True) -> None:
    """`write(file)` into a temporary sibling, flush, fsync, rename over `path`, fsync the folder. With `sync`
    False the fsyncs are skipped (for many files a run rewrites whole if the machine, not the process, dies: the
    synthetic world's images); the rename still means a killed process never leaves a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        _sync_dir(path.parent)


def sync_written(paths, folder) -> None:
    """Make files written with `write_atomic(..., sync=False)` into `folder` durable, together: on Linux one
    syncfs of the folder's file system (one journal commit for the lot, where an fsync each costs a commit each),
    elsewhere an fsync of each file; then the folder itself. Call it before a record that names the files is
    written, so that the record never outlives them after a crash of the machine."""
    folder = Path(folder)
    if not _syncfs(folder):
        for path in paths:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _sync_dir(folder)


def _syncfs(folder: Path) -> bool:
    """syncfs(2) on the file system that holds `folder`; False where the call is unavailable."""
    import ctypes

    syncfs = _linux_libc("syncfs")
    if syncfs is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(folder))
    finally:
        os.close(fd)
    return True


def _linux_libc(name: str):
    """The C library's function `name` (errno kept for ctypes.get_errno), or None off Linux or where it is missing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def remove_stale_temps(folder) -> list:
    """Delete the temporary files and folders (`.<name>.tmp-<pid>`, as `write_atomic` and the caches name them)
    directly under `folder` that processes no longer running left behind, killed mid-write; returns their paths.
    One of a process still running (a write under way) is kept."""
    import shutil

    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replace_folder(new, folder) -> None:
    """Put the complete folder `new` in the place of `folder` with no moment at which `folder` is missing or
    mixed: Linux's renameat2(RENAME_EXCHANGE) swaps the two in one step (the old contents end at `new`, then are
    deleted). Where that call is missing, two renames, `folder` to `folder.old` and `new` to `folder`; a reader
    that finds `folder` missing then finds the previous version at `folder.old` (see `resolve_folder`)."""
    import shutil

    new, folder = Path(new), Path(folder)
    if not folder.exists():
        os.replace(new, folder)
    elif _exchange(new, folder):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    _sync_dir(folder.parent)


def resolve_folder(folder) -> Path:
    """`folder`, or its previous version `folder.old` while a `replace_folder` without an atomic exchange is
    between its two renames."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    return old if not folder.exists() and old.is_dir() else folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the call is unavailable."""
    import ctypes

    renameat2 = _linux_libc("renameat2")
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
