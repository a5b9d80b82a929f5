"""A BLIP-2 whose frozen ViT is a pretrained CLIP ViT, as BLIP-2 itself is built (EVA-CLIP or OpenAI CLIP ViTs).

`blip2_from_clip` copies a CLIP vision tower into Blip2VisionModel and gives the Q-Former CLIP's word table as its
starting word embeddings (same BPE vocabulary); the Q-Former, query tokens and projections start fresh and are
what BLIP-2's first stage trains. The demo uses it so that csmcir's ViT costs no pretraining of its own.

The two ViTs differ in one place: CLIP applies a LayerNorm (`pre_layrnorm`) to the embeddings before the first
layer; Blip2VisionModel has none. The copy folds it into the patch embedding: LayerNorm(e) = g * (e - mean(e)) /
std(e) + b, where centring is linear in the patch and so folds exactly; the division by the per-token std does
not, and is replaced by one constant, the mean std over a calibration batch of patch tokens (the class token,
the same for every image, is folded exactly). `fold_error` reports how far the result is from CLIP's own tokens.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def _fold_pre_layernorm(clip_vision, blip_embeddings, calib_pixels: torch.Tensor) -> None:
    emb, ln = clip_vision.embeddings, clip_vision.pre_layrnorm
    e = emb(calib_pixels)  # (B, 1+P, D), before pre_layrnorm
    std = torch.sqrt(e[:, 1:].var(-1, unbiased=False) + ln.eps).mean()
    d = e.shape[-1]
    centre = torch.eye(d) - torch.full((d, d), 1.0 / d)  # x -> x - mean(x)
    g, b = ln.weight / std, ln.bias
    w = emb.patch_embedding.weight.flatten(1)  # (D, 3*p*p); CLIP's patch conv has no bias
    conv = blip_embeddings.patch_embedding.weight
    conv.copy_((g[:, None] * (centre @ w)).view_as(conv))
    blip_embeddings.patch_embedding.bias.copy_(b)
    pos = emb.position_embedding.weight  # (1+P, D)
    new_pos = g * (pos @ centre.t())  # patch positions: the linear part; the bias b sits in the conv
    cls = emb.class_embedding + pos[0]
    exact_cls = ln(cls)  # the class token's input is the same for every image
    new_pos[0] = 0.0
    blip_embeddings.position_embedding.copy_(new_pos[None])
    blip_embeddings.class_embedding.copy_(exact_cls.view_as(blip_embeddings.class_embedding))


@torch.no_grad()
def _copy_layers(clip_vision, blip_vision) -> None:
    for src, dst in zip(clip_vision.encoder.layers, blip_vision.encoder.layers):
        a = src.self_attn
        dst.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        dst.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        dst.self_attn.projection.load_state_dict(a.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2", "mlp"):
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    blip_vision.post_layernorm.load_state_dict(clip_vision.post_layernorm.state_dict())


def clip_reference_tokens(clip, pixels: torch.Tensor) -> torch.Tensor:
    """What the converted ViT should output: CLIP's final hidden states through its post-LayerNorm."""
    vision = clip.model.vision_model
    return vision.post_layernorm(vision(pixel_values=pixels).last_hidden_state)


@torch.no_grad()
def fold_error(clip, blip2, pixels: torch.Tensor) -> dict:
    """Mean cosine between the converted ViT's tokens and CLIP's (class token and patch tokens apart)."""
    ref = clip_reference_tokens(clip, pixels)
    out = blip2.image_patches(pixels)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)  # (B, 1+P)
    return {"cls_cos": cos[:, 0].mean().item(), "patch_cos": cos[:, 1:].mean().item(),
            "patch_cos_min": cos[:, 1:].min().item()}


def blip2_from_clip(clip, calib_pixels: torch.Tensor, qformer_width: int | None = None, qformer_layers: int = 2,
                    num_query_tokens: int = 8, dim: int | None = None, text_pool: str = "mean"):
    """A tiny Blip2Backbone with `clip`'s ViT (pre-LayerNorm folded) and CLIP's word table in its Q-Former."""
    from cirlab.backbones.configs import tiny_blip2
    from cirlab.errors import CirlabError

    vc = clip.model.config.vision_config
    if vc.hidden_act != "quick_gelu":
        raise CirlabError(f"blip2_from_clip expects CLIP's quick_gelu ViT, got {vc.hidden_act!r}")
    width = qformer_width or vc.hidden_size
    blip2 = tiny_blip2(image_size=vc.image_size, patch_size=vc.patch_size, vision_width=vc.hidden_size,
                       vision_layers=vc.num_hidden_layers, qformer_width=width, qformer_layers=qformer_layers,
                       text_pool=text_pool, num_query_tokens=num_query_tokens, dim=dim or clip.dim,
                       vision_act="quick_gelu", vision_eps=vc.layer_norm_eps)
    blip2.preprocess = clip.preprocess
    clip_vision, blip_vision = clip.model.vision_model, blip2.model.vision_model
    _fold_pre_layernorm(clip_vision, blip_vision.embeddings, calib_pixels)
    _copy_layers(clip_vision, blip_vision)
    words = clip.model.text_model.embeddings.token_embedding.weight
    table = blip2.model.embeddings.word_embeddings.weight
    if words.shape == table.shape:
        with torch.no_grad():
            table.copy_(words)
    return blip2
