"""The memory allocator of training processes.

A training step frees and allocates the same large buffers again and again: each backward makes a fresh, zeroed
gradient of every word table (49,408 x 128 floats, 25 MB, for the tiny backbones' CLIP vocabulary, in both the
CLIP and the Q-Former). glibc's malloc serves blocks that large with mmap and hands them back to the system when
they are freed, so each step page-faults them in again: in a csmcir step of 95 ms, 20 ms went to zero-filling two
such gradients. tcmalloc keeps freed memory for the next allocation. Step times of
the demo's lanes on its checkpoints, one process each, median of three alternating rounds (glibc as started /
tuned / tcmalloc, docs/results/allocator_steps.json): csmcir 86 / 66 / 69 ms, tmcir 335 / 294 / 267, mapcompose
142 / 136 / 124, Q-Former pretraining 260 / 219 / 244, CLIP pretraining (2 threads) 296 / 273 / 280, the combiner
and pic2word within noise (this host's runs differ by 10-20%). The whole default demo, four lanes on two cores:
757 s under glibc, 666-671 s under tcmalloc (docs/results/demo_default_*tcmalloc*.json). The arithmetic is the
same, so results are too: every per-query file of the demo is byte for byte the same.

`CIRLAB_ALLOCATOR` chooses:
- "auto" (default): tcmalloc when its library is installed (Debian: libtcmalloc-minimal4, which `make malloc`
  installs where it can), else glibc tuned;
- "tcmalloc": tcmalloc, an error when its library is missing;
- "glibc": glibc with blocks up to 32 MiB (its largest mmap threshold) served from the heap, and the heap never
  trimmed, so freed memory is reused instead of faulted in again;
- "system": the process as it started.

tcmalloc has to be loaded before the process starts (LD_PRELOAD): the `cirlab` command re-executes itself once for
its training commands (`reexec`), and the demo starts its lane processes with it (`preload_env`). Linux only;
elsewhere every choice but "tcmalloc" leaves the process as it is.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

from cirlab.errors import CirlabError

CHOICES = ("auto", "tcmalloc", "glibc", "system")
_REEXEC_MARK = "CIRLAB_ALLOCATOR_REEXEC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit systems; a larger value is refused
_NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int: 2 GiB free at the heap's top before it is trimmed
_tuned = False
_LARGE_ALLOC_VAR = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def choice() -> str:
    value = os.environ.get("CIRLAB_ALLOCATOR", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise CirlabError(f"CIRLAB_ALLOCATOR={value!r} is not one of {', '.join(CHOICES)}")
    return value


def tcmalloc_library() -> str | None:
    """The tcmalloc library the dynamic loader finds (its file name), or None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def in_use() -> str:
    """"tcmalloc", "jemalloc" or "glibc": the allocator mapped into this process (Linux), else "unknown"."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def preload_env(env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) with tcmalloc in LD_PRELOAD when the choice asks for it and the
    library is installed; an error when "tcmalloc" is asked for and missing."""
    env = dict(os.environ if env is None else env)
    wanted = choice()
    if wanted not in ("auto", "tcmalloc"):
        return env
    lib = tcmalloc_library()
    if lib is None:
        if wanted == "tcmalloc":
            raise CirlabError("CIRLAB_ALLOCATOR=tcmalloc, but no tcmalloc library was found (Debian: apt-get "
                              "install libtcmalloc-minimal4); set CIRLAB_ALLOCATOR=auto to fall back to glibc")
        return env
    preload = env.get("LD_PRELOAD", "").split()
    if not any("tcmalloc" in p for p in preload):
        env["LD_PRELOAD"] = " ".join([lib, *preload])
    # tcmalloc reports every allocation above 1 GiB on stderr; the index and search benches make such
    env.setdefault(_LARGE_ALLOC_VAR, str(2 ** 40))
    return env


@contextlib.contextmanager
def for_children():
    """Within the block, processes this one starts (spawned workers) preload tcmalloc when `preload_env` would."""
    env = preload_env()
    keys = ("LD_PRELOAD", _LARGE_ALLOC_VAR)
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys if k in env})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reexec() -> None:
    """Start this command again with tcmalloc preloaded when it should be and is not yet; returns otherwise (once
    re-executed, never again, even if the loader could not preload the library)."""
    if os.environ.get(_REEXEC_MARK) or in_use() == "tcmalloc":
        return
    env = preload_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def tune_glibc() -> bool:
    """Under glibc, when the choice allows it, serve blocks up to 32 MiB from the heap and never trim it; returns
    whether it did."""
    if choice() not in ("auto", "glibc") or in_use() != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1 and ok
    except (OSError, AttributeError):
        return False


def describe() -> str:
    """What this process runs under, for results files: "tcmalloc", "glibc (tuned)", "glibc", ..."""
    name = in_use()
    return f"{name} (tuned)" if name == "glibc" and _tuned else name


def prepare() -> str:
    """For a training process: tune glibc where tcmalloc is not loaded (and the choice allows); returns
    `describe()`."""
    global _tuned
    _tuned = _tuned or tune_glibc()
    return describe()
