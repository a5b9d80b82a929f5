"""CLIP (transformers CLIPModel): pooled and token-level image and text features in the joint space."""
from __future__ import annotations

import torch

from cirlab.backbones.base import Backbone


class ClipBackbone(Backbone):
    kind = "clip"
    processor_type = "CLIPImageProcessor"
    hf_class = "CLIPModel"

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
        """Projected text tokens (B, L, D) and the index of each sequence's pooled (EOS) token (B,)."""
        out = self.model.text_model(**tokens)
        hidden = self.model.text_projection(out.last_hidden_state)  # (B, L, D)
        eos = tokens["attention_mask"].sum(1) - 1  # right padding: the last real token is EOS
        return hidden, eos

    def encode_text(self, tokens: dict) -> torch.Tensor:
        """Pooled text feature, not normalised: (B, D)."""
        return self.model.text_projection(self.model.text_model(**tokens).pooler_output)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale
