"""Mapping to composing: modules that start as the identity, stage-wise training, soft alignment and hard-negative
mining against hand-computed cases, triplet synthesis, and the zero-shot pipeline end to end."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import run_cli

import cirlab
from cirlab.backbones import load_backbone, tiny_backbone
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.evaluation.protocols import evaluate
from cirlab.layers.text_injection import BottleneckAdapter, GatedCrossAttention
from cirlab.methods import build_model
from cirlab.training.loop import TrainConfig
from cirlab.training.synthesis import synthesize_triplets
from cirlab.training.train import train_method
from cirlab.training.zero_shot import train_zero_shot, world_vocab
from cirlab.types import Batch


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return tiny_backbone("clip", patch_size=16, width=64, layers=2, dim=32).eval()


def test_layer_by_layer_text_encoder_equals_the_model(bb):
    tok = bb.tokenize(["a photo of a red cat", "make it blue and larger please"])
    assert torch.allclose(bb.encode_text(tok), bb.encode_text_from(tok), atol=1e-6)


def test_injection_and_adapters_start_as_the_identity(bb):
    h, v = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    assert torch.equal(GatedCrossAttention(64, 64)(h, v), h)
    assert torch.equal(BottleneckAdapter(64, 8)(h), h)
    model = build_model("mapcompose", bb)
    visual = model.frozen_image_stage()(torch.randn(2, 3, 64, 64))
    feat, word = model.compose(visual, ["a photo of $", "a photo of $ that is red"])
    tok = bb.tokenize(["a photo of $", "a photo of $ that is red"])
    embeds = bb.word_embeddings(tok["input_ids"]).clone()
    embeds[tok["input_ids"] == model.placeholder] = word
    assert torch.allclose(feat, bb.encode_text_from(tok, embeds), atol=1e-5)


def test_each_stage_trains_only_its_part(bb):
    model = build_model("mapcompose", bb)
    px = torch.randn(4, 3, 64, 64)
    caps = ["a small red circle", "a large blue star at the top", "a green square", "a cyan cross at the left"]
    model.loss(Batch(px, caps, px, None, list("abcd"))).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["injection.1.gate_attn"] is not None and grads["injection.1.gate_attn"].abs() > 0
    assert grads["learner.query"] is not None and all(grads[n] is None for n in grads if n.startswith("adapters"))
    assert all(g is None for n, g in grads.items() if n.startswith("backbone."))
    model.zero_grad(set_to_none=True)
    model.set_stage("composing")
    model.train()
    model.loss(Batch(px, ["make it red", "add a star", "remove it", "bigger"], px, None, list("abcd"))).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["adapters.0.up.weight"].abs().sum() > 0
    assert all(grads[n] is None for n in grads if n.startswith(("learner", "injection", "backbone.")))
    p2w = build_model("pic2word", bb)
    assert p2w.inject_at == [] and len(p2w.adapters) == 0 and not p2w.config.soft_align


def test_soft_alignment_matches_a_hand_computation(bb):
    model = build_model("mapcompose", bb, {"soft_align_tau": 0.5})
    word = torch.randn(1, 64)
    tok = bb.tokenize(["a red star at the top"])
    ids = tok["input_ids"][0]
    content = [i for i in ids[1:-1].tolist() if i not in model.stop_ids]  # "red", "star", "top"
    assert len(content) == 3
    emb = bb.word_embeddings(torch.tensor(content))
    a = (F.cosine_similarity(word, emb) / 0.5).softmax(0)
    expected = 1 - F.cosine_similarity(word, (a[:, None] * emb).sum(0, keepdim=True))
    assert torch.allclose(model.soft_alignment(word, ["a red star at the top"]), expected.mean(), atol=1e-6)


def test_hard_negatives_never_include_a_positive(bb):
    model = build_model("mapcompose", bb, {"hard_negatives": 3})
    feats = F.normalize(torch.randn(6, 32), dim=-1)
    names = [f"n{i}" for i in range(6)]
    keys = ["same", "same", "k2", "k3", "k4", "k5"]  # n0 and n1 show the same scene
    model.set_negative_pool(feats, names, keys, total_steps=10)
    q = feats[1:2].clone()  # the query sits exactly on n1, the positive's twin
    negs = model._mine(q, ["same"], model.pool)
    chosen = {int((feats == n).all(1).nonzero()) for n in negs[0]}
    assert len(chosen) == 3 and not chosen & {0, 1}
    nearest = (q @ feats.t())[0].argsort(descending=True).tolist()
    fits = [i for i in nearest if i > 1][:2]  # the two closest non-twins also fit the edit: never negatives
    negs = model._mine(q, ["same"], model.pool, [{names[i] for i in fits}])
    chosen = {int((feats == n).all(1).nonzero()) for n in negs[0]}
    assert chosen == set(range(2, 6)) - set(fits)  # only two candidates left: fewer negatives, none excluded


@pytest.mark.parametrize("mine_reference", [True, False])
def test_the_reference_is_mined_only_when_asked(bb, mine_reference):
    """One row (reference r, target t) against a pool of t, r and two others, 3 negatives asked: the reference is
    among the candidates unless `mine_reference` is off, which leaves two."""
    model = build_model("mapcompose", bb, {"hard_negatives": 3, "hard_negative_start": 0.0,
                                           "mine_reference": mine_reference})
    model.set_stage("composing")
    model.train()
    names = ["t", "r", "a", "b"]
    model.set_negative_pool(F.normalize(torch.randn(4, 32), dim=-1), names, names, total_steps=10)
    px = torch.randn(1, 3, 64, 64)
    out = model.loss(Batch(px, ["make it red"], px, None, ["t"], [()], ["r"]))
    assert out.parts["hard_negatives"] == (3.0 if mine_reference else 2.0)


def test_synthesis_edits_captions_and_retrieves_matching_targets(world):
    split = read_split("synth", world, "train")
    captions = {n: split.captions[n] for n in split.gallery if n in split.captions}
    syn = synthesize_triplets(captions, 60, world_vocab(world), seed=3)
    again = synthesize_triplets(captions, 60, world_vocab(world), seed=3)
    assert [q.text for q in syn.queries] == [q.text for q in again.queries]  # seeded
    assert len(syn.queries) == 60 and sum(syn.rules.values()) == 60 and min(syn.match_f1) >= 0.8
    from cirlab.data.synth.world import TEMPLATES

    benchmark = {t.split("{")[0].strip() for ts in TEMPLATES.values() for t in ts if not t.startswith("{")}
    for q in syn.queries:
        assert q.reference != q.targets[0] and captions[q.reference] != captions[q.targets[0]]
        assert not any(q.text.startswith(p) for p in benchmark if p), q.text  # not the world's own wording
    removed = [q for q in syn.queries if q.text.startswith("without the ")]
    assert removed
    for q in removed:  # the removed clause is gone from the target's caption
        clause = q.text.split("the ", 1)[1]
        assert clause not in captions[q.targets[0]]
    for q in syn.queries:  # every other acceptable target fits the edit no worse than 0.05 below the chosen one
        assert q.reference not in q.targets and len(set(q.targets)) == len(q.targets)
    with pytest.raises(CirlabError, match="rule"):
        synthesize_triplets(captions, 5, {}, rules=("swap", "rotate"))


def test_swaps_name_the_object_minimally_and_keep_positions_whole():
    from cirlab.training.synthesis import _edit, _reference, _spots

    vocab = {"colour": ["red", "blue"], "shape": ["circle", "star"], "size": ["small", "large"],
             "position": ["top", "top left", "left", "center"]}
    clauses = ["a small red circle at the top left", "a large red star at the center", "a small blue circle at the top"]
    assert _reference(clauses[1], clauses, vocab, "shape") == "star"
    assert _reference(clauses[0], clauses, vocab, "shape") == "red circle"  # two circles, one red
    assert _reference("a red circle at the top", ["a red circle at the top", "a red circle at the left"], vocab,
                      "shape") == "red circle at the top"  # colour and size cannot tell them apart
    words = clauses[0].split()
    assert [(" ".join(words[i:i + n]), cls) for i, n, cls in _spots(words, vocab)] == [
        ("small", "size"), ("red", "colour"), ("circle", "shape"), ("top left", "position")]

    class Fixed:  # a generator that always picks the last spot and the first replacement
        def integers(self, n):
            return n - 1 if n == 4 else 0
    edited, name, fields = _edit("swap", clauses[0], "", vocab, Fixed())
    assert name == "swap_position" and fields["old_word"] == "top left" and fields["new_word"] == "top"
    assert edited == "a small red circle at the top" and fields["ref"] == "circle"  # alone in its caption


def test_benchmark_prompts_follow_the_split(bb):
    model = build_model("mapcompose", bb)
    assert model.prompt_for("fashioniq", "toptee.val") == "a photo of $ top that {text}"
    assert model.prompt_for("cirr", "test1") == "a photo of $ that {text}"
    assert model.prompt_for("synth", "test1") == model.config.compose_template
    px = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = model.encode_query(px, ["is red and has long sleeves"])
        with model.query_context("fashioniq", "dress.val"):
            dress = model.encode_query(px, ["is red and has long sleeves"])
        assert torch.equal(model.encode_query(px, ["is red and has long sleeves"]), plain)  # restored
        by_hand = F.normalize(model.compose(model._visual(px), ["a photo of $ dress that is red and has long "
                                                                "sleeves"])[0], dim=-1)
    assert torch.allclose(dress, by_hand, atol=1e-6) and not torch.allclose(dress, plain)
    bad = build_model("mapcompose", bb, {"benchmark_templates": {"cirr": "a photo of {text}"}})
    with pytest.raises(CirlabError, match="placeholder"):
        bad.prompt_for("cirr", "test1")


def test_zero_shot_training_beats_the_untrained_model_and_refuses_triplets(world, clip_dir, tmp_path):
    val = read_split("synth", world, "val")
    untrained = build_model("mapcompose", load_backbone("clip", clip_dir))
    untrained.save(tmp_path / "untrained")
    before, _ = evaluate(cirlab.load(tmp_path / "untrained"), val, progress=False)
    s1 = TrainConfig(epochs=2, batch_size=64, lr=1e-3, warmup_steps=10, progress=False, steps_per_epoch=50)
    s2 = TrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup_steps=5, progress=False)
    # mined negatives from the first step, so that stage II's epoch losses compare
    summary = train_zero_shot("mapcompose", world, clip_dir, tmp_path / "mc", s1, s2, {"hard_negative_start": 0.0},
                              triplets=200)
    assert summary["stage1_losses"][-1] < summary["stage1_losses"][0]
    assert summary["triplets"] == 200 and summary["stage2_losses"][-1] < summary["stage2_losses"][0]
    lines = (tmp_path / "mc.train" / "synthetic_triplets.jsonl").read_text().splitlines()
    assert len(lines) == 200 and {"reference", "text", "target", "match_f1"} <= set(json.loads(lines[0]))
    model = cirlab.load(tmp_path / "mc")
    assert model.config.stage == "composing" and model.pool is None
    after, _ = evaluate(model, val, progress=False)
    assert after["R@10"] > before["R@10"] + 3, (before, after)
    with pytest.raises(CirlabError, match="zero-shot"):
        train_method("mapcompose", world, clip_dir, tmp_path / "no", s1)


def test_cli_trains_pic2word_zero_shot(world, clip_dir, tmp_path):
    done = run_cli("train", "--method", "pic2word", "--data-root", world, "--backbone", clip_dir, "--out",
                   tmp_path / "p2w", "--epochs", "1", "--steps-per-epoch", "3", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-2])
    assert summary["method"] == "pic2word" and "stage2_losses" not in summary  # no stage II for pic2word
    assert cirlab.load(tmp_path / "p2w").name == "pic2word"


def test_ablate_mapcompose_shares_stage1_and_draws_the_triplet_sweep(world, tmp_path):
    from PIL import Image

    from cirlab.experiments.ablate import run_ablation
    from cirlab.experiments.demo import DemoProfile

    short = {"epochs": 1, "batch_size": 16, "steps_per_epoch": 3, "warmup_steps": 1, "lr": 1e-3}
    profile = DemoProfile(
        world="small",
        backbones={"clip": {"config": {"patch_size": 16, "width": 32, "layers": 2, "dim": 32}, "pretrain": short}},
        train=short, zero_shot={"mapcompose": {"stage1": short, "stage2": short | {"epochs": 2}, "triplets": 40}})
    doc = run_ablation("mapcompose", tmp_path / "abl", profile=profile, data=world, progress=False,
                       rows=[{"triplets": 0}, {"triplets": 40}, {"visual_injection": False, "triplets": 40}])
    same = {"soft_align": True, "hard_negatives": 4, "min_match": 0.8, "mine_reference": True}
    assert [r["variant"] for r in doc["rows"]] == [{"triplets": 0, "visual_injection": True} | same,
                                                   {"triplets": 40, "visual_injection": True} | same,
                                                   {"triplets": 40, "visual_injection": False} | same]
    for row in doc["rows"][1:]:  # reported at the best val epoch, the last epoch's figures beside them
        best = max(range(2), key=lambda e: (row["val_curve"][e], -e))
        assert row["checkpoint"] == f"best val (epoch {best + 1})" and "R@1" in row["last_epoch_metrics"]
    assert [len(r["val_curve"]) for r in doc["rows"]] == [1, 2, 2]  # stage I only: one evaluation
    ckpts = tmp_path / "abl" / "checkpoints"
    summaries = [json.loads((ckpts / f"mapcompose-{i}.train" / "zero_shot.json").read_text()) for i in range(3)]
    assert "stage1_from" not in summaries[0] and summaries[1]["stage1_from"] == str(ckpts / "mapcompose-0")
    assert "stage1_from" not in summaries[2]  # another stage-I config trains its own
    assert summaries[1]["triplets"] == 40 and "triplets" not in summaries[0]
    assert summaries[1]["stage2_steps"] == 2 * 3  # 40 triplets fill 2 batches of 16: repeated to 3 steps an epoch
    assert Image.open(tmp_path / "abl" / "triplets_sweep.png").size[0] > 300
