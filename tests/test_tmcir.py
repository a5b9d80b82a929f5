"""TMCIR: the token fusion against hand-computed cases, stage 1 on oracle pseudo-targets, stage 2 training."""
from __future__ import annotations

import json

import pytest
import torch

import cirlab
from cirlab.backbones import load_backbone
from cirlab.data.readers import read_split
from cirlab.editing.oracle import OracleEditor
from cirlab.editing.run import edit_split
from cirlab.errors import CirlabError
from cirlab.evaluation.protocols import evaluate
from cirlab.layers.token_fusion import AdaptiveTokenFusion
from cirlab.training.intent_align import align_intent, set_unfrozen
from cirlab.training.loop import TrainConfig
from cirlab.training.train import save_zero_shot, train_method


def _tokens():
    v = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])  # (1, 2, 4)
    t = torch.tensor([[[1.0, 0.1, 0, 0], [0, 0, 1.0, 0], [50.0, 50, 50, 50]]])  # the third is padding
    mask = torch.tensor([[1, 1, 0]])
    return v, t, mask


def test_fusion_merges_similar_pairs_and_keeps_the_rest():
    v, t, mask = _tokens()
    fusion = AdaptiveTokenFusion(4, num_visual=2, threshold=0.5)
    out = fusion(v, t, mask)
    assert out["merged"].tolist() == [[[True, False, False], [False, False, False]]]
    s = torch.nn.functional.cosine_similarity(v[0, 0], t[0, 0], dim=0)
    merged = (v[0, 0] + s * t[0, 0]) / (1 + s)
    expected = (merged + v[0, 1] + t[0, 1]) / 3  # t0 joined v0; the padding never counts
    assert torch.allclose(out["pooled"][0], expected, atol=1e-6)
    # above every similarity nothing merges: the mean of all real tokens
    none = AdaptiveTokenFusion(4, num_visual=2, threshold=1.0)(v, t, mask)
    assert not none["merged"].any()
    assert torch.allclose(none["pooled"][0], (v[0].sum(0) + t[0, :2].sum(0)) / 4, atol=1e-6)


def test_mutual_matching_is_one_to_one_and_position_stays_with_the_visual_slot():
    v = torch.tensor([[[1.0, 0, 0, 0], [0.9, 0.3, 0, 0]]])  # both closest to the first text token
    t = torch.tensor([[[1.0, 0.1, 0, 0], [0, 0, 1.0, 0]]])
    mask = torch.ones(1, 2, dtype=torch.long)
    best = AdaptiveTokenFusion(4, 2, threshold=0.5, matching="best_visual")(v, t, mask)["merged"]
    mutual = AdaptiveTokenFusion(4, 2, threshold=0.5, matching="mutual")(v, t, mask)["merged"]
    assert best[0, :, 0].tolist() == [True, True] and mutual[0, :, 0].tolist() == [True, False]
    fusion = AdaptiveTokenFusion(4, 2, threshold=0.5, pool="mean")
    base = fusion(v, t, mask)["pooled"]
    with torch.no_grad():
        fusion.position[0] = torch.tensor([3.0, 0, 0, 0])  # visual position 0 only
    moved = fusion(v, t, mask)["pooled"]
    kept = 3  # two visual slots and the unmerged text token
    assert torch.allclose(moved - base, torch.tensor([[3.0 / kept, 0, 0, 0]]), atol=1e-6)
    with pytest.raises(ValueError, match="matching"):
        AdaptiveTokenFusion(4, 2, matching="greedy")


def test_attention_pool_ignores_padding_and_gradients_reach_the_tokens():
    v, t, mask = _tokens()
    v.requires_grad_(True)
    t.requires_grad_(True)
    fusion = AdaptiveTokenFusion(4, 2, threshold=0.5, pool="attention")
    out = fusion(v, t, mask)["pooled"]
    out.sum().backward()
    assert t.grad[0, 2].abs().sum() == 0 and t.grad[0, 0].abs().sum() > 0 and v.grad.abs().sum() > 0


def test_stage1_aligns_texts_with_pseudo_targets(world, clip_dir, tmp_path):
    edit_split("synth", world, "train", OracleEditor(world, imperfection=0.1), tmp_path / "pseudo", n=2,
               limit=640, progress=False)
    before = load_backbone("clip", clip_dir)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=5e-4, warmup_steps=5, progress=False)
    out = align_intent(world, clip_dir, tmp_path / "pseudo", tmp_path / "aligned", cfg, unfreeze=1)
    info = json.loads((out / "intent_align.json").read_text())
    assert info["epoch_losses"][-1] < info["epoch_losses"][0], info["epoch_losses"]
    after = load_backbone("clip", out)
    first_b, first_a = before.model.text_model.encoder.layers[0], after.model.text_model.encoder.layers[0]
    assert torch.equal(first_b.mlp.fc1.weight, first_a.mlp.fc1.weight)  # frozen below the last layer
    last_b, last_a = before.model.vision_model.encoder.layers[-1], after.model.vision_model.encoder.layers[-1]
    assert not torch.equal(last_b.mlp.fc1.weight, last_a.mlp.fc1.weight)

    # on the same batches (same drawn samples, eval mode), the alignment loss and the rank of a text's own
    # pseudo-target among 64 both improve
    from cirlab.training.intent_align import IntentAligner, PseudoTargetSource

    def measure(bb):
        torch.manual_seed(0)
        src = PseudoTargetSource(read_split("synth", world, "train"), tmp_path / "pseudo", bb.preprocess)
        aligner, losses, ranks = IntentAligner(bb.eval()), [], []
        with torch.no_grad():
            for lo in range(0, 256, 64):
                batch = src.batch(list(range(lo, lo + 64)))
                losses.append(aligner.loss(batch).loss.item())
                img = torch.nn.functional.normalize(bb.encode_image(batch.tgt_pixels), dim=-1)
                txt = torch.nn.functional.normalize(bb.encode_text(bb.tokenize(batch.texts)), dim=-1)
                sim = txt @ img.t()
                ranks.append((sim > sim.diag()[:, None]).sum(1).float().mean().item())
        return sum(losses) / 4, sum(ranks) / 4

    (loss_b, rank_b), (loss_a, rank_a) = measure(before), measure(after)
    assert loss_a < loss_b - 0.2 and rank_a < rank_b - 2, (loss_b, loss_a, rank_b, rank_a)
    with pytest.raises(CirlabError, match="unfreeze"):
        set_unfrozen(after, "some")


def test_tmcir_training_lowers_loss_and_raises_recall(world, clip_dir, tmp_path):
    val = read_split("synth", world, "val")
    untrained = save_zero_shot("tmcir", clip_dir, tmp_path / "untrained")
    before, _ = evaluate(cirlab.load(untrained), val, progress=False)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-3, backbone_lr=1e-4, warmup_steps=10, progress=False)
    result = train_method("tmcir", world, clip_dir, tmp_path / "tmcir", cfg)
    model = cirlab.load(tmp_path / "tmcir")
    after, _ = evaluate(model, val, progress=False)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert after["R@10"] > before["R@10"] + 5, (before, after)
    from PIL import Image

    qs = val.queries[:3]
    q = model.encode_query([Image.open(val.gallery[x.reference]) for x in qs], [x.text for x in qs])
    assert q.shape == (3, model.backbone.dim) and torch.allclose(q.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(CirlabError, match="pool"):
        cirlab.methods.build_model("tmcir", load_backbone("clip", clip_dir), {"pool": "max"})
