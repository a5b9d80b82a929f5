"""Faults a clumsy user or a crash brings (issue 20): checkpoints swapped with no window, broken checkpoint files
and training states named in one line, resumes that would mix settings refused, logs cut back to the resumed step,
one writer per caption cache and edit manifest, index readers safe against another process's commits, orphaned
uploads cleaned, and the service's work bounded in queue and time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from cirlab.atomic import replace_folder


def test_replacing_a_folder_leaves_no_moment_without_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a").write_text("0")
    (folder / "b").write_text("0")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(((folder / "a").read_text(), (folder / "b").read_text()))
            except FileNotFoundError as e:
                seen.append(("missing", str(e)))
    t = threading.Thread(target=reader)
    t.start()
    for n in range(1, 300):
        new = tmp_path / "ckpt.tmp"
        new.mkdir()
        (new / "a").write_text(str(n))
        (new / "b").write_text(str(n))
        replace_folder(new, folder)
    stop.set()
    t.join()
    assert not [s for s in seen if s[0] == "missing"]
    assert all(int(b) >= int(a) for a, b in seen)  # a read may straddle swaps, never see an older folder after
    assert (folder / "a").read_text() == "299" and not (tmp_path / "ckpt.tmp").exists()


@pytest.fixture()
def cli(capsys):
    from cirlab.cli.main import main

    def call(*args):
        capsys.readouterr()
        status = main([str(a) for a in args])
        return status, capsys.readouterr().err.strip()
    return call


def _one_line_error(result, *words):
    status, err = result
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("cirlab: error:"), err
    for w in words:
        assert w in err, err


def test_broken_checkpoint_files_are_one_line_errors(clip_dir, world, tmp_path, cli):
    import shutil

    from cirlab.training.train import save_zero_shot

    ckpt = save_zero_shot("combiner", clip_dir, tmp_path / "c")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((Path(world) / "test1").glob("*.png")), images)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b""):
        weights.write_bytes(broken)
        _one_line_error(cli("index", "build", "--checkpoint", ckpt, "--images", images, "--out", tmp_path / "ix"),
                        "model.safetensors")
    weights.write_bytes(data)
    meta = json.loads((ckpt / "cirlab.json").read_text())
    bb = ckpt / "backbone" if meta["backbone"]["finetuned"] else Path(meta["backbone"]["source"])
    if not meta["backbone"]["finetuned"]:  # a copy, so that the session's backbone stays whole
        shutil.copytree(bb, tmp_path / "bb")
        bb = tmp_path / "bb"
        meta["backbone"]["source"] = str(bb)
        (ckpt / "cirlab.json").write_text(json.dumps(meta))
    (bb / "config.json").write_text("{not json")
    _one_line_error(cli("index", "build", "--checkpoint", ckpt, "--images", images, "--out", tmp_path / "ix"),
                    "backbone", "cannot be loaded")


def _train(world, clip_dir, out, *extra):
    return ("train", "--method", "combiner", "--data-root", world, "--backbone", clip_dir, "--out", out,
            "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8", "--warmup-steps", "1", "--no-progress",
            *extra)


def test_resume_refuses_changed_settings_and_torn_states_and_cuts_the_log_back(world, clip_dir, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*_train(world, clip_dir, out))[0] == 0
    work = tmp_path / "run.train"
    log = work / "metrics.jsonl"
    lines = log.read_text().splitlines()
    # a killed third epoch had logged a step past the saved state
    log.write_text("\n".join(lines) + "\n" + json.dumps({"step": 99, "epoch": 2, "loss": 1.0}) + "\n")
    _one_line_error(cli(*_train(world, clip_dir, out, "--resume", "--lr", "0.5")), "lr", "--force")
    _one_line_error(cli(*_train(world, clip_dir, out, "--resume", "--batch-size", "4")), "batch_size")
    other = ("train", "--method", "tmcir", "--data-root", world, "--backbone", clip_dir, "--out", out, "--epochs",
             "2", "--steps-per-epoch", "2", "--batch-size", "8", "--no-progress", "--resume")
    _one_line_error(cli(*other), "combiner", "tmcir")
    assert cli(*_train(world, clip_dir, out, "--resume"))[0] == 0  # the same settings: nothing left to train
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and len(records) == len(lines)  # step 99 is gone, none doubled
    assert cli(*_train(world, clip_dir, out, "--resume", "--lr", "0.5", "--force"))[0] == 0
    state = work / "train_state.pt"
    state.write_bytes(state.read_bytes()[:300])
    _one_line_error(cli(*_train(world, clip_dir, out, "--resume")), "train_state.pt", "cannot be read")


def test_an_edit_resumed_with_other_options_is_refused_and_one_writer_holds_a_cache(world, tmp_path, cli):
    out = tmp_path / "pseudo"
    base = ("edit", "--data-root", world, "--out", out, "--limit", "4", "--no-progress")
    assert cli(*base, "--imperfection", "0.1")[0] == 0
    _one_line_error(cli(*base, "--imperfection", "0.3"), "imperfection", "--force")
    _one_line_error(cli(*base, "--imperfection", "0.1", "--seed", "5"), "editor_seed")
    assert cli(*base, "--imperfection", "0.1", "--limit", "6")[0] == 0  # same settings: resumes
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 == len({r["query"] for r in records})

    from cirlab.captioning.cache import CaptionCache
    from cirlab.editing.run import EditManifest

    cache = tmp_path / "captions.jsonl"
    with CaptionCache(cache).writing():  # a first run holds the cache: a second stops at once, writing nothing
        _one_line_error(cli("caption", "--data-root", world, "--split", "val", "--backend", "oracle", "--out", cache,
                            "--limit", "3", "--no-progress"), "another run is writing")
        assert not cache.exists() or cache.read_text() == ""
        with EditManifest(out / "manifest.jsonl").writing():
            _one_line_error(cli(*base, "--imperfection", "0.1"), "another run is writing")
    assert cli("caption", "--data-root", world, "--split", "val", "--backend", "oracle", "--out", cache, "--limit",
               "3", "--no-progress")[0] == 0
    assert len(cache.read_text().splitlines()) == 3


WRITER = """
import sys, numpy as np
from cirlab.index import ImageIndex
ix = ImageIndex(sys.argv[1])
rng = np.random.default_rng(0)
for n in range(int(sys.argv[2])):
    v = rng.normal(size=(2, 16)).astype(np.float32)
    ix.add([f"w{n}a", f"w{n}b"], ["a", "b"], v / np.linalg.norm(v, axis=1, keepdims=True))
    ix.remove([f"w{n}a"])
print("done")
"""


def _vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("backend,params", [("exact", {}), ("faiss", {"kind": "flat"})], ids=["exact", "faiss"])
def test_readers_open_and_follow_an_index_while_another_process_commits(backend, params, tmp_path):
    from cirlab.index import ImageIndex

    folder = tmp_path / "ix"
    ImageIndex.create(folder, checkpoint="c", checkpoint_id="x", method="sum", backend=backend, params=params,
                      ids=[f"i{n}" for n in range(50)], paths=[f"p{n}" for n in range(50)], vectors=_vectors(50))
    held = ImageIndex(folder)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "60"], stdout=subprocess.PIPE, text=True)
    opens, errors = 0, []
    while writer.poll() is None:
        try:
            ix = ImageIndex(folder)
            assert len(ix.search(_vectors(1, seed=1), k=5)[0]) == 5
            opens += 1
        except Exception as e:  # noqa: BLE001 - any failure to open while the other process commits
            errors.append(repr(e))
    assert writer.wait() == 0 and writer.stdout.read().strip() == "done"
    assert not errors, errors[:3]
    assert opens > 20
    # the index opened before the commits sees them: 50 + 60 items, the last one searchable
    assert len(held) == 110 and "w59b" in held.ids and "w59a" not in held.ids
    last = np.load(folder / held.manifest["files"]["vectors"])[-1, 0]
    assert held.search(last[None], k=1)[0][0].id == "w59b"


def test_a_commit_deletes_old_orphaned_uploads_only(tmp_path):
    from cirlab.index import ImageIndex

    folder = tmp_path / "ix"
    ix = ImageIndex.create(folder, checkpoint="c", checkpoint_id="x", method="sum", ids=["a"],
                           paths=[str(folder / "images" / "a.png")], vectors=_vectors(1))
    uploads = folder / "images"
    uploads.mkdir()
    (uploads / "a.png").write_bytes(b"indexed")
    (uploads / "orphan.png").write_bytes(b"left by a killed server")
    (uploads / "young.png").write_bytes(b"an upload about to be indexed")
    hour_ago = time.time() - 2 * 3600
    for name in ("a.png", "orphan.png"):
        os.utime(uploads / name, (hour_ago, hour_ago))
    ix.add(["b"], ["elsewhere/b.png"], _vectors(1, seed=2))
    assert sorted(p.name for p in uploads.iterdir()) == ["a.png", "young.png"]


def test_the_work_bound_answers_503_when_full_or_late():
    from cirlab.serving.service import ServiceError
    from cirlab.serving.work import BoundedWork

    async def main():
        work = BoundedWork(workers=1, queue=1, timeout_s=5)
        results = []

        async def call(seconds):
            try:
                results.append(await work.run(time.sleep, seconds) or "ok")
            except ServiceError as e:
                results.append((e.status, str(e)))
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # one runs, one waits, the third finds the queue full
                tg.start_soon(call, 0.3)
                await anyio.sleep(0.05)
        assert results[0][0] == 503 and "busy" in results[0][1] and results[1:] == ["ok", "ok"], results
        assert work.held == 0
        late = BoundedWork(workers=1, queue=4, timeout_s=0.2)
        with pytest.raises(ServiceError, match="took over 0.2 s") as e:
            await late.run(time.sleep, 1.0)
        assert e.value.status == 503
        await anyio.sleep(1.0)
        assert late.held == 0  # the abandoned work still counted until it ended
    anyio.run(main)
