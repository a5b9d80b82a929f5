"""CLIP (transformers CLIPModel): pooled and token-level image and text features in the joint space.

Text runs unpadded ("packed"): the linear layers, layer norms and MLPs of the text tower see only the real tokens of
a batch (N rows, not B x L), and only attention goes back to the padded (B, L) layout, where a causal mask keeps
every real token from seeing the right padding. What a real token computes is what transformers' padded forward
computes for it (the causal mask there hides the padding too), so pooled features and token features agree with
`CLIPTextModel` up to float rounding (tests/test_backbones.py); the work drops with the padding: modification texts
of the synthetic world average 11 tokens in batches padded to 22. `packed_text = False` on an instance runs
transformers' own forward instead.

Two layers run in other kernels than transformers gives them, the same functions up to float rounding (`fast_layers`,
on by default; the weights, their names and the saved checkpoint are unchanged):
- quick_gelu, x * sigmoid(1.702 x), as silu(1.702 x) / 1.702: torch's fused silu and its backward instead of three
  element-wise products and their gradients (one thread, (1088, 512) activations: 2.0 against 3.0 ms forward and
  backward);
- the patch convolution (kernel = stride, no padding) as one matrix product over the image's patches (64 images of
  64 x 64 pixels, 16-pixel patches: 3.6 against 5.7 ms forward and backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.backbones.base import Backbone, unpack_rows


class ClipBackbone(Backbone):
    kind = "clip"
    processor_type = "CLIPImageProcessor"
    hf_class = "CLIPModel"
    packed_text = True
    fast_layers = True

    def __init__(self, model, tokenizer, preprocess, source: str = ""):
        super().__init__(model, tokenizer, preprocess, source)
        if self.fast_layers:
            use_fast_layers(model)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def max_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """All vision tokens (class token first), layer-normed and projected: (B, 1 + P, D)."""
        hidden = self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, 1+P, Dv)
        return self.model.visual_projection(self.model.vision_model.post_layernorm(hidden))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled image feature, not normalised: (B, D)."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (B, Dv)
        return self.model.visual_projection(pooled)

    def text_tokens(self, tokens: dict) -> tuple:
        """Projected text tokens (B, L, D) and the index of each sequence's pooled (EOS) token (B,); padding
        positions hold zeros (packed) or what the padded forward computed there (`packed_text = False`)."""
        eos = tokens["attention_mask"].sum(1) - 1  # right padding: the last real token is EOS
        if not self.packed_text:
            out = self.model.text_model(**tokens)
            return self.model.text_projection(out.last_hidden_state), eos  # (B, L, D)
        hidden, rows = self._packed_text(tokens)
        b, length = tokens["input_ids"].shape
        return unpack_rows(self.model.text_projection(hidden), rows, b, length).view(b, length, -1), eos

    def encode_text(self, tokens: dict) -> torch.Tensor:
        """Pooled text feature, not normalised: (B, D)."""
        if not self.packed_text:
            return self.model.text_projection(self.model.text_model(**tokens).pooler_output)
        return self.encode_text_from(tokens)

    def word_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token table's rows for `input_ids`: (B, L, Dt)."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def encode_text_from(self, tokens: dict, embeds: torch.Tensor | None = None, after_layer=None) -> torch.Tensor:
        """Pooled projected text feature (B, D), not normalised, run layer by layer: `embeds` (B, L, Dt) replace
        the token table's word embeddings (a pseudo-word in a template), and `after_layer(i, hidden) -> hidden`
        runs after encoder layer i on the padded (B, L, Dt) stream (injected modules, adapters; what they return
        at padding positions is dropped). Without either it equals `encode_text`."""
        hidden, rows = self._packed_text(tokens, embeds, after_layer)
        last = tokens["attention_mask"].sum(1).cumsum(0) - 1  # each sequence's EOS among the packed rows
        return self.model.text_projection(hidden[last])

    def _packed_text(self, tokens: dict, embeds: torch.Tensor | None = None, after_layer=None) -> tuple:
        """The text tower on the real tokens only: final-layer-normed hidden states (N, Dt) of the N real tokens
        in batch-major order, and their rows in the flattened (B * L) padded layout."""
        tm = self.model.text_model
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        b, length = ids.shape
        rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,)
        positions = torch.arange(length, device=ids.device).repeat(b)[rows]
        words = self.word_embeddings(ids.reshape(-1)[rows]) if embeds is None \
            else embeds.reshape(b * length, -1)[rows]
        hidden = words + tm.embeddings.position_embedding(positions)  # (N, Dt)
        for i, layer in enumerate(tm.encoder.layers):
            hidden = _packed_layer(layer, hidden, rows, b, length)
            if after_layer is not None:
                padded = unpack_rows(hidden, rows, b, length).view(b, length, -1)
                hidden = after_layer(i, padded).reshape(b * length, -1)[rows]
        return tm.final_layer_norm(hidden), rows

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale


def _packed_layer(layer, hidden: torch.Tensor, rows: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """One CLIPEncoderLayer on packed tokens (N, W): pre-norm causal self-attention (in the padded layout), then
    the pre-norm MLP, each with its residual."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=1)  # (N, 3W)
    heads = unpack_rows(qkv, rows, b, length).view(b, length, 3, attn.num_heads, attn.head_dim)
    q, k, v = heads.permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b * length, -1)[rows]  # (N, W)
    hidden = hidden + attn.out_proj(out)
    return hidden + layer.mlp(layer.layer_norm2(hidden))


class QuickGelu(nn.Module):
    """CLIP's quick_gelu, x * sigmoid(1.702 x), computed as silu(1.702 x) / 1.702 (fused kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(1.702 * x) / 1.702


class PatchConv(nn.Conv2d):
    """A patch convolution (kernel = stride, no padding, no groups) as one product of the (B * h * w, C * p * p)
    patches with the (out, C * p * p) kernel: (B, out, h, w), a view of a (B, h, w, out) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        p, q = self.kernel_size
        h, w = height // p, width // q
        patches = x[:, :, :h * p, :w * q].reshape(b, c, h, p, w, q).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, -1)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def use_fast_layers(model) -> None:
    """Swap a CLIPModel's quick_gelu activations and its patch convolution for `QuickGelu` and `PatchConv` in place
    (the same parameters, so state dicts and checkpoints are unchanged)."""
    from transformers.activations import QuickGELUActivation

    for module in list(model.modules()):
        mlp = getattr(module, "mlp", None)
        if mlp is not None and isinstance(getattr(mlp, "activation_fn", None), QuickGELUActivation):
            mlp.activation_fn = QuickGelu()
    conv = model.vision_model.embeddings.patch_embedding
    if (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"):
        conv.__class__ = PatchConv
