"""Real benchmark annotation files (shared/benchmarks, no images): readers, official scoring, submission checks.

Expected metric values are computed here independently of the scorer: predictions place each target at a chosen
position, so R@K is a count of positions below K, and CIRCO AP@K follows from the sorted positions of the ground
truths.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.cli import run_cli

from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.evaluation.scoring import score
from cirlab.evaluation.submission import check_submission

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
if not SHARED.exists():  # a clone placed elsewhere: the workplace keeps shared/ beside the checkout
    SHARED = Path("/work/shared/benchmarks")
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="shared/benchmarks (the real annotation files) absent")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Writable copies of the four benchmarks' annotation files, in the layouts cirlab expects."""
    base = tmp_path_factory.mktemp("benchmarks")
    for name in ("cirr", "fashioniq", "circo", "shoes"):
        shutil.copytree(SHARED / name, base / name)
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return base


def _place(target: str, filler: list, pos: int, length: int = 50) -> list:
    """A ranked list of `length` ids with `target` at index `pos` (absent when pos >= length)."""
    lst = [f for f in filler if f != target][:length]
    if pos < length:
        lst = lst[:pos] + [target] + lst[pos:length - 1]
    return lst


def _expected_recall(positions: list, k: int) -> float:
    return 100.0 * sum(1 for p in positions if p < k) / len(positions)


def test_cirr_val_score_matches_independent_counts(roots, tmp_path):
    root = roots / "cirr"
    rows = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    names = sorted(json.loads((root / "image_splits" / "split.rc2.val.json").read_text()))
    preds, subset, pos, spos = {"version": "rc2", "metric": "recall"}, {}, [], []
    for i, r in enumerate(rows):
        p = (i * 7) % 61
        filler = [n for n in names[:60] if n != r["reference"]]
        preds[str(r["pairid"])] = _place(r["target_hard"], filler, p)
        others = [m for m in r["img_set"]["members"] if m not in (r["reference"], r["target_hard"])]
        q = i % 4
        subset[str(r["pairid"])] = _place(r["target_hard"], others, q, 3)
        pos.append(p)
        spos.append(q)
    (tmp_path / "p.json").write_text(json.dumps(preds))
    (tmp_path / "s.json").write_text(json.dumps(subset))
    got = score("cirr", root, "val", tmp_path / "p.json", tmp_path / "s.json")
    want = {f"R@{k}": _expected_recall(pos, k) for k in (1, 5, 10, 50)}
    want |= {f"Rsubset@{k}": _expected_recall(spos, k) for k in (1, 2, 3)}
    want["Avg"] = (want["R@5"] + want["Rsubset@1"]) / 2
    assert set(got) == set(want)
    for k in want:
        assert abs(got[k] - want[k]) < 1e-6, k
    assert len(rows) == 4181


def test_circo_val_map_matches_independent_formula(roots, tmp_path):
    root = roots / "circo"
    rows = json.loads((root / "annotations" / "val.json").read_text())
    preds, expected = {}, {f"mAP@{k}": 0.0 for k in (5, 10, 25, 50)} | {f"R@{k}": 0.0 for k in (5, 10, 25, 50)}
    for i, r in enumerate(rows):
        gts = r["gt_img_ids"]
        positions = sorted({(i * 3 + 13 * j) % 57 for j in range(len(gts))})
        ranked = [10**9 + n for n in range(50)]  # ids no query uses
        placed = {}
        for g, p in zip(gts, positions):
            if p < 50:
                ranked[p] = g
                placed[g] = p
        preds[str(r["id"])] = ranked
        hits = sorted(placed.values())
        for k in (5, 10, 25, 50):
            ap = sum((m + 1) / (h + 1) for m, h in enumerate(hits) if h < k) / min(k, len(gts))
            expected[f"mAP@{k}"] += 100 * ap / len(rows)
            expected[f"R@{k}"] += 100 * (placed.get(r["target_img_id"], 99) < k) / len(rows)
    (tmp_path / "c.json").write_text(json.dumps(preds))
    got = score("circo", root, "val", tmp_path / "c.json")
    assert set(got) == set(expected)
    for k in expected:
        assert abs(got[k] - expected[k]) < 1e-6, k


def test_fashioniq_val_score_per_category(roots, tmp_path):
    root = roots / "fashioniq"
    preds, pos = {}, {}
    for cat in ("dress", "shirt", "toptee"):
        rows = json.loads((root / "captions" / f"cap.{cat}.val.json").read_text())
        names = json.loads((root / "image_splits" / f"split.{cat}.val.json").read_text())
        for i, r in enumerate(rows):
            p = (i * 5) % 70
            preds[f"{cat}/{i}"] = _place(r["target"], names[:80], p)
            pos.setdefault(cat, []).append(p)
    (tmp_path / "f.json").write_text(json.dumps(preds))
    got = score("fashioniq", root, "val", tmp_path / "f.json")
    want = {f"{c}/R@{k}": _expected_recall(pos[c], k) for c in pos for k in (10, 50)}
    for k in (10, 50):
        want[f"avg/R@{k}"] = sum(want[f"{c}/R@{k}"] for c in pos) / 3
    want["avg"] = (want["avg/R@10"] + want["avg/R@50"]) / 2
    assert list(got) == ["dress/R@10", "dress/R@50", "shirt/R@10", "shirt/R@50", "toptee/R@10", "toptee/R@50",
                         "avg/R@10", "avg/R@50", "avg"]
    for k in want:
        assert abs(got[k] - want[k]) < 1e-6, k


def test_shoes_splits_and_score(roots, tmp_path):
    root = roots / "shoes"
    test, train = read_split("shoes", root, "test"), read_split("shoes", root, "train")
    assert len(test.queries) == 1761 and len(train.queries) == 8990
    assert len(test.gallery) == 4658
    rows = json.loads((root / "relative_captions_shoes.json").read_text())
    names = sorted(test.gallery)
    preds, pos = {}, []
    for q in test.queries:
        p = int(q.key) % 55
        preds[q.key] = _place(rows[int(q.key)]["ImageName"], names[:60], p)
        pos.append(p)
    (tmp_path / "s.json").write_text(json.dumps(preds))
    got = score("shoes", root, "test", tmp_path / "s.json")
    want = {f"R@{k}": _expected_recall(pos, k) for k in (1, 10, 50)}
    want["avg"] = sum(want.values()) / 3
    assert list(got) == ["R@1", "R@10", "R@50", "avg"]
    for k in want:
        assert abs(got[k] - want[k]) < 1e-6, k


def test_score_rejects_missing_extra_and_duplicates(roots, tmp_path):
    root = roots / "shoes"
    test = read_split("shoes", root, "test")
    good = {q.key: [q.targets[0]] for q in test.queries}
    cases = {
        "missing": ({k: v for k, v in list(good.items())[1:]}, "have no prediction"),
        "extra": (good | {"999999": ["x"]}, "not queries of this split"),
        "dup_id": (good | {test.queries[0].key: ["a.jpg", "b.jpg", "a.jpg"]}, "appears twice in its ranking"),
    }
    for name, (preds, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(preds))
        with pytest.raises(CirlabError, match=message) as err:
            score("shoes", root, "test", path)
        assert str(path) in str(err.value)
    path = tmp_path / "dup_key.json"
    path.write_text('{"5": ["a"], "5": ["b"]}')
    with pytest.raises(CirlabError, match="'5' appears twice"):
        score("shoes", root, "test", path)
    with pytest.raises(CirlabError, match="no ground truth"):
        score("cirr", roots / "cirr", "test1", path)


def test_fashioniq_joins_and_image_extension(roots, tmp_path):
    root = roots / "fashioniq"
    row = json.loads((root / "captions" / "cap.dress.val.json").read_text())[0]
    c1, c2 = row["captions"]
    q = read_split("fashioniq", root, "val", category="dress").queries[0]
    assert q.text == f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}" and q.key == "dress/0"
    assert read_split("fashioniq", root, "val", join="reversed", category="dress").queries[0].text == \
        f"{c2.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"
    both = read_split("fashioniq", root, "val", join="both", category="dress").queries[0]
    assert both.alt_texts == (f"{c2.strip('.?, ').capitalize()} and {c1.strip('.?, ')}",)
    assert read_split("fashioniq", root, "val", category="dress").gallery[row["target"]].endswith(".jpg")
    other = tmp_path / "fiq"
    shutil.copytree(root, other)
    (other / "images").mkdir()
    (other / "images" / f"{row['target']}.png").write_bytes(b"")
    assert read_split("fashioniq", other, "val", category="dress").gallery[row["target"]].endswith(".png")
    merged = read_split("fashioniq", root, "val")
    assert len(merged.queries) == sum(len(json.loads((root / "captions" / f"cap.{c}.val.json").read_text()))
                                      for c in ("dress", "shirt", "toptee"))


def test_malformed_annotation_names_file_row_and_field(roots, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(roots / "fashioniq", root)
    path = root / "captions" / "cap.shirt.val.json"
    rows = json.loads(path.read_text())
    rows[7]["captions"] = ["only one"]
    path.write_text(json.dumps(rows))
    with pytest.raises(CirlabError, match=r"cap\.shirt\.val\.json: row 7 field 'captions'"):
        read_split("fashioniq", root, "val")
    circo = tmp_path / "circo"
    shutil.copytree(roots / "circo", circo)
    rows = json.loads((circo / "annotations" / "val.json").read_text())
    rows[2]["reference_img_id"] = "abc"
    (circo / "annotations" / "val.json").write_text(json.dumps(rows))
    with pytest.raises(CirlabError, match=r"val\.json: row 2 field 'reference_img_id' should be int"):
        read_split("circo", circo, "val", require_gallery=False)


def _cli(*args):
    return run_cli(*args)


def _circo_listing(root: Path, extra_ids=()):
    """A COCO unlabeled listing holding every id the annotations and the example submission use."""
    ids = set(extra_ids)
    for split in ("val", "test"):
        for r in json.loads((root / "annotations" / f"{split}.json").read_text()):
            ids |= {r["reference_img_id"], *r.get("gt_img_ids", [])}
        ids |= {i for v in json.loads((root / "submission_examples" / f"submission_{split}.json").read_text()).values()
                for i in v}
    (root / "image_info_unlabeled2017.json").write_text(
        json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in sorted(ids)]}))


def test_maintainers_example_submissions_pass(roots):
    cirr = roots / "cirr"
    files = sorted((cirr / "demo_submission").glob("*.json"))
    assert check_submission("cirr", cirr, "test1", files) == ([], [])
    proc = _cli("check-submission", "--dataset", "cirr", "--data-root", cirr, "--split", "test1", *files)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    circo = roots / "circo"
    _circo_listing(circo)
    for split in ("val", "test"):
        path = circo / "submission_examples" / f"submission_{split}.json"
        assert check_submission("circo", circo, split, [path]) == ([], [])


def _broken_cirr(roots, tmp_path) -> dict:
    cirr = roots / "cirr"
    recall = json.loads((cirr / "demo_submission" / "test1_pred_ranks_recall.json").read_text())
    subset = json.loads((cirr / "demo_submission" / "test1_pred_ranks_recall_subset.json").read_text())
    rows = {str(r["pairid"]): r for r in json.loads((cirr / "captions" / "cap.rc2.test1.json").read_text())}
    k = next(k for k in recall if k not in ("version", "metric"))
    ref = rows[k]["reference"]
    outsider = next(m for m in json.loads((cirr / "image_splits" / "split.rc2.test1.json").read_text())
                    if m not in rows[k]["img_set"]["members"])
    cases = {
        "missing query": (recall, lambda d: d.pop(k), "is missing"),
        "extra query": (recall, lambda d: d.update({"99999999": d[k]}), "not a query of this split"),
        "wrong length": (recall, lambda d: d.update({k: d[k][:49]}), "49 ids, expected 50"),
        "duplicate ids": (recall, lambda d: d.update({k: d[k][:49] + d[k][:1]}), "given twice"),
        "outside gallery": (recall, lambda d: d.update({k: d[k][:49] + ["dev-1-1-img0"]}), "outside the gallery"),
        "reference in ranking": (recall, lambda d: d.update({k: d[k][:49] + [ref]}), "is in its own ranking"),
        "subset outside img_set": (subset, lambda d: d.update({k: d[k][:2] + [outsider]}), "outside its img_set"),
        "subset is reference": (subset, lambda d: d.update({k: d[k][:2] + [ref]}), "is in its own ranking"),
        "missing version": (recall, lambda d: d.pop("version"), "missing key 'version'"),
        "missing metric": (subset, lambda d: d.pop("metric"), "missing key 'metric'"),
        "over 5 MB": (recall, lambda d: d.update({"padding": None}), "over the server's 5 MB limit"),
    }
    out = {}
    for name, (base, mutate, message) in cases.items():
        d = json.loads(json.dumps(base))
        mutate(d)
        path = tmp_path / (name.replace(" ", "_") + ".json")
        text = json.dumps(d)
        if name == "over 5 MB":
            text = json.dumps({kk: v for kk, v in d.items() if kk != "padding"}, indent=40)
        path.write_text(text)
        out[name] = (path, message)
    return out


def test_check_submission_rejects_each_kind_of_broken_file(roots, tmp_path):
    cirr = roots / "cirr"
    for name, (path, message) in _broken_cirr(roots, tmp_path).items():
        problems, _ = check_submission("cirr", cirr, "test1", [path])
        assert any(message in p for p in problems), (name, problems[:5])
    circo = roots / "circo"
    _circo_listing(circo)
    base = json.loads((circo / "submission_examples" / "submission_test.json").read_text())
    k = next(iter(base))
    for mutate, message in ((lambda d: d.update({k: d[k][:10]}), "10 ids, expected 50"),
                            (lambda d: d.update({k: d[k][:49] + [7]}), "outside the gallery"),
                            (lambda d: d.update({k: d[k][:49] + d[k][:1]}), "given twice"),
                            (lambda d: d.pop(k), "is missing")):
        d = json.loads(json.dumps(base))
        mutate(d)
        path = tmp_path / "circo.json"
        path.write_text(json.dumps(d))
        problems, _ = check_submission("circo", circo, "test", [path])
        assert any(message in p for p in problems), (message, problems[:5])


def test_check_submission_cli_lists_the_first_20_and_a_count(roots, tmp_path):
    cirr = roots / "cirr"
    recall = json.loads((cirr / "demo_submission" / "test1_pred_ranks_recall.json").read_text())
    keys = [k for k in recall if k not in ("version", "metric")][:30]
    for k in keys:
        recall[k] = recall[k][:10]
    path = tmp_path / "short.json"
    path.write_text(json.dumps(recall))
    proc = _cli("check-submission", "--dataset", "cirr", "--data-root", cirr, "--split", "test1", path)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 21 and lines[-1] == "30 problems (first 20 shown)"
    assert all("10 ids, expected 50" in line for line in lines[:20])


def test_data_check_reports_present_and_missing(roots, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(roots / "fashioniq", root)
    (root / "captions" / "cap.dress.test.json").unlink()
    (root / "images").mkdir()
    names = json.loads((root / "image_splits" / "split.dress.val.json").read_text())[:3]
    for n in names:
        (root / "images" / f"{n}.png").write_bytes(b"")
    proc = _cli("data", "check", "--dataset", "fashioniq", "--data-root", root)
    assert proc.returncode == 1
    assert "MISSING captions/cap.dress.test.json" in proc.stdout
    assert "images: 3 found" in proc.stdout and "(.png: 3)" in proc.stdout
    assert "first missing: images/" in proc.stdout


def test_cirr_layouts_resolve_images(roots, tmp_path):
    """CLIP4Cir's layout (annotations under cirr/, images beside) and CIRR's img_raw/ both find the images."""
    names = json.loads((roots / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    name, rel = next(iter(names.items()))
    clip4cir = tmp_path / "cirr_dataset"
    shutil.copytree(roots / "cirr" / "captions", clip4cir / "cirr" / "captions")
    shutil.copytree(roots / "cirr" / "image_splits", clip4cir / "cirr" / "image_splits")
    (clip4cir / rel).parent.mkdir(parents=True)
    (clip4cir / rel).write_bytes(b"")
    split = read_split("cirr", clip4cir, "val")
    assert Path(split.gallery[name]) == (clip4cir / rel).resolve() and Path(split.gallery[name]).exists()
    raw = tmp_path / "cirr_raw"
    shutil.copytree(roots / "cirr", raw)
    (raw / "img_raw" / rel).parent.mkdir(parents=True)
    assert Path(read_split("cirr", raw, "val").gallery[name]) == (raw / "img_raw" / rel).resolve()
    proc = _cli("data", "check", "--dataset", "cirr", "--data-root", clip4cir)
    assert "ok      cirr/captions/cap.rc2.val.json" in proc.stdout and "MISSING cirr/captions/cap.rc2.train.json" \
        in proc.stdout and "images: 1 found" in proc.stdout
