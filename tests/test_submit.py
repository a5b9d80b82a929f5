"""Test-server files written from a checkpoint pass the checker; FashionIQ and Shoes evaluate end to end on
placeholder images (pixels are needed there, and only there)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers.cli import run_cli
from PIL import Image
from test_benchmarks import SHARED


def _cli(*args):
    return run_cli(*args, env={"HF_HUB_OFFLINE": "1"})


def _placeholder(path: Path, name: str) -> None:
    colour = tuple(hashlib.sha256(name.encode()).digest()[:3])
    Image.new("RGB", (40, 48), colour).save(path)


def test_submit_writes_files_the_checker_accepts(world, clip_dir, tmp_path):
    ckpt = tmp_path / "sum"
    assert _cli("train", "--method", "sum", "--data-root", world, "--backbone", clip_dir, "--out", ckpt).returncode == 0
    proc = _cli("submit", "--dataset", "cirr", "--checkpoint", ckpt, "--data-root", world, "--out", tmp_path / "sub",
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    recall = json.loads((tmp_path / "sub" / "test1_pred_ranks_recall.json").read_text())
    subset = json.loads((tmp_path / "sub" / "test1_pred_ranks_recall_subset.json").read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    rows = json.loads((world / "captions" / "cap.rc2.test1.json").read_text())
    assert all(len(recall[str(r["pairid"])]) == 50 and len(subset[str(r["pairid"])]) == 3 for r in rows)
    # the files score like the evaluation protocol ranks
    scored = _cli("score", "--dataset", "synth", "--data-root", world, "--split", "test1", "--predictions",
                  tmp_path / "sub" / "test1_pred_ranks_recall.json", "--subset-predictions",
                  tmp_path / "sub" / "test1_pred_ranks_recall_subset.json", "--json")
    evaluated = _cli("eval", "--checkpoint", ckpt, "--data-root", world, "--split", "test1", "--json",
                     tmp_path / "e.json", "--no-progress")
    assert scored.returncode == 0 and evaluated.returncode == 0, scored.stderr + evaluated.stderr
    got = json.loads(scored.stdout.strip().splitlines()[-1])
    want = json.loads((tmp_path / "e.json").read_text())["metrics"]
    for k, v in want.items():
        assert abs(got[k] - v) < 1e-6, k
    circo = _cli("submit", "--dataset", "circo", "--checkpoint", ckpt, "--data-root", world / "circo", "--out",
                 tmp_path / "csub", "--no-progress")
    assert circo.returncode == 0, circo.stderr
    doc = json.loads(next((tmp_path / "csub").glob("*.json")).read_text())
    assert all(len(v) == 50 and all(isinstance(i, int) for i in v) for v in doc.values())


def _tiny_fashioniq(root: Path, rows_per_category: int = 6) -> None:
    for cat in ("dress", "shirt", "toptee"):
        rows = json.loads((SHARED / "fashioniq" / "captions" / f"cap.{cat}.val.json").read_text())[:rows_per_category]
        names = json.loads((SHARED / "fashioniq" / "image_splits" / f"split.{cat}.val.json").read_text())[:12]
        names = sorted(set(names) | {r["target"] for r in rows} | {r["candidate"] for r in rows})
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(rows))
        (root / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
        for n in names:
            _placeholder(root / "images" / f"{n}.png", n)


def test_fashioniq_eval_reports_the_official_keys(clip_dir, tmp_path):
    root = tmp_path / "fashioniq"
    _tiny_fashioniq(root)
    ckpt = tmp_path / "image_only"
    assert _cli("train", "--method", "image_only", "--data-root", root, "--backbone", clip_dir, "--out",
                ckpt).returncode == 0
    for join in ("and", "both"):
        proc = _cli("eval", "--checkpoint", ckpt, "--dataset", "fashioniq", "--data-root", root, "--split", "val",
                    "--join", join, "--json", tmp_path / f"{join}.json", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        metrics = json.loads((tmp_path / f"{join}.json").read_text())["metrics"]
        assert list(metrics) == ["dress/R@10", "dress/R@50", "shirt/R@10", "shirt/R@50", "toptee/R@10",
                                 "toptee/R@50", "avg/R@10", "avg/R@50", "avg"]
        from cirlab.evaluation.per_query import read_records

        records = read_records(tmp_path / f"{join}.per_query.jsonl")  # keys "<category>/<row>", all categories
        for cat in ("dress", "shirt", "toptee"):
            mine = [r for r in records if r["query"].startswith(f"{cat}/")]
            assert mine and abs(100 * sum(r["rank"] <= 10 for r in mine) / len(mine) - metrics[f"{cat}/R@10"]) < 1e-9
    # image_only with the reference kept ranks the reference itself first: R@10 is below 100 only if targets
    # are pushed out, and removing the reference can only raise recall
    kept = json.loads((tmp_path / "and.json").read_text())["metrics"]
    proc = _cli("eval", "--checkpoint", ckpt, "--dataset", "fashioniq", "--data-root", root, "--split", "val",
                "--reference", "remove", "--json", tmp_path / "rm.json", "--no-progress")
    removed = json.loads((tmp_path / "rm.json").read_text())["metrics"]
    assert proc.returncode == 0 and removed["avg/R@10"] >= kept["avg/R@10"]
