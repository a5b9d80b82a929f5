"""Search with nothing trained: `cirlab init`, indexes built from a method and a backbone, and caption_compose
(describe the reference, compose the target's description, search by its text feature) with its answer cache."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cirlab.methods.caption_compose.composer import (ComposeCache, ComposeItem, ComposeStats, compose,
                                                    parse_description)
from helpers.cli import run_cli

HELPERS = Path(__file__).parent / "helpers"


def cli(*args, ok=True):
    done = run_cli(*args)
    assert (done.returncode == 0) == ok, done.stderr[-2000:]
    return done


def test_parse_description_takes_the_first_sentence_line_without_labels():
    assert parse_description('Description: "a red circle at the top"\nmore') == "a red circle at the top"
    assert parse_description("\n  - New description: a blue square\n") == "a blue square"
    assert parse_description("1) target image: two green triangles") == "two green triangles"
    assert parse_description("  \n}{)(  \n") == ""
    assert parse_description("") == ""


def _val_queries(world, n):
    from cirlab.data.readers import read_split

    split = read_split("synth", world, "val")
    return split, split.queries[:n]


def test_the_oracle_composer_writes_the_true_target_caption_and_every_answer_is_cached(world, tmp_path):
    from cirlab.methods.caption_compose.composer import OracleComposer

    split, queries = _val_queries(world, 40)
    items = [ComposeItem(q.reference, split.captions[q.reference], q.text) for q in queries]
    items.append(ComposeItem("not-an-image", "a red circle", "make it blue"))  # no such query: fails
    cache, stats = ComposeCache(tmp_path / "compose.jsonl"), ComposeStats()
    out = compose(items, OracleComposer(world), cache, stats=stats)
    # at imperfection 0 the composed description is the target's own caption, for every query
    assert [o[0] for o in out[:40]] == [split.captions[q.targets[0]] for q in queries]
    assert out[40] == ["a red circle make it blue"]  # a failure falls back to the description and the text
    assert (stats.asked, stats.composed, stats.failed, stats.requests) == (41, 40, 1, 41)
    assert len(Path(cache.path).read_text().splitlines()) == 40  # the failure is not cached
    again = ComposeStats()
    assert compose(items, OracleComposer(world), ComposeCache(tmp_path / "compose.jsonl"), stats=again) == out
    assert (again.cached, again.requests, again.failed) == (40, 1, 1)  # only the failure is asked again
    noisy = compose(items[:40], OracleComposer(world, imperfection=0.5), cache, samples=2, stats=ComposeStats())
    changed = sum(o[0] != split.captions[q.targets[0]] for o, q in zip(noisy, queries))
    assert changed > 10 and all(len(o) == 2 for o in noisy)


def test_init_index_build_and_search_with_nothing_trained(clip_dir, world, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((Path(world) / "test1").glob("*.png"))[:30]:
        shutil.copy(p, photos / p.name)
    ckpt = tmp_path / "sum"
    assert "nothing trained" in cli("init", "--method", "sum", "--backbone", clip_dir, "--out", ckpt).stdout
    cli("index", "build", "--checkpoint", ckpt, "--images", photos, "--out", tmp_path / "a", "--no-progress")
    cli("index", "build", "--method", "sum", "--backbone", clip_dir, "--images", photos, "--out", tmp_path / "b",
        "--no-progress")
    assert json.loads((tmp_path / "b" / "checkpoint" / "cirlab.json").read_text())["method"] == "sum"
    hits = [json.loads(cli("search", "--index", tmp_path / ix, "--image-id", "test1-00003", "--text",
                           "make the circle red", "-k", "5", "--json").stdout)["hits"] for ix in ("a", "b")]
    assert len(hits[0]) == 5 and [h["id"] for h in hits[0]] == [h["id"] for h in hits[1]]
    assert "test1-00003" not in [h["id"] for h in hits[0]]
    err = cli("init", "--method", "combiner", "--backbone", clip_dir, "--out", tmp_path / "c", ok=False).stderr
    assert "learns (triplets)" in err and "cirlab train" in err
    err = cli("index", "build", "--checkpoint", ckpt, "--method", "sum", "--backbone", clip_dir, "--images", photos,
              "--out", tmp_path / "d", ok=False).stderr
    assert "give --checkpoint, or --method" in err
    assert "--method needs --backbone" in cli("index", "build", "--method", "sum", "--images", photos, "--out",
                                              tmp_path / "e", ok=False).stderr
    assert "not a cirlab checkpoint" in cli("init", "--method", "sum", "--backbone", clip_dir, "--out", photos,
                                            ok=False).stderr


def test_caption_compose_in_eval_oracle_ceiling_above_sum_and_falling_with_imperfection(clip_dir, world, tmp_path):
    r1 = {}
    for name, extra in (("sum", ["--method", "sum"]),
                        ("oracle", ["--method", "caption_compose", "--composer", "oracle"]),
                        ("noisy", ["--method", "caption_compose", "--composer", "oracle", "--config",
                                   json.dumps({"imperfection": 1.0, "oracle_root": str(world)})])):
        if name == "oracle":
            extra += ["--config", json.dumps({"oracle_root": str(world)})]
        cli("init", *extra, "--backbone", clip_dir, "--out", tmp_path / name)
        cli("eval", "--checkpoint", tmp_path / name, "--data-root", world, "--split", "test1", "--json",
            tmp_path / f"{name}.json", "--no-progress")
        r1[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["R@1"]
    assert r1["oracle"] > r1["sum"] + 10 and r1["oracle"] > r1["noisy"] + 10, r1
    notes = json.loads((tmp_path / "oracle.json").read_text())["notes"]
    assert notes["composed"] == notes["asked"] > 0 and notes["failed"] == 0
    assert (tmp_path / "oracle" / "cache" / "compose.jsonl").exists()
    import cirlab
    from cirlab.errors import CirlabError

    with pytest.raises(CirlabError, match="pass references="):
        cirlab.load(tmp_path / "oracle").encode_query([], ["make it red"])
    again = cli("eval", "--checkpoint", tmp_path / "oracle", "--data-root", world, "--split", "test1", "--json",
                tmp_path / "again.json", "--no-progress")
    assert '"requests": 0' in again.stdout  # every answer came from the checkpoint's cache
    assert json.loads((tmp_path / "again.json").read_text())["metrics"]["R@1"] == r1["oracle"]


def test_caption_compose_reads_the_captions_stored_at_ingest(clip_dir, world, tmp_path):
    import torch

    import cirlab
    from cirlab.data.images import open_image

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((Path(world) / "test1").glob("*.png"))[:25]:
        shutil.copy(p, photos / p.name)
    config = json.dumps({"composer": "oracle", "oracle_root": str(world)})
    err = cli("index", "build", "--method", "caption_compose", "--backbone", clip_dir, "--config", config,
              "--images", photos, "--out", tmp_path / "none", "--no-progress", ok=False).stderr
    assert "needs a caption of every image" in err
    cli("index", "build", "--method", "caption_compose", "--backbone", clip_dir, "--config", config, "--images",
        photos, "--captions", Path(world) / "synth" / "captions.jsonl", "--out", tmp_path / "ix", "--no-progress")
    from cirlab.index import ImageIndex

    index = ImageIndex(tmp_path / "ix")
    assert all(index.item(i)["caption"] for i in index.ids)  # each item keeps its description
    from cirlab.data.readers import read_split

    split = read_split("synth", world, "test1")
    q = next(q for q in split.queries if q.reference == "test1-00000")
    hits = json.loads(cli("search", "--index", tmp_path / "ix", "--image-id", q.reference, "--text", q.text,
                          "--json").stdout)["hits"]
    # brute force: the target's own caption (the oracle's composition) against every other photo's image feature
    model, ids = cirlab.load(tmp_path / "ix" / "checkpoint"), sorted(index.ids)
    with torch.no_grad():
        scores = model.text_feature([split.captions[q.targets[0]]]) @ model.image_feature(
            model.prepare([open_image(photos / f"{i}.png") for i in ids])).t()
    ranked = [ids[j] for j in scores[0].argsort(descending=True).tolist() if ids[j] != q.reference]
    assert [h["id"] for h in hits] == ranked[:10]
    assert q.targets[0] in ranked[:5]
    _an_upload_is_described_by_the_captioner(tmp_path / "ix", photos / "test1-00001.png", q.text, model)


def _an_upload_is_described_by_the_captioner(ix, upload, text: str, model) -> None:
    """An image that is not in the index needs a captioner (a clear CLI error, a 422 from the service); with one,
    its description and the text are composed."""
    import torch

    from cirlab.data.images import open_image
    from cirlab.serving.service import SearchService, ServiceError

    err = cli("search", "--index", ix, "--image", upload, "--text", text, ok=False).stderr
    assert "needs a captioner" in err
    with pytest.raises(ServiceError) as e:
        SearchService(ix).search(text, image=upload.read_bytes())
    assert e.value.status == 422

    class Fixed:
        """A captioner that describes every image as a red circle, and counts the images it saw."""
        model_id, seen = "fixed", []

        def generate(self, images, messages):
            self.seen += images
            levels = {"global": "g", "objects": "o", "details": "d", "final_caption": "a red circle"}
            return [json.dumps(levels)] * len(images)

    from cirlab.serving.engine import Engine

    engine = Engine(ix, captioner=Fixed())
    vector = engine.query_vector(open_image(upload), "make it blue")
    assert len(Fixed.seen) == 1 and engine.model.stats.failed == 1  # an upload is no query the oracle knows
    with torch.no_grad():  # so its description falls back to the captioner's description and the text
        expected = model.text_feature(["a red circle make it blue"])[0]
    assert np.allclose(vector, expected.numpy(), atol=1e-5)
    hits = SearchService(ix, captioner=Fixed()).search("make it blue", image=upload.read_bytes())
    assert len(hits["hits"]) == 10


def test_the_hf_composer_runs_a_local_causal_lm_and_counts_what_failed(tmp_path):
    sys.path.insert(0, str(HELPERS))
    from tiny_vlm import build_tiny_lm

    from cirlab.methods.caption_compose.composer import HFComposer

    folder = build_tiny_lm(tmp_path / "tiny-llama")
    composer = HFComposer(str(folder), max_new_tokens=12)
    assert not getattr(composer.model, "use_kernels", False)  # no Hub kernels (see backbones/base.py)
    items = [ComposeItem(f"img{i}", "a red circle", t) for i, t in enumerate(["make it blue", "add a square",
                                                                               "remove it"])]
    stats = ComposeStats()
    out = compose(items, composer, ComposeCache(tmp_path / "c.jsonl"), stats=stats, batch_size=2)
    assert len(out) == 3 and all(len(o) == 1 and o[0] for o in out)
    assert stats.composed + stats.failed == 3 and stats.requests == 3
    again = ComposeStats()
    compose(items, composer, ComposeCache(tmp_path / "c.jsonl"), stats=again)
    assert again.requests == stats.failed and again.cached == stats.composed


def test_caption_weight_scores_targets_by_image_and_caption(clip_dir, world):
    """s = (1 - w) cos(q, image) + w cos(q, caption), one target vector; targets then need their captions."""
    import torch

    from cirlab.backbones import load_backbone
    from cirlab.data.images import open_image
    from cirlab.errors import CirlabError
    from cirlab.methods import build_model
    from cirlab.types import Reference

    split, queries = _val_queries(world, 4)
    bb = load_backbone("clip", clip_dir)
    model = build_model("caption_compose", bb, {"composer": "oracle", "oracle_root": str(world),
                                                "caption_weight": 0.4}).eval()
    assert model.target_captions == "final_caption"
    names = [q.targets[0] for q in queries]
    pixels = model.prepare([open_image(split.gallery[n]) for n in names])
    with pytest.raises(CirlabError, match="pass captions="):
        model.encode_target(pixels)
    with torch.no_grad():
        q = model.encode_query(None, [x.text for x in queries],
                               [Reference(x.reference, split.captions[x.reference]) for x in queries])
        scores = model.similarity(q, model.encode_target(pixels, split.caption_texts(names)))
        image, caption = model.image_feature(pixels), model.text_feature(split.caption_texts(names))
    assert torch.allclose(scores, 0.6 * q @ image.t() + 0.4 * q @ caption.t(), atol=1e-5)
