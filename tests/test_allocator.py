"""The allocator choice of training processes (cirlab/allocator.py): tcmalloc preloaded by re-executing, handed to
spawned workers, glibc tuned where it is missing, and the same arithmetic under each."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cirlab import allocator
from cirlab.errors import CirlabError

HAS_TCMALLOC = allocator.tcmalloc_library() is not None
NEEDS_TCMALLOC = pytest.mark.skipif(not HAS_TCMALLOC, reason="no tcmalloc library on this machine (`make malloc` "
                                    "installs Debian's libtcmalloc-minimal4 where it runs as root)")

# a few AdamW steps of a small model with a 49,408-word table, as the training processes run them; prints the
# allocator, then the final loss and a weight checksum to full precision
STEPS = """
import torch
from cirlab import allocator
allocator.reexec()
malloc = allocator.prepare()
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Embedding(49408, 64), torch.nn.Linear(64, 64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
ids = torch.randint(0, 49408, (8, 16))
for _ in range(4):
    opt.zero_grad(set_to_none=True)
    loss = model(ids).pow(2).mean()
    loss.backward()
    opt.step()
print(malloc)
print(repr(loss.item()), repr(sum(p.double().sum().item() for p in model.parameters())))
"""


def _run(code: str, choice: str) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CIRLAB_ALLOCATOR_REEXEC")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env | {"CIRLAB_ALLOCATOR": choice})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")


def test_each_choice_runs_under_its_allocator_with_the_same_arithmetic():
    system, glibc, auto = (_run(STEPS, c) for c in ("system", "glibc", "auto"))
    assert system[0] == "glibc" and glibc[0] == "glibc (tuned)"
    assert auto[0] == ("tcmalloc" if HAS_TCMALLOC else "glibc (tuned)")
    assert system[1] == glibc[1] == auto[1]  # bit for bit: the allocator moves memory, not arithmetic


def test_a_bad_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("CIRLAB_ALLOCATOR", "mimalloc")
    with pytest.raises(CirlabError, match="CIRLAB_ALLOCATOR='mimalloc'"):
        allocator.preload_env()


def test_tcmalloc_asked_for_and_missing_says_how_to_install(monkeypatch):
    monkeypatch.setenv("CIRLAB_ALLOCATOR", "tcmalloc")
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    with pytest.raises(CirlabError, match="libtcmalloc-minimal4"):
        allocator.preload_env()
    monkeypatch.setenv("CIRLAB_ALLOCATOR", "auto")
    assert allocator.preload_env({"LD_PRELOAD": "libx.so"}) == {"LD_PRELOAD": "libx.so"}  # falls back


@NEEDS_TCMALLOC
def test_spawned_workers_get_tcmalloc_and_the_parent_env_is_restored(monkeypatch):
    import multiprocessing

    monkeypatch.setenv("CIRLAB_ALLOCATOR", "auto")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with allocator.for_children():
        assert "tcmalloc" in os.environ["LD_PRELOAD"]
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.apply(allocator.in_use) == "tcmalloc"
    assert "LD_PRELOAD" not in os.environ
    assert allocator.preload_env({"LD_PRELOAD": "libx.so"})["LD_PRELOAD"].split()[1] == "libx.so"  # kept, after


@NEEDS_TCMALLOC
def test_the_cli_restarts_its_training_commands_under_tcmalloc(tmp_path):
    """`cirlab train` with a bad data root fails after the restart, so the error comes from the re-executed
    process: the restart keeps argv and the exit status, and only training commands restart."""
    code = ("import sys; from cirlab import allocator; from cirlab.cli.main import main; "
            "import atexit; atexit.register(lambda: print('allocator', allocator.in_use(), file=sys.stderr)); "
            "sys.argv = ['cirlab', *sys.argv[1:]]; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CIRLAB_ALLOCATOR_REEXEC")}
    missing = str(tmp_path / "missing")
    for args, expected in ((["train", "--method", "combiner", "--data-root", missing, "--backbone", missing,
                             "--out", str(tmp_path / "out")], "tcmalloc"),
                           (["data", "check", "--dataset", "synth", "--data-root", missing], "glibc")):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                              env=env | {"CIRLAB_ALLOCATOR": "auto", "HF_HUB_OFFLINE": "1"})
        assert f"allocator {expected}" in proc.stderr, proc.stderr[-2000:]
        assert "missing" in proc.stderr  # the command's own error, after the restart
