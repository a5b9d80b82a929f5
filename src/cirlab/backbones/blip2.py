"""BLIP-2 retrieval model (transformers Blip2ForImageTextRetrieval): ViT, Q-Former with learned query tokens.

The Q-Former is exposed three ways, as Blip2ForImageTextRetrieval uses it: image-only (query tokens cross-attend to
the ViT patches), text-only (the text tokens alone, CLS pooled), and joint (query tokens and text tokens in one
sequence, cross-attending to the patches), which is what composed-query methods such as CSMCIR build on.
"""
from __future__ import annotations

import torch

from cirlab.backbones.base import Backbone


class Blip2Backbone(Backbone):
    kind = "blip2"
    processor_type = "BlipImageProcessor"
    hf_class = "Blip2ForImageTextRetrieval"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Blip2ForImageTextRetrieval keeps no temperature; the wrapper holds one for contrastive training.
        self._logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    @property
    def dim(self) -> int:
        return self.model.config.image_text_hidden_size

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def max_length(self) -> int:
        return self.model.config.qformer_config.max_position_embeddings

    def image_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT output tokens: (B, 1 + P, Dv)."""
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def query_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Query tokens after the Q-Former, projected, not normalised: (B, Q, D)."""
        m = self.model
        queries = m.query_tokens.expand(patches.shape[0], -1, -1)  # (B, Q, Dq)
        mask = torch.ones(patches.shape[:-1], dtype=torch.long, device=patches.device)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask)
        return m.vision_projection(out.last_hidden_state)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, Q, D): BLIP-2 image features are one vector per query token."""
        return self.query_features(self.image_patches(pixels))

    def encode_text(self, tokens: dict) -> torch.Tensor:
        """Text-only Q-Former, CLS (first position) projected: (B, D)."""
        m = self.model
        embeds = m.embeddings(input_ids=tokens["input_ids"])
        out = m.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens["attention_mask"])
        return m.text_projection(out.last_hidden_state[:, 0])

    def joint(self, patches: torch.Tensor, tokens: dict) -> torch.Tensor:
        """Query tokens and text in one Q-Former pass over the patches: hidden states (B, Q + L, Dq)."""
        m = self.model
        b = patches.shape[0]
        queries = m.query_tokens.expand(b, -1, -1)
        embeds = m.embeddings(input_ids=tokens["input_ids"], query_embeds=queries)  # (B, Q+L, Dq)
        q_mask = torch.ones(queries.shape[:-1], dtype=tokens["attention_mask"].dtype, device=patches.device)
        mask = torch.cat([q_mask, tokens["attention_mask"]], dim=1)
        enc_mask = torch.ones(patches.shape[:-1], dtype=torch.long, device=patches.device)
        out = m.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                        encoder_hidden_states=patches, encoder_attention_mask=enc_mask)
        return out.last_hidden_state

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale
