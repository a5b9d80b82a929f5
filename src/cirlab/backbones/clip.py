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

    def word_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token table's rows for `input_ids`: (B, L, Dt)."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def encode_text_from(self, tokens: dict, embeds: torch.Tensor | None = None, after_layer=None) -> torch.Tensor:
        """Pooled projected text feature (B, D), not normalised, run layer by layer: `embeds` (B, L, Dt) replace
        the token table's word embeddings (a pseudo-word in a template), and `after_layer(i, hidden) -> hidden`
        runs after encoder layer i (injected modules, adapters). Without either it equals `encode_text`."""
        from transformers.masking_utils import create_causal_mask

        tm = self.model.text_model
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        hidden = tm.embeddings(inputs_embeds=self.word_embeddings(ids) if embeds is None else embeds)
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        for i, layer in enumerate(tm.encoder.layers):
            hidden = layer(hidden, causal, is_causal=True)
            if after_layer is not None:
                hidden = after_layer(i, hidden)
        hidden = tm.final_layer_norm(hidden)
        eos = mask.sum(1) - 1  # right padding: the last real token is EOS
        return self.model.text_projection(hidden[torch.arange(hidden.shape[0], device=hidden.device), eos])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale
