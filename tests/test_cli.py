"""The `cirlab` command through its `main()` (tests/helpers/cli.py); user errors end with one line naming the file
or value, no traceback."""
from __future__ import annotations

import json

import pytest
from helpers.cli import run_cli


def cirlab(*args, cwd=None):
    return run_cli(*args, cwd=cwd, env={"HF_HUB_OFFLINE": "1"})


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cirlab: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_data_root(tmp_path):
    _one_line_error(cirlab("eval", "--checkpoint", tmp_path / "ckpt", "--data-root", tmp_path / "nowhere",
                           "--split", "val"), "data root not found", str(tmp_path / "nowhere"))
    _one_line_error(cirlab("pretrain", "--backbone", "clip", "--data", tmp_path / "nowhere", "--out",
                           tmp_path / "o"), str(tmp_path / "nowhere"))


def test_malformed_annotation_file_names_the_file_and_row(world, clip_dir, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(world / "captions", root / "captions")
    shutil.copytree(world / "image_splits", root / "image_splits")
    ckpt = tmp_path / "ckpt"
    assert cirlab("train", "--method", "sum", "--data-root", root, "--backbone", clip_dir, "--out",
                  ckpt).returncode == 0
    path = root / "captions" / "cap.rc2.val.json"
    rows = json.loads(path.read_text())
    del rows[3]["caption"]
    path.write_text(json.dumps(rows))
    _one_line_error(cirlab("eval", "--checkpoint", ckpt, "--data-root", root, "--split", "val"),
                    str(path), "row 3", "'caption'")
    path.write_text("{not json")
    _one_line_error(cirlab("eval", "--checkpoint", ckpt, "--data-root", root, "--split", "val"),
                    "malformed JSON", str(path))


def test_missing_checkpoint_names_the_folder(world, tmp_path):
    _one_line_error(cirlab("eval", "--checkpoint", tmp_path / "ckpt", "--data-root", world, "--split", "val"),
                    "not a cirlab checkpoint", str(tmp_path / "ckpt"))


def test_unknown_method_names_the_value(world, clip_dir, tmp_path):
    _one_line_error(cirlab("train", "--method", "magic", "--data-root", world, "--backbone", clip_dir, "--out",
                           tmp_path / "x"), "'magic'", "combiner")


def test_synth_then_eval_writes_json(clip_dir, world, tmp_path):
    ckpt = tmp_path / "image_only"
    assert cirlab("train", "--method", "image_only", "--data-root", world, "--backbone", clip_dir, "--out",
                  ckpt).returncode == 0
    proc = cirlab("eval", "--checkpoint", ckpt, "--data-root", world, "--split", "test1", "--json",
                  tmp_path / "m.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "| image_only |" in proc.stdout
    doc = json.loads((tmp_path / "m.json").read_text())
    assert set(doc["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"}
    assert list((ckpt / "cache").glob("gallery-*.pt")), "gallery features are cached per checkpoint"
    from cirlab.evaluation.per_query import metrics_from_records, read_records

    records = read_records(tmp_path / "m.per_query.jsonl")  # written beside the metrics, named in them
    assert doc["per_query"] == "m.per_query.jsonl" and len(records) == 200
    assert metrics_from_records(records, list(doc["metrics"])) == pytest.approx(doc["metrics"], abs=1e-9)
    again = cirlab("eval", "--checkpoint", ckpt, "--data-root", world, "--split", "test1", "--json",
                   tmp_path / "m2.json", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "m2.json").read_text())["metrics"] == doc["metrics"]
    # --limit: the first 50 queries, each ranked as in the full run (against the whole gallery)
    part = cirlab("eval", "--checkpoint", ckpt, "--data-root", world, "--split", "test1", "--limit", "50", "--json",
                  tmp_path / "m3.json", "--no-progress")
    assert part.returncode == 0, part.stderr
    assert json.loads((tmp_path / "m3.json").read_text())["query_limit"] == 50
    assert read_records(tmp_path / "m3.per_query.jsonl") == records[:50]


def test_gallery_cache_follows_the_backbone_a_zero_shot_checkpoint_points_to(clip_dir, tmp_path):
    import shutil

    from cirlab.methods import checkpoint_identity

    backbone = tmp_path / "bb"
    shutil.copytree(clip_dir, backbone)
    ckpt = tmp_path / "image_only"
    assert cirlab("train", "--method", "image_only", "--data-root", tmp_path, "--backbone", backbone, "--out",
                  ckpt).returncode == 0
    before = checkpoint_identity(ckpt)
    (ckpt / "eval-synth-val.json").write_text("{}")  # a result written beside the checkpoint is not part of it
    assert checkpoint_identity(ckpt) == before
    weights = backbone / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new file: the identity must change
    assert checkpoint_identity(ckpt) != before


def test_eval_on_the_circo_layout_reports_map(clip_dir, world, tmp_path):
    ckpt = tmp_path / "sum"
    assert cirlab("train", "--method", "sum", "--data-root", world, "--backbone", clip_dir, "--out",
                  ckpt).returncode == 0
    proc = cirlab("eval", "--checkpoint", ckpt, "--dataset", "synth-circo", "--data-root", world, "--split", "val",
                  "--json", tmp_path / "c.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "c.json").read_text())["metrics"]
    assert {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50"} == set(metrics)
    from cirlab.evaluation.per_query import metrics_from_records, read_records

    records = read_records(tmp_path / "c.per_query.jsonl")  # every ground truth's rank: mAP follows exactly
    assert all(len(r["gt_ranks"]) >= 1 and r["subset_rank"] is None for r in records)
    assert metrics_from_records(records, list(metrics)) == pytest.approx(metrics, abs=1e-9)
    assert metrics["mAP@5"] <= 100 and metrics["R@50"] >= metrics["R@5"]


def test_pretrain_command_saves_a_loadable_clip(world, tmp_path):
    proc = cirlab("pretrain", "--backbone", "clip", "--data", world, "--out", tmp_path / "clip", "--epochs", "1",
                  "--steps-per-epoch", "3", "--batch-size", "16", "--no-progress",
                  "--backbone-config", '{"width": 32, "layers": 1, "dim": 16}')
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tmp_path / "clip")
    assert model.config.projection_dim == 16
    assert len(AutoTokenizer.from_pretrained(tmp_path / "clip")) == 49408
    bad = cirlab("pretrain", "--backbone", "clip", "--data", world, "--out", tmp_path / "x",
                 "--backbone-config", "{width: 3")
    _one_line_error(bad, "--backbone-config")


@pytest.mark.parametrize("args", [["synth", "--out", "x", "--size", "huge"], ["demo"]])
def test_argument_errors_exit_non_zero(args, tmp_path):
    proc = cirlab(*args, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_demo_refuses_a_device_it_cannot_train_on_before_writing_anything(tmp_path):
    import torch

    devices = ["mps"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        _one_line_error(cirlab("demo", "--quick", "--out", tmp_path / "d", "--device", device), f"--device {device}")
    _one_line_error(cirlab("demo", "--quick", "--profile", "full", "--out", tmp_path / "d"), "--profile full")
    assert not (tmp_path / "d" / "data").exists()


def test_the_gallery_cache_misses_when_an_image_changes_and_names_a_missing_one(clip_dir, world, tmp_path):
    """Shuffled, replaced or missing gallery images since the features were cached: recomputed or refused, never
    the stale features (issue 20)."""
    import shutil
    from pathlib import Path

    import torch

    import cirlab
    from cirlab.data.images import PixelStore
    from cirlab.data.split import Split
    from cirlab.errors import CirlabError
    from cirlab.evaluation.protocols import encode_gallery
    from cirlab.training.train import save_zero_shot

    folder = tmp_path / "g"
    folder.mkdir()
    src = sorted((Path(world) / "test1").glob("*.png"))[:6]
    for p in src:
        shutil.copy(p, folder / p.name)
    split = Split("synth", "tiny", [], {p.stem: str(folder / p.name) for p in src})
    model = cirlab.load(save_zero_shot("image_only", clip_dir, tmp_path / "io"))
    cache = tmp_path / "cache"

    def features():
        return encode_gallery(model, split, PixelStore(split.gallery, model.preprocess), cache_dir=cache,
                              model_id="m", progress=False)[1]
    before = features()
    shutil.copy(src[1], folder / src[0].name)  # image 0 now holds image 1's pixels
    after = features()
    assert len(list(cache.glob("*.pt"))) == 2  # the cache missed
    assert torch.allclose(after[0], before[1], atol=1e-5) and not torch.allclose(after[0], before[0], atol=1e-3)
    (folder / src[3].name).write_bytes(b"not an image")  # a broken image: named, cache or not
    with pytest.raises(CirlabError, match=f"cannot read image .*{src[3].name}"):
        features()
    (folder / src[2].name).unlink()
    with pytest.raises(CirlabError, match=f"gallery image {src[2].stem} .* is missing"):
        features()
