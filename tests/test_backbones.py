"""Backbones: token-level and pooled features, and a save_pretrained / from_pretrained round trip."""
from __future__ import annotations

import pytest
import torch

from cirlab.backbones import load_backbone, tiny_backbone
from cirlab.errors import CirlabError

TEXTS = ["a large red circle at the top left", "a small blue star at the center and a cyan cross at the right"]


@pytest.mark.parametrize("kind", ["clip", "blip2"])
def test_round_trip_gives_identical_features(kind, tmp_path):
    torch.manual_seed(0)
    small = {"width": 32, "layers": 1, "dim": 16} if kind == "clip" else {
        "vision_width": 32, "vision_layers": 1, "qformer_width": 32, "qformer_layers": 1, "num_query_tokens": 4,
        "dim": 16}
    bb = tiny_backbone(kind, image_size=32, patch_size=8, **small).eval()
    px = torch.randn(2, 3, 32, 32)
    tok = bb.tokenize(TEXTS)
    bb.save_pretrained(tmp_path / kind)
    again = load_backbone(kind, tmp_path / kind).eval()
    assert again.preprocess == bb.preprocess
    with torch.no_grad():
        assert torch.allclose(again.encode_image(px), bb.encode_image(px), atol=1e-6)
        assert torch.allclose(again.encode_text(again.tokenize(TEXTS)), bb.encode_text(tok), atol=1e-6)
    img, txt = bb.encode_image(px), bb.encode_text(tok)
    assert txt.shape == (2, 16)
    if kind == "clip":
        assert img.shape == (2, 16)
        tokens = bb.image_tokens(px)
        assert tokens.shape == (2, 1 + 16, 16)  # class token + (32 / 8) ** 2 patches
        hidden, eos = bb.text_tokens(tok)
        assert hidden.shape[:2] == tok["input_ids"].shape
        assert (tok["input_ids"][torch.arange(2), eos] == 49407).all()
    else:
        assert img.shape == (2, 4, 16)  # one feature per query token
        joint = bb.joint(bb.image_patches(px), tok)
        assert joint.shape == (2, 4 + tok["input_ids"].shape[1], 32)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CirlabError, match="backbone folder not found"):
        load_backbone("clip", tmp_path / "nope")
    with pytest.raises(CirlabError, match="unknown backbone"):
        load_backbone("resnet", tmp_path)
