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
    if not sync:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
