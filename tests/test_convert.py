"""A BLIP-2 built on a pretrained CLIP ViT: the layers copy exactly, the pre-LayerNorm fold is close, the ViT
stays frozen while the Q-Former pretrains on it, and the result saves and loads as a plain BLIP-2 checkpoint."""
from __future__ import annotations

import json

import torch

from cirlab.backbones import load_backbone
from cirlab.backbones.convert import blip2_from_clip, clip_reference_tokens, fold_error
from cirlab.data.images import PixelStore
from cirlab.data.readers import read_split


def _pixels(world, clip, n=64, offset=0):
    split = read_split("synth", world, "train")
    names = sorted(split.gallery)[offset:offset + n]
    return PixelStore(split.gallery, clip.preprocess).pixels(names)


@torch.no_grad()
def test_layers_copy_exactly_and_the_fold_is_close(world, clip_dir):
    clip = load_backbone("clip", clip_dir).eval()
    calib, px = _pixels(world, clip), _pixels(world, clip, offset=200)
    blip2 = blip2_from_clip(clip, calib).eval()
    cv, bv = clip.model.vision_model, blip2.model.vision_model
    # fed the same input, the copied encoder and post-LayerNorm give CLIP's tokens to float precision
    start = cv.pre_layrnorm(cv.embeddings(px))
    ours = bv.post_layernorm(bv.encoder(inputs_embeds=start).last_hidden_state)
    assert torch.allclose(ours, clip_reference_tokens(clip, px), atol=1e-4)
    # the class token's embedding is folded exactly; patch tokens through one constant std
    assert torch.allclose(bv.embeddings(px)[:, 0], start[:, 0], atol=1e-5)
    err = fold_error(clip, blip2, px)
    assert err["patch_cos"] > 0.8 and err["cls_cos"] > 0.8, err
    # a random ViT of the same shape is nowhere near: the check can fail
    other = blip2_from_clip(clip, calib)
    for p in other.model.vision_model.encoder.parameters():
        p.normal_(0, 0.02)
    assert fold_error(clip, other, px)["patch_cos"] < err["patch_cos"] - 0.2
    # the Q-Former starts from CLIP's word table (same BPE vocabulary)
    assert torch.equal(blip2.model.embeddings.word_embeddings.weight,
                       clip.model.text_model.embeddings.token_embedding.weight)


def test_qformer_pretrains_on_the_frozen_clip_vit_and_loads_back(world, clip_dir, qformer_dir):
    out = qformer_dir  # pretrained by the fixture: 2 epochs of 15 steps on the frozen CLIP ViT
    info = json.loads((out / "pretrain.json").read_text())
    assert info["epoch_losses"][1] < info["epoch_losses"][0] and info["vit_fold"]["patch_cos"] > 0.8, info
    clip = load_backbone("clip", clip_dir).eval()
    blip2 = load_backbone("blip2", out).eval()
    fresh = blip2_from_clip(clip, _pixels(world, clip, n=256))  # the calibration images pretrain uses
    for (name, a), b in zip(blip2.model.vision_model.state_dict().items(),
                            fresh.model.vision_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), f"ViT weight {name} moved during Q-Former pretraining"
    assert blip2.model.config.vision_config.hidden_act == "quick_gelu"
    assert blip2.preprocess == clip.preprocess
    px = _pixels(world, clip, n=4)
    assert blip2.encode_image(px).shape == (4, 4, clip.dim)


def test_pretrain_cli_refuses_init_from_for_clip_and_a_missing_folder(world, clip_dir, tmp_path, capsys):
    from cirlab.cli.main import main

    assert main(["pretrain", "--backbone", "clip", "--data", str(world), "--out", str(tmp_path / "x"),
                 "--init-from", str(clip_dir), "--no-progress"]) == 2
    assert "init_from is for the blip2 backbone" in capsys.readouterr().err
    assert main(["pretrain", "--backbone", "blip2", "--data", str(world), "--out", str(tmp_path / "y"),
                 "--init-from", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "backbone folder not found" in capsys.readouterr().err
