"""Every registered method answers the same interface: one test checks them all (timm style)."""
from __future__ import annotations

import json

import pytest
import torch

import cirlab
from cirlab.backbones import load_backbone
from cirlab.errors import CirlabError
from cirlab.methods import REGISTRY, TrainingKind, build_model
from cirlab.types import Batch

METHODS = sorted(REGISTRY)


def _backbone(name, dirs):
    kind = REGISTRY[name].backbone_kind
    return load_backbone(kind, dirs[kind])


def _batch(bb, n=4):
    torch.manual_seed(1)
    px = torch.randn(n, 3, bb.preprocess.size, bb.preprocess.size)
    return Batch(px, ["make the red circle blue", "remove the star", "add a small green cross at the top",
                      "move the square to the left"][:n], torch.randn_like(px), ["a red circle at the top"] * n,
                 [f"img{i}" for i in range(n)])


def _config(name, world) -> dict:
    """A config each method can run with offline: caption_compose composes with the synthetic world's oracle
    (these batches are not its queries, so each falls back to "description text")."""
    return {"composer": "oracle", "oracle_root": str(world)} if name == "caption_compose" else {}


def _query(model, b):
    """encode_query of a batch, with each reference's description for a method whose queries read one."""
    from cirlab.types import Reference

    extra = {"references": [Reference(n, c) for n, c in zip(b.target_names, b.tgt_captions)]} \
        if model.query_captions else {}
    return model.encode_query(b.ref_pixels, b.texts, **extra)


@pytest.mark.parametrize("name", METHODS)
def test_interface_shapes_and_normalisation(name, backbone_dirs, world):
    model = build_model(name, _backbone(name, backbone_dirs), _config(name, world)).eval()
    b = _batch(model.backbone)
    with torch.no_grad():
        q = _query(model, b)
        t = model.encode_target(b.tgt_pixels, b.tgt_captions)
        s = model.similarity(q, t)
    assert q.shape[0] == 4 and torch.isfinite(q).all()
    assert torch.allclose(q.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5)
    assert s.shape == (4, 4)


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY[n].training is not TrainingKind.NONE])
def test_every_trainable_parameter_gets_a_gradient(name, backbone_dirs):
    model = build_model(name, _backbone(name, backbone_dirs)).train()
    out = model.loss(_batch(model.backbone))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all())]
    # the word table only gets gradients for the tokens in the batch; everything else must have one
    assert [n for n in missing if "token_embedding" not in n] == []


@pytest.mark.parametrize("name", METHODS)
def test_save_and_load_round_trip(name, backbone_dirs, world, tmp_path):
    model = build_model(name, _backbone(name, backbone_dirs), _config(name, world)).eval()
    with torch.no_grad():  # make the method's own weights differ from a fresh init
        for n, p in model.named_parameters():
            if not n.startswith("backbone."):
                p.add_(0.01)
    model.save(tmp_path / name)
    again = cirlab.load(tmp_path / name)
    assert type(again) is type(model) and again.config == model.config
    cfg = json.loads((tmp_path / name / "cirlab.json").read_text())
    assert cfg["method"] == name and type(model.config).from_json(cfg["config"]) == model.config
    b = _batch(model.backbone)
    with torch.no_grad():
        assert torch.allclose(_query(again, b), _query(model, b), atol=1e-5)


def test_unknown_method_and_bad_config_are_clear_errors(clip_dir):
    bb = load_backbone("clip", clip_dir)
    with pytest.raises(CirlabError, match="unknown method 'nope'"):
        build_model("nope", bb)
    with pytest.raises(CirlabError, match="unknown config field"):
        build_model("combiner", bb, {"hidden": 3})
    with pytest.raises(CirlabError, match="finetune must be one of"):
        build_model("combiner", bb, {"finetune": "all"})
